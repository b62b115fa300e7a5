//! A polling vhost-user frontend of the bench's own, for latency: a
//! virtio-net driver's two rings in a memfd it shares with the backend
//! (nfvisor's switch, testpmd's vhost PMD), one frame in flight at a
//! time, both rings busy-polled. Written by hand because what it measures
//! is the backend's forwarding time: DPDK's virtio-user (the frontend of
//! the throughput loop) measures no latency, and a VM's guest code is
//! emulated on these hosts.

use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// The memory shared: guest-physical 0..MEM (the layout below, which the
/// switch's hostile-frontend tests use too).
pub const MEM: usize = 2 << 20;
pub const QSIZE: u16 = 256;
/// The receive and transmit queues' indexes.
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const F_VERSION_1: u64 = 1 << 32;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const DESC_F_WRITE: u16 = 2;
/// VRING_USED_F_NO_NOTIFY: the backend polls; no kick needed.
const NO_NOTIFY: u16 = 1;
/// VRING_AVAIL_F_NO_INTERRUPT: this frontend polls.
const NO_INTERRUPT: u16 = 1;
/// The virtio-net header before each frame (VERSION_1).
pub const HDR: usize = 12;
/// Each buffer's size (a 1518-byte frame and its header fit).
const BUF: u64 = 2048;

/// Ring `q`'s descriptor table (guest-physical; the layout the switch's
/// hostile-frontend tests use too).
pub fn desc_table(q: usize) -> u64 {
    q as u64 * 0x1_0000
}
/// Ring `q`'s available ring.
pub fn avail(q: usize) -> u64 {
    desc_table(q) + 0x1000
}
/// Ring `q`'s used ring.
pub fn used(q: usize) -> u64 {
    desc_table(q) + 0x2000
}
/// Ring `q`'s buffer for slot `slot` (2 KiB each, the upper MiB).
pub fn buf(q: usize, slot: u16) -> u64 {
    0x10_0000 + q as u64 * 0x8_0000 + slot as u64 * BUF
}

/// A memfd of `len` bytes, mapped shared here (the memory a frontend
/// hands a vhost-user backend); the mapping is the caller's to unmap.
pub fn shared_memfd(name: &std::ffi::CStr, len: usize) -> Result<(std::fs::File, *mut u8), String> {
    // SAFETY: a NUL-terminated name memfd_create only reads.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len as u64)
        .map_err(|e| format!("sizing the memfd: {e}"))?;
    // SAFETY: a fresh shared mapping of the whole memfd at an address the
    // kernel chooses; checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok((file, ptr as *mut u8))
}

/// A memfd mapped here and shared with the backend.
struct Shared {
    file: std::fs::File,
    ptr: *mut u8,
}

impl Shared {
    fn new() -> Result<Shared, String> {
        let (file, ptr) = shared_memfd(c"nfv-bench-frontend", MEM)?;
        Ok(Shared { file, ptr })
    }

    /// This process's address of guest-physical `gpa` (every caller's
    /// `gpa` is a constant layout offset below MEM).
    fn host(&self, gpa: u64) -> *mut u8 {
        debug_assert!((gpa as usize) < MEM);
        // SAFETY: gpa < MEM, inside the mapping.
        unsafe { self.ptr.add(gpa as usize) }
    }

    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: 2-aligned layout offsets inside the mapping, which lives
        // as long as self; the backend accesses these atomically too.
        unsafe { AtomicU16::from_ptr(self.host(gpa) as *mut u16) }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        // SAFETY: the layout keeps gpa + len inside the mapping (frames
        // are at most BUF); the backend reads only what the available
        // index published.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.host(gpa), bytes.len()) };
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: a 4-aligned layout offset inside the mapping; volatile,
        // as the backend writes it.
        u32::from_le(unsafe { (self.host(gpa) as *const u32).read_volatile() })
    }

    fn write_desc(&self, q: usize, slot: u16, addr: u64, len: u32, flags: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        self.write(desc_table(q) + 16 * slot as u64, &d);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unused after this.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, MEM) };
    }
}

/// A frontend on one backend socket: both rings up, every receive slot
/// posted, both busy-polled.
pub struct Frontend {
    _fe: VuFrontend,
    mem: Shared,
    kick: [EventFd; 2],
    _call: [EventFd; 2],
    /// Transmit chains posted, and seen used.
    tx_posted: u16,
    tx_done: u16,
    /// Receive chains posted, and seen used.
    rx_posted: u16,
    rx_done: u16,
}

impl Frontend {
    /// Connects to the backend at `sock` and sets both rings up.
    pub fn connect(sock: &Path) -> Result<Frontend, String> {
        let fe = VuFrontend::connect(sock, 2)
            .map_err(|e| format!("{}: connecting: {e}", sock.display()))?;
        Frontend::set_up(fe, sock)
    }

    /// Waits (up to `limit`) for a backend that connects to `listener`
    /// (OVS's dpdkvhostuserclient ports), then sets both rings up.
    pub fn accept(
        listener: &std::os::unix::net::UnixListener,
        sock: &Path,
        limit: std::time::Duration,
    ) -> Result<Frontend, String> {
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("{}: {e}", sock.display()))?;
        let t0 = std::time::Instant::now();
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t0.elapsed() > limit {
                        return Err(format!(
                            "{}: no backend connected within {limit:?}",
                            sock.display()
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(format!("{}: accept: {e}", sock.display())),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(|e| format!("{}: {e}", sock.display()))?;
        Frontend::set_up(VuFrontend::from_stream(stream, 2), sock)
    }

    fn set_up(mut fe: VuFrontend, sock: &Path) -> Result<Frontend, String> {
        let at = |what: &str, e: vhost::Error| format!("{}: {what}: {e}", sock.display());
        fe.set_owner().map_err(|e| at("SET_OWNER", e))?;
        let offered = fe.get_features().map_err(|e| at("GET_FEATURES", e))?;
        let wanted = F_VERSION_1 | F_PROTOCOL_FEATURES;
        if offered & wanted != wanted {
            return Err(format!(
                "{}: features {offered:#x} lack VERSION_1 or PROTOCOL_FEATURES",
                sock.display()
            ));
        }
        fe.get_protocol_features()
            .map_err(|e| at("GET_PROTOCOL_FEATURES", e))?;
        fe.set_protocol_features(VhostUserProtocolFeatures::empty())
            .map_err(|e| at("SET_PROTOCOL_FEATURES", e))?;
        fe.set_features(wanted).map_err(|e| at("SET_FEATURES", e))?;
        let mem = Shared::new()?;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: mem.host(0) as u64,
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        }])
        .map_err(|e| at("SET_MEM_TABLE", e))?;
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"));
        let kick = [eventfd()?, eventfd()?];
        let call = [eventfd()?, eventfd()?];
        for q in [RX, TX] {
            // this frontend polls its used rings
            mem.u16_at(avail(q)).store(NO_INTERRUPT, Ordering::Release);
            fe.set_vring_num(q, QSIZE)
                .map_err(|e| at("SET_VRING_NUM", e))?;
            let config = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: mem.host(desc_table(q)) as u64,
                used_ring_addr: mem.host(used(q)) as u64,
                avail_ring_addr: mem.host(avail(q)) as u64,
                log_addr: None,
            };
            fe.set_vring_addr(q, &config)
                .map_err(|e| at("SET_VRING_ADDR", e))?;
            fe.set_vring_base(q, 0)
                .map_err(|e| at("SET_VRING_BASE", e))?;
            fe.set_vring_call(q, &call[q])
                .map_err(|e| at("SET_VRING_CALL", e))?;
            fe.set_vring_kick(q, &kick[q])
                .map_err(|e| at("SET_VRING_KICK", e))?;
        }
        let mut me = Frontend {
            _fe: fe,
            mem,
            kick,
            _call: call,
            tx_posted: 0,
            tx_done: 0,
            rx_posted: 0,
            rx_done: 0,
        };
        // every receive slot posted, one buffer each
        for slot in 0..QSIZE {
            me.mem
                .write_desc(RX, slot, buf(RX, slot), BUF as u32, DESC_F_WRITE);
            me.mem
                .write(avail(RX) + 4 + 2 * slot as u64, &slot.to_le_bytes());
        }
        me.rx_posted = QSIZE;
        me.mem
            .u16_at(avail(RX) + 2)
            .store(me.rx_posted, Ordering::Release);
        for q in [RX, TX] {
            me._fe
                .set_vring_enable(q, true)
                .map_err(|e| at("SET_VRING_ENABLE", e))?;
        }
        me.notify(RX);
        Ok(me)
    }

    /// Kicks ring `q` unless the backend said it polls.
    fn notify(&self, q: usize) {
        if self.mem.u16_at(used(q)).load(Ordering::Acquire) & NO_NOTIFY == 0 {
            let _ = self.kick[q].write(1);
        }
    }

    /// Sends `frame` (virtio-net header first): false when the transmit
    /// ring is full.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        self.tx_done = self.mem.u16_at(used(TX) + 2).load(Ordering::Acquire);
        if self.tx_posted.wrapping_sub(self.tx_done) >= QSIZE {
            return false;
        }
        let slot = self.tx_posted % QSIZE;
        let len = frame.len().min(BUF as usize);
        self.mem.write(buf(TX, slot), &frame[..len]);
        self.mem.write_desc(TX, slot, buf(TX, slot), len as u32, 0);
        self.mem
            .write(avail(TX) + 4 + 2 * slot as u64, &slot.to_le_bytes());
        self.tx_posted = self.tx_posted.wrapping_add(1);
        self.mem
            .u16_at(avail(TX) + 2)
            .store(self.tx_posted, Ordering::Release);
        self.notify(TX);
        true
    }

    /// A frame received since the last call: its length (header
    /// included); its buffer goes back to the ring.
    pub fn poll(&mut self) -> Option<usize> {
        let used_idx = self.mem.u16_at(used(RX) + 2).load(Ordering::Acquire);
        if used_idx == self.rx_done {
            return None;
        }
        let slot = self.rx_done % QSIZE;
        let len = self.mem.read_u32(used(RX) + 4 + 8 * slot as u64 + 4) as usize;
        let head = self.mem.read_u32(used(RX) + 4 + 8 * slot as u64) as u16 % QSIZE;
        self.rx_done = self.rx_done.wrapping_add(1);
        // the buffer again, in the next available slot
        let at = self.rx_posted % QSIZE;
        self.mem
            .write(avail(RX) + 4 + 2 * at as u64, &head.to_le_bytes());
        self.rx_posted = self.rx_posted.wrapping_add(1);
        self.mem
            .u16_at(avail(RX) + 2)
            .store(self.rx_posted, Ordering::Release);
        self.notify(RX);
        Some(len)
    }
}
