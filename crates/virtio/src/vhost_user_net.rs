//! virtio-net whose queues another process serves over vhost-user: a
//! switch (DPDK's vhost library in testpmd, OVS-DPDK, VPP). The device
//! model stays here (features, MAC, MTU, link status, queue positions);
//! the rings go to the backend with the guest memory table, the guest's
//! kicks are the ioeventfds KVM signals and the backend's calls are the
//! MSI-X vectors' irqfds, so no frame and no notification passes through
//! this process.
//!
//! One thread per device ("vhost-user netN", device-worker filter) owns
//! the connection: the transport's activate and reset (a vCPU thread, whose
//! filter allows no socket calls) become commands it runs. It also watches
//! the socket: when the backend goes away the link goes down and the VM
//! runs on; when a backend is back (client mode: it reconnects, server
//! mode: one connects) it is negotiated afresh, the rings are set up again
//! from where the guest's used rings stand, and the link comes back up.
//!
//! The backend is not trusted: every request has a deadline (a hung
//! backend cannot stall a vCPU), a failed or malformed reply takes the
//! link down, never the VM.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::{ActiveQueue, Interrupt, VirtioDevice, WorkerThread};

pub use crate::net_ctrl::MAX_PAIRS;
use crate::net_ctrl::{serve_ctrl_queue, CtrlCommand, CtrlOffer};
const QUEUE_SIZE: u16 = 256;
/// A backend's answer to one request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Between two connection attempts to a backend that went away.
const RECONNECT_EVERY: Duration = Duration::from_millis(200);

/// The virtio-net features a backend may offer the guest through this
/// device: split rings only (the transport has no packed ring), offloads
/// passed through (the backend does them, or hands them on), no control
/// queue (the VMM would have to serve it).
const PASSED_THROUGH: u64 = crate::F_VERSION_1
    | crate::F_RING_EVENT_IDX
    | 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN;
/// Features this device answers itself (its configuration space).
const OWN: u64 = 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MTU;

const NO_LOG: &str = "the backend cannot log the guest pages it writes (it does not offer PROTOCOL_F_LOG_SHMFD): a migration would lose them";

/// How a vhost-user NIC is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct VhostUserNetConfig {
    /// The backend's socket.
    pub socket: PathBuf,
    /// true: this process listens at `socket` and the backend connects
    /// (OVS's dpdkvhostuserclient ports); false: this process connects.
    pub server: bool,
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
    /// Queue pairs (1: no MQ, no control queue; more: MQ and a control
    /// queue this process serves, VQ_PAIRS_SET turning the backend's rings
    /// on and off).
    pub pairs: u16,
    /// How long start-up waits for the backend.
    pub connect_timeout: Duration,
}

/// What the device counts.
#[derive(Default)]
pub struct VhostUserCounters {
    /// Times the backend went away (socket closed, a request failed).
    pub disconnects: AtomicU64,
    /// Times a backend came back and the rings were set up on it again.
    pub reconnects: AtomicU64,
    /// Requests the backend failed or answered badly.
    pub failed_requests: AtomicU64,
    /// Queue interrupts relayed through this process (no MSI-X vector).
    pub relayed_interrupts: AtomicU64,
    /// RARPs the backend was asked to send for a restored guest.
    pub announces: AtomicU64,
    /// Queue positions taken from the used ring because the backend could
    /// not say (it had gone): transmit chains it had taken but not yet
    /// completed are sent again.
    pub positions_from_used: AtomicU64,
}

/// A ring as the backend gets it.
struct Ring {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    /// The irqfd the backend writes; None: relayed (`relay`).
    call: Option<EventFd>,
    /// The next available index at activation: where the backend starts.
    base: u16,
}

/// What the rings need on a backend: kept while the device runs, so a
/// backend that comes back is set up again.
struct Setup<M> {
    mem: M,
    interrupt: Arc<dyn Interrupt>,
    acked: u64,
    rings: Vec<Ring>,
    /// Eventfds the backend writes for queues without an irqfd: this
    /// thread raises their interrupt.
    relay: Vec<(u16, EventFd)>,
    /// Announce this MAC once the rings run (the guest was restored).
    announce: Option<[u8; 6]>,
    /// The control queue (MQ), served here.
    ctrl: Option<CtrlQueue>,
    /// Pairs the guest turned on (VQ_PAIRS_SET; 1 until it does).
    pairs_on: Arc<AtomicU16>,
    max_pairs: u16,
}

/// The control queue as this process serves it.
struct CtrlQueue {
    queue: virtio_queue::Queue,
    kick: EventFd,
    index: u16,
}

enum Command<M> {
    Activate(Setup<M>, mpsc::Sender<Result<(), String>>),
    /// Stops the rings: each one's next available index as the backend
    /// says it (None: the backend could not say), and the control queue
    /// as this thread left it.
    Stop(mpsc::Sender<(Vec<Option<u16>>, Option<virtio_queue::Queue>)>),
    /// Dirty logging on or off (a migration).
    Log(bool, mpsc::Sender<Result<(), String>>),
}

/// A negotiated connection to a backend.
struct Connection {
    frontend: Frontend,
    /// A second descriptor of the socket, watched for the backend's hang-up.
    watch: UnixStream,
    features: u64,
    protocol: bool,
    /// The backend can log the pages it writes into a shared bitmap
    /// (PROTOCOL_F_LOG_SHMFD): what a migration needs.
    log_shmfd: bool,
    /// It can broadcast a RARP for the guest (PROTOCOL_F_RARP).
    rarp: bool,
    /// Queue pairs it serves (PROTOCOL_F_MQ's GET_QUEUE_NUM; 1 without).
    pairs: u64,
}

pub struct VhostUserNet<M> {
    config: VhostUserNetConfig,
    name: String,
    /// What the backend offered, filtered: fixed for the device's life.
    backend_features: u64,
    link_up: Arc<AtomicBool>,
    pub counters: Arc<VhostUserCounters>,
    commands: mpsc::Sender<Command<M>>,
    wake: EventFd,
    worker: Option<WorkerThread<()>>,
    /// (dropped after the worker: fields drop in order)
    _watchdog: StopWatchdog,
    /// Server mode: the listener's socket, removed with the device.
    _bound: Option<Unbind>,
    /// Pages the backends logged during migrations.
    logged_pages: Arc<AtomicU64>,
    /// The dirty log during a migration (harvested here directly).
    log: SharedLog,
    /// Restored: announce the MAC at the next activation.
    announce: bool,
    /// Pairs the guest turned on (shared with the backend thread).
    pairs_on: Arc<AtomicU16>,
    /// The receive and transmit queues among `active` (the control queue
    /// follows them).
    data_queues: usize,
    /// The queues while the backend serves them.
    active: Option<Vec<ActiveQueue>>,
    mem: Option<M>,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Connects to the socket at `path` without waiting: a listener whose
/// backlog is full (a hung backend that accepts nothing) answers EAGAIN,
/// taken as "not now" (Ok(None)); a blocking connect would wait for ever.
/// Written by hand: std's connect blocks and has no timeout for UNIX
/// sockets.
fn try_connect(path: &std::path::Path) -> std::io::Result<Option<UnixStream>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the socket path is too long",
        ));
    }
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: addr is a valid sockaddr_un of the length passed.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(None);
        }
        return Err(e);
    }
    let stream = UnixStream::from(sock);
    stream.set_nonblocking(false)?;
    Ok(Some(stream))
}

/// Connects to `path`, or waits for a backend on `listener`, until
/// `deadline`.
fn open_socket(
    path: &std::path::Path,
    listener: Option<&UnixListener>,
    deadline: Instant,
) -> Result<UnixStream, String> {
    loop {
        let attempt = match listener {
            Some(l) => match l.accept() {
                Ok((s, _)) if devices::unix_socket::peer_allowed(&s) => Ok(Some(s)),
                Ok(_) => {
                    devices::limited!(
                        warn,
                        "{}: a backend of another user connected: refused",
                        path.display()
                    );
                    Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(io_err("accepting the backend", e)),
            },
            None => match try_connect(path) {
                Ok(s) => Ok(s),
                // a socket nobody listens on yet: the backend may be
                // starting beside this VM
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
                    "no socket there (start the backend first, or use mode=server and let it connect)"
                        .into(),
                ),
                Err(e) => Err(io_err("connecting", e)),
            },
        }?;
        if let Some(s) = attempt {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(if listener.is_some() {
                "no backend connected in time".into()
            } else {
                "no backend answered in time (is it running, listening there?)".into()
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deadlines for requests to the backend. The vhost crate's frontend
/// retries a read that timed out for ever, so a socket timeout cannot end
/// a request a backend never answers: this thread shuts the socket down
/// when a request outlives its deadline, and the request fails.
pub struct Watchdog {
    state: std::sync::Mutex<WatchState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct WatchState {
    armed: Option<(Instant, i32)>,
    fired: bool,
    quit: bool,
}

impl Watchdog {
    fn start(name: &str) -> Result<Arc<Watchdog>, String> {
        let w = Arc::new(Watchdog {
            state: Default::default(),
            wake: std::sync::Condvar::new(),
        });
        let me = w.clone();
        seccomp::spawn(
            format!("vhost-user {name} deadline"),
            seccomp::Role::DeviceWorker,
            move || me.run(),
        )
        .map_err(|e| format!("starting the request deadline thread: {e}"))?;
        Ok(w)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.quit {
                return;
            }
            st = match st.armed {
                None => self.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some((deadline, fd)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        // SAFETY: shutdown on the duplicate `guard` holds
                        // open until it has disarmed (under this lock); it
                        // touches no memory.
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                        st.armed = None;
                        st.fired = true;
                        continue;
                    }
                    self.wake
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Runs `request` (`what`) on the socket `fd` under REQUEST_DEADLINE.
    fn guard<T>(
        &self,
        fd: i32,
        what: &str,
        request: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        use std::os::fd::{FromRawFd, OwnedFd};
        // armed on a duplicate held until disarmed: the request may close
        // its own descriptor, and a number closed and reused must not be
        // shut down (shutdown acts on the socket, which both share)
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller holds open;
        // the result is checked and owned here.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(format!("{what}: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        {
            let mut st = self.lock();
            st.armed = Some((Instant::now() + REQUEST_DEADLINE, dup.as_raw_fd()));
            st.fired = false;
        }
        self.wake.notify_all();
        let result = request();
        let mut st = self.lock();
        st.armed = None;
        let fired = std::mem::take(&mut st.fired);
        drop(st);
        drop(dup);
        let late = || {
            format!(
                "the backend did not answer within {} s",
                REQUEST_DEADLINE.as_secs()
            )
        };
        match result {
            // answered as the deadline passed: the socket is shut down all
            // the same, so the answer is not trusted to the next request
            Ok(_) if fired => Err(format!("{what}: {}", late())),
            Ok(v) => Ok(v),
            Err(e) if fired => Err(format!("{what}: {e}: {}", late())),
            Err(e) => Err(e),
        }
    }

    fn quit(&self) {
        self.lock().quit = true;
        self.wake.notify_all();
    }
}

/// A listener's socket this process bound: removed when dropped.
struct Unbind(PathBuf);

impl Drop for Unbind {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Ends the watchdog's thread when the device (or its failed start) ends.
struct StopWatchdog(Arc<Watchdog>);

impl Drop for StopWatchdog {
    fn drop(&mut self) {
        self.0.quit();
    }
}

/// SET_OWNER, the features and the protocol features on a fresh socket.
fn negotiate(stream: UnixStream, watchdog: &Watchdog) -> Result<Connection, String> {
    let fd = stream.as_raw_fd();
    watchdog.guard(fd, "negotiating", || negotiate_unguarded(stream))
}

fn negotiate_unguarded(stream: UnixStream) -> Result<Connection, String> {
    stream
        .set_write_timeout(Some(REQUEST_DEADLINE))
        .map_err(|e| io_err("socket deadlines", e))?;
    let watch = stream.try_clone().map_err(|e| io_err("socket", e))?;
    let mut frontend = Frontend::from_stream(stream, 2 * MAX_PAIRS as u64);
    frontend.set_owner().map_err(|e| io_err("SET_OWNER", e))?;
    let features = frontend
        .get_features()
        .map_err(|e| io_err("GET_FEATURES", e))?;
    if features & crate::F_VERSION_1 == 0 {
        return Err(format!(
            "the backend does not offer VIRTIO_F_VERSION_1 (features {features:#x})"
        ));
    }
    let protocol = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
    let (mut log_shmfd, mut rarp, mut pairs) = (false, false, 1);
    if protocol {
        let offered = frontend
            .get_protocol_features()
            .map_err(|e| io_err("GET_PROTOCOL_FEATURES", e))?;
        // REPLY_ACK: every request that changes the backend is answered,
        // so a refusal is seen at the request, not later
        let wanted = offered
            & (VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::RARP
                | VhostUserProtocolFeatures::MQ);
        log_shmfd = wanted.contains(VhostUserProtocolFeatures::LOG_SHMFD);
        rarp = wanted.contains(VhostUserProtocolFeatures::RARP);
        let mq = wanted.contains(VhostUserProtocolFeatures::MQ);
        frontend
            .set_protocol_features(wanted)
            .map_err(|e| io_err("SET_PROTOCOL_FEATURES", e))?;
        if wanted.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // every request from now on is answered: a refusal is seen at
            // the request, and a migration's logging is on before the
            // first round reads a page
            frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        }
        if mq {
            // sent by hand: the crate would take the answer (queue pairs,
            // as DPDK and QEMU read it) as its limit on ring indices
            let answer = raw_request(&watch, GET_QUEUE_NUM, &[], None)
                .and_then(|_| raw_answer(&watch, GET_QUEUE_NUM))
                .map_err(|e| io_err("GET_QUEUE_NUM", e))?;
            let word: [u8; 8] = answer
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("GET_QUEUE_NUM answered {} bytes", answer.len()))?;
            pairs = u64::from_le_bytes(word);
        }
    }
    Ok(Connection {
        frontend,
        watch,
        features,
        protocol,
        log_shmfd,
        rarp,
        pairs,
    })
}

/// The dirty log, shared by the backend thread (which makes it and hands
/// it to backends) and the device (which harvests it without a round trip
/// to the thread: a harvest that waited for a busy thread and gave up
/// would lose the pages it then cleared).
type SharedLog = Arc<std::sync::Mutex<Option<DirtyLog>>>;

fn lock_log(log: &SharedLog) -> std::sync::MutexGuard<'_, Option<DirtyLog>> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// The log a backend marks the guest pages it writes in during a
/// migration: one bit per 4 KiB guest-physical page, in a memfd both
/// processes map.
struct DirtyLog {
    map: vm_memory::mmap::MmapRegion<()>,
    len: usize,
}

impl DirtyLog {
    /// A log covering guest-physical pages 0..`pages`.
    fn new(pages: u64) -> Result<DirtyLog, String> {
        let len = pages.div_ceil(64) as usize;
        let bytes = (len * 8).next_multiple_of(4096);
        // SAFETY: the name is a NUL-terminated string memfd_create only reads.
        let fd = unsafe { libc::memfd_create(c"nfvisor-vhost-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "the dirty log's memfd: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd was just created and nothing else owns it.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(bytes as u64)
            .map_err(|e| format!("sizing the dirty log to {bytes} bytes: {e}"))?;
        let map = vm_memory::mmap::MmapRegion::build(
            Some(vm_memory::FileOffset::new(file, 0)),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| format!("mapping the dirty log: {e}"))?;
        Ok(DirtyLog { map, len })
    }

    fn fd(&self) -> i32 {
        self.map.file_offset().map_or(-1, |f| f.file().as_raw_fd())
    }

    fn bytes(&self) -> u64 {
        self.map.size() as u64
    }

    /// Takes the pages marked since the last call (the backend sets bits
    /// with atomic byte ORs; each word is read and cleared at once).
    fn harvest(&self) -> Vec<(u64, u64)> {
        let words = self.map.as_ptr() as *const AtomicU64;
        let mut out = Vec::new();
        for i in 0..self.len {
            // SAFETY: i < len, so the word lies inside the page-aligned
            // mapping (aligned for AtomicU64), alive while self is; the
            // other process writes it only with atomic operations.
            let w = unsafe { &*words.add(i) };
            if w.load(Ordering::Relaxed) != 0 {
                out.push((i as u64 * 64, w.swap(0, Ordering::AcqRel)));
            }
        }
        out
    }
}

/// Sends a request on the socket itself, for those the vhost crate's
/// frontend lacks (SEND_RARP) or gets wrong with DPDK (SET_LOG_BASE: the
/// crate waits for a 16-byte answer, DPDK answers with an empty one, as
/// QEMU expects). Only the backend thread talks on the socket, so the
/// crate's frontend is idle meanwhile.
fn raw_request(
    sock: &UnixStream,
    request: u32,
    body: &[u8],
    fd: Option<i32>,
) -> Result<(), String> {
    use std::io::Write;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes()); // version 1
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    let sent = match fd {
        Some(fd) => sock
            .send_with_fd(&msg[..], fd)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None => (&*sock).write_all(&msg).map_err(|e| e.to_string()),
    };
    sent.map_err(|e| format!("request {request}: {e}"))
}

/// The answer to `request` sent by `raw_request`: a header, and a body of
/// whatever size the backend chose (up to 64 bytes).
fn raw_answer(sock: &UnixStream, request: u32) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut hdr = [0u8; 12];
    (&*sock)
        .read_exact(&mut hdr)
        .map_err(|e| format!("the answer to request {request}: {e}"))?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (answered, flags, size) = (word(0), word(4), word(8));
    if answered != request || flags & 0x4 == 0 || size > 64 {
        return Err(format!(
            "request {request} answered as request {answered}, flags {flags:#x}, {size} bytes"
        ));
    }
    let mut body = vec![0u8; size as usize];
    (&*sock)
        .read_exact(&mut body)
        .map_err(|e| format!("the answer to request {request}: {e}"))?;
    Ok(body)
}

const SET_LOG_BASE: u32 = 6;
const GET_QUEUE_NUM: u32 = 17;
const SEND_RARP: u32 = 19;

/// SET_LOG_BASE: the log's memfd, its size, offset 0.
fn set_log_base(conn: &Connection, log: &DirtyLog) -> Result<(), String> {
    let mut body = Vec::with_capacity(16);
    body.extend_from_slice(&log.bytes().to_le_bytes()); // mmap_size
    body.extend_from_slice(&0u64.to_le_bytes()); // mmap_offset
    raw_request(&conn.watch, SET_LOG_BASE, &body, Some(log.fd()))
        .and_then(|_| raw_answer(&conn.watch, SET_LOG_BASE))
        .map(|_| ())
        .map_err(|e| io_err("SET_LOG_BASE", e))
}

/// SEND_RARP: the backend broadcasts a RARP from `mac`, so switches learn
/// where the guest now is (no answer is asked for).
fn send_rarp(conn: &Connection, mac: &[u8; 6]) -> Result<(), String> {
    let mut body = [0u8; 8];
    body[..6].copy_from_slice(mac);
    raw_request(&conn.watch, SEND_RARP, &body, None).map_err(|e| io_err("SEND_RARP", e))
}

/// The guest memory table: each region's memfd, its offset and where this
/// process maps it.
fn memory_table<M: GuestMemoryBackend>(mem: &M) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
    mem.iter()
        .map(|r| {
            let fo = r.file_offset().ok_or_else(|| {
                format!(
                    "guest memory at {:#x} is not backed by a file a backend can map",
                    r.start_addr().0
                )
            })?;
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| format!("{e}"))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: host as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            })
        })
        .collect()
}

/// Where this process maps the `len` guest bytes at `gpa` (one region).
fn host_addr<M: GuestMemoryBackend>(
    mem: &M,
    gpa: u64,
    len: usize,
    what: &str,
) -> Result<u64, String> {
    let bad = || format!("{what} at {gpa:#x} ({len} bytes) is not within one guest memory region");
    let (region, _) = mem.to_region_addr(GuestAddress(gpa)).ok_or_else(bad)?;
    let end = gpa.checked_add(len as u64).ok_or_else(bad)?;
    if end > region.start_addr().0 + region.len() {
        return Err(bad());
    }
    mem.get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|e| format!("{what} at {gpa:#x}: {e}"))
}

/// The features the backend is given: what the guest accepted, less what
/// this process answers, with LOG_ALL while a migration logs.
fn backend_features<M>(
    conn: &Connection,
    setup: &Setup<M>,
    log: Option<&DirtyLog>,
) -> Result<u64, String> {
    // the control queue is served here; MQ goes on where the backend
    // knows it (multiqueue itself is PROTOCOL_F_MQ's)
    let own = OWN | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_MQ;
    let missing = setup.acked & !own & !conn.features;
    if missing != 0 {
        return Err(format!(
            "the backend does not offer features {missing:#x} the guest accepted"
        ));
    }
    let mut features = setup.acked & !own | setup.acked & conn.features & 1 << VIRTIO_NET_F_MQ;
    if conn.protocol {
        features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    }
    if log.is_some() {
        if !conn.log_shmfd {
            return Err(NO_LOG.into());
        }
        features |= VhostUserVirtioFeatures::LOG_ALL.bits();
    }
    Ok(features)
}

/// SET_VRING_ADDR for ring `r`, logging its used ring's writes with `log`.
fn set_ring_addr<M: GuestMemoryBackend>(
    conn: &Connection,
    setup: &Setup<M>,
    r: &Ring,
    log: Option<&DirtyLog>,
) -> Result<(), String> {
    let q = r.size as usize;
    let config = VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: r.size,
        // VHOST_VRING_F_LOG
        flags: log.is_some() as u32,
        desc_table_addr: host_addr(&setup.mem, r.desc, 16 * q, "descriptor table")?,
        used_ring_addr: host_addr(&setup.mem, r.used, 6 + 8 * q, "used ring")?,
        avail_ring_addr: host_addr(&setup.mem, r.avail, 6 + 2 * q, "available ring")?,
        log_addr: log.map(|_| r.used),
    };
    conn.frontend
        .set_vring_addr(r.index, &config)
        .map_err(|e| io_err("SET_VRING_ADDR", e))
}

/// Sets the rings up on `conn` from `setup`, each starting at `bases`;
/// with `log`, the backend logs the pages it writes there.
fn set_up<M: GuestMemoryBackend>(
    conn: &Connection,
    setup: &Setup<M>,
    bases: &[u16],
    log: Option<&DirtyLog>,
) -> Result<(), String> {
    let fe = &conn.frontend;
    fe.set_features(backend_features(conn, setup, log)?)
        .map_err(|e| io_err("SET_FEATURES", e))?;
    fe.set_mem_table(&memory_table(&setup.mem)?)
        .map_err(|e| io_err("SET_MEM_TABLE", e))?;
    if let Some(log) = log {
        set_log_base(conn, log)?;
    }
    for (r, base) in setup.rings.iter().zip(bases) {
        let i = r.index;
        fe.set_vring_num(i, r.size)
            .map_err(|e| io_err("SET_VRING_NUM", e))?;
        set_ring_addr(conn, setup, r, log)?;
        fe.set_vring_base(i, *base)
            .map_err(|e| io_err("SET_VRING_BASE", e))?;
        let call = match &r.call {
            Some(c) => c,
            None => {
                &setup
                    .relay
                    .iter()
                    .find(|(q, _)| *q as usize == i)
                    .ok_or("a ring with no call eventfd")?
                    .1
            }
        };
        fe.set_vring_call(i, call)
            .map_err(|e| io_err("SET_VRING_CALL", e))?;
        fe.set_vring_kick(i, &r.kick)
            .map_err(|e| io_err("SET_VRING_KICK", e))?;
    }
    if conn.protocol {
        // with PROTOCOL_FEATURES the rings start disabled: those of the
        // pairs the guest turned on go on
        enable_pairs(conn, setup)?;
    }
    Ok(())
}

/// SET_VRING_ENABLE for every ring: on for the pairs the guest turned on.
fn enable_pairs<M>(conn: &Connection, setup: &Setup<M>) -> Result<(), String> {
    enable_rings(conn, &setup.rings, setup.pairs_on.load(Ordering::Acquire))
}

/// SET_VRING_ENABLE for every ring: on for pairs 0..`on`.
fn enable_rings(conn: &Connection, rings: &[Ring], on: u16) -> Result<(), String> {
    let on = on as usize;
    // (the crate's frontend takes &mut for this request; a clone shares
    // the one connection)
    let mut fe = conn.frontend.clone();
    for r in rings {
        fe.set_vring_enable(r.index, r.index / 2 < on)
            .map_err(|e| io_err("SET_VRING_ENABLE", e))?;
    }
    Ok(())
}

/// Turns a running backend's logging on (`log`) or off, as a migration
/// starts or ends: the log, LOG_ALL, and the rings' used-ring logging.
fn set_logging<M: GuestMemoryBackend>(
    conn: &Connection,
    setup: &Setup<M>,
    log: Option<&DirtyLog>,
) -> Result<(), String> {
    if let Some(log) = log {
        set_log_base(conn, log)?;
    }
    conn.frontend
        .set_features(backend_features(conn, setup, log)?)
        .map_err(|e| io_err("SET_FEATURES", e))?;
    for r in &setup.rings {
        set_ring_addr(conn, setup, r, log)?;
    }
    Ok(())
}

/// Where ring `r`'s used index stands in guest memory.
fn used_index<M: GuestMemoryBackend>(mem: &M, r: &Ring) -> Option<u16> {
    use vm_memory::Bytes;
    mem.read_obj::<u16>(GuestAddress(r.used.checked_add(2)?))
        .ok()
}

/// The thread that owns the backend connection.
struct Backend<M> {
    name: String,
    socket: PathBuf,
    listener: Option<UnixListener>,
    conn: Option<Connection>,
    setup: Option<Setup<M>>,
    link_up: Arc<AtomicBool>,
    counters: Arc<VhostUserCounters>,
    commands: mpsc::Receiver<Command<M>>,
    epoll: Epoll,
    retry: TimerFd,
    watchdog: Arc<Watchdog>,
    /// Queue pairs asked (`queues=`): a backend that comes back must
    /// serve them.
    pairs: u16,
    /// A migration is on: every backend logs the pages it writes.
    logging: bool,
    /// The log, made once the guest memory is known (first activation).
    log: SharedLog,
}

const T_STOP: u64 = 0;
const T_COMMAND: u64 = 1;
const T_HANGUP: u64 = 2;
const T_LISTENER: u64 = 3;
const T_RETRY: u64 = 4;
const T_CTRL: u64 = 5;
const T_RELAY: u64 = 100;

impl<M: GuestMemoryBackend + Clone + Send + 'static> Backend<M> {
    fn watch(&self, fd: i32, token: u64, events: EventSet) -> Result<(), String> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(|e| io_err("epoll", e))
    }

    fn unwatch(&self, fd: i32) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn adopt(&mut self, conn: Connection) -> Result<(), String> {
        self.watch(
            conn.watch.as_raw_fd(),
            T_HANGUP,
            EventSet::READ_HANG_UP | EventSet::HANG_UP,
        )?;
        self.conn = Some(conn);
        Ok(())
    }

    /// The backend is gone (or failed a request): the link goes down, the
    /// connection is dropped, and coming back is looked for.
    fn lost(&mut self, why: &str) {
        if let Some(c) = self.conn.take() {
            self.unwatch(c.watch.as_raw_fd());
            self.counters.disconnects.fetch_add(1, Ordering::Relaxed);
            devices::limited!(
                warn,
                "{}: backend {} lost ({why}): link down, the VM runs on",
                self.name,
                self.socket.display()
            );
        }
        self.set_link(false);
        self.look_for_backend();
    }

    fn set_link(&self, up: bool) {
        if self.link_up.swap(up, Ordering::AcqRel) != up {
            if let Some(s) = &self.setup {
                s.interrupt.config();
            }
        }
    }

    fn look_for_backend(&mut self) {
        if let Some(l) = &self.listener {
            let _ = self.watch(l.as_raw_fd(), T_LISTENER, EventSet::IN);
        } else {
            let _ = self.retry.reset(RECONNECT_EVERY, Some(RECONNECT_EVERY));
        }
    }

    /// A backend is back: negotiated, and given the rings where the guest's
    /// used rings stand (the old backend cannot say more).
    fn came_back(&mut self, stream: UnixStream) {
        if let Some(l) = &self.listener {
            self.unwatch(l.as_raw_fd());
        } else {
            let _ = self.retry.reset(Duration::ZERO, None);
        }
        let made = self.ensure_log();
        let result = made
            .and_then(|_| negotiate(stream, &self.watchdog))
            .and_then(|conn| {
                if conn.pairs < self.pairs as u64 {
                    return Err(format!(
                        "it serves {} queue pair(s), {} asked",
                        conn.pairs, self.pairs
                    ));
                }
                if let Some(setup) = &self.setup {
                    let bases: Vec<u16> = setup
                        .rings
                        .iter()
                        .map(|r| used_index(&setup.mem, r).unwrap_or(0))
                        .collect();
                    self.counters
                        .positions_from_used
                        .fetch_add(bases.len() as u64, Ordering::Relaxed);
                    let fd = conn.watch.as_raw_fd();
                    let log = lock_log(&self.log);
                    let log = log.as_ref().filter(|_| self.logging);
                    self.watchdog
                        .guard(fd, "setting up", || set_up(&conn, setup, &bases, log))?;
                }
                Ok(conn)
            });
        match result {
            Ok(conn) => {
                if let Err(e) = self.adopt(conn) {
                    self.lost(&e);
                    return;
                }
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                self.announce();
                tracing::info!(
                    "{}: backend {} is back: link up",
                    self.name,
                    self.socket.display()
                );
                self.set_link(true);
            }
            Err(e) => {
                self.counters
                    .failed_requests
                    .fetch_add(1, Ordering::Relaxed);
                devices::limited!(warn, "{}: a returning backend failed: {e}", self.name);
                self.look_for_backend();
            }
        }
    }

    fn activate(&mut self, setup: Setup<M>) -> Result<(), String> {
        for (q, e) in &setup.relay {
            self.watch(e.as_raw_fd(), T_RELAY + *q as u64, EventSet::IN)?;
        }
        if let Some(c) = &setup.ctrl {
            self.watch(c.kick.as_raw_fd(), T_CTRL, EventSet::IN)?;
        }
        let bases: Vec<u16> = setup.rings.iter().map(|r| r.base).collect();
        self.setup = Some(setup);
        let result = self.ensure_log().and_then(|_| {
            let (Some(conn), Some(setup)) = (&self.conn, &self.setup) else {
                // no backend now: the rings go to it when it is back
                return Ok(());
            };
            let log = lock_log(&self.log);
            let log = log.as_ref().filter(|_| self.logging);
            self.watchdog
                .guard(conn.watch.as_raw_fd(), "setting up", || {
                    set_up(conn, setup, &bases, log)
                })
        });
        match &result {
            Ok(()) => self.announce(),
            Err(e) => {
                self.counters
                    .failed_requests
                    .fetch_add(1, Ordering::Relaxed);
                self.lost(e);
            }
        }
        // the guest runs either way; the link says whether frames flow
        Ok(())
    }

    /// A restored guest's MAC, announced once its rings run on a backend.
    fn announce(&mut self) {
        let Some(conn) = &self.conn else { return };
        let Some(mac) = self.setup.as_mut().and_then(|s| s.announce.take()) else {
            return;
        };
        if !conn.rarp {
            devices::limited!(
                info,
                "{}: the backend cannot announce the guest's MAC (no PROTOCOL_F_RARP)",
                self.name
            );
            return;
        }
        let fd = conn.watch.as_raw_fd();
        match self
            .watchdog
            .guard(fd, "SEND_RARP", || send_rarp(conn, &mac))
        {
            Ok(()) => {
                self.counters.announces.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters
                    .failed_requests
                    .fetch_add(1, Ordering::Relaxed);
                self.lost(&e);
            }
        }
    }

    /// Answers the control queue's commands: VQ_PAIRS_SET turns the
    /// backend's rings on and off; anything else is answered ERR.
    fn serve_ctrl(&mut self) {
        let Some(setup) = self.setup.as_mut() else {
            return;
        };
        let mq = setup.acked & 1 << VIRTIO_NET_F_MQ != 0;
        let Setup {
            mem,
            rings,
            pairs_on,
            ctrl,
            interrupt,
            max_pairs,
            ..
        } = setup;
        let Some(ctrl) = ctrl.as_mut() else {
            return;
        };
        let _ = ctrl.kick.read();
        let (conn, watchdog) = (&self.conn, &self.watchdog);
        let mut failed = None;
        // the backend's rings change before the driver hears OK
        let mut apply = |cmd: CtrlCommand| -> bool {
            let CtrlCommand::Pairs(n) = cmd else {
                return false;
            };
            let done = match conn {
                Some(conn) => watchdog.guard(conn.watch.as_raw_fd(), "SET_VRING_ENABLE", || {
                    enable_rings(conn, rings, n)
                }),
                // the backend gets them when it is back
                None => Ok(()),
            };
            match done {
                Ok(()) => {
                    pairs_on.store(n, Ordering::Release);
                    true
                }
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        };
        let offer = CtrlOffer {
            mq,
            max_pairs: *max_pairs,
            ..CtrlOffer::default()
        };
        let served = serve_ctrl_queue(mem, &mut ctrl.queue, &offer, &mut apply);
        if let Err(why) = &served.broken {
            devices::limited!(warn, "{}: control queue: {why}", self.name);
        }
        for why in &served.refused {
            devices::limited!(warn, "{}: control queue: {why}", self.name);
        }
        if served.answered > 0 {
            let _ = crate::signal_used(&mut ctrl.queue, mem, interrupt.as_ref(), ctrl.index);
        }
        if let Some(e) = failed {
            self.counters
                .failed_requests
                .fetch_add(1, Ordering::Relaxed);
            self.lost(&e);
        }
    }

    /// While logging, the log exists once the guest memory is known.
    fn ensure_log(&mut self) -> Result<(), String> {
        if !self.logging || lock_log(&self.log).is_some() {
            return Ok(());
        }
        let Some(setup) = &self.setup else {
            return Ok(());
        };
        let pages = setup
            .mem
            .iter()
            .map(|r| (r.start_addr().0 + r.len()).div_ceil(4096))
            .max()
            .unwrap_or(0);
        *lock_log(&self.log) = Some(DirtyLog::new(pages)?);
        Ok(())
    }

    /// A migration starts (`on`) or ends: the backend logs, or stops.
    fn set_log(&mut self, on: bool) -> Result<(), String> {
        if !on && !self.logging {
            return Ok(());
        }
        if on {
            if let Some(c) = &self.conn {
                if !c.log_shmfd {
                    return Err(NO_LOG.into());
                }
            }
        }
        self.logging = on;
        if let Err(e) = self.ensure_log() {
            // this host's failure (memory, descriptors), not the backend's
            self.logging = false;
            return Err(e);
        }
        let result = (|| {
            let (Some(conn), Some(setup)) = (&self.conn, &self.setup) else {
                return Ok(());
            };
            let log = lock_log(&self.log);
            let log = log.as_ref().filter(|_| on);
            self.watchdog
                .guard(conn.watch.as_raw_fd(), "dirty logging", || {
                    set_logging(conn, setup, log)
                })
        })();
        if !on {
            *lock_log(&self.log) = None;
        }
        if let Err(e) = &result {
            self.counters
                .failed_requests
                .fetch_add(1, Ordering::Relaxed);
            if on {
                self.logging = false;
                *lock_log(&self.log) = None;
            }
            self.lost(e);
        }
        result
    }

    fn stop(&mut self) -> (Vec<Option<u16>>, Option<virtio_queue::Queue>) {
        let Some(mut setup) = self.setup.take() else {
            return (Vec::new(), None);
        };
        for (_, e) in &setup.relay {
            self.unwatch(e.as_raw_fd());
        }
        let ctrl = setup.ctrl.take().map(|c| {
            self.unwatch(c.kick.as_raw_fd());
            c.queue
        });
        let mut failed = None;
        let bases = setup
            .rings
            .iter()
            .map(|r| {
                let conn = self.conn.as_ref()?;
                if failed.is_some() {
                    return None;
                }
                let asked = self
                    .watchdog
                    .guard(conn.watch.as_raw_fd(), "GET_VRING_BASE", || {
                        conn.frontend
                            .get_vring_base(r.index)
                            .map_err(|e| io_err("GET_VRING_BASE", e))
                    });
                match asked {
                    Ok(b) if b <= u16::MAX as u32 => Some(b as u16),
                    Ok(b) => {
                        failed = Some(format!("GET_VRING_BASE answered {b}"));
                        None
                    }
                    Err(e) => {
                        failed = Some(e);
                        None
                    }
                }
            })
            .collect();
        if let Some(why) = failed {
            self.counters
                .failed_requests
                .fetch_add(1, Ordering::Relaxed);
            // keep the interrupt to tell the guest the link went down
            self.setup = Some(setup);
            self.lost(&why);
            self.setup = None;
        }
        (bases, ctrl)
    }

    fn run(mut self, stop: EventFd, wake: EventFd) {
        let ok = self.watch(stop.as_raw_fd(), T_STOP, EventSet::IN).is_ok()
            && self
                .watch(wake.as_raw_fd(), T_COMMAND, EventSet::IN)
                .is_ok()
            && self
                .watch(self.retry.as_raw_fd(), T_RETRY, EventSet::IN)
                .is_ok();
        if !ok {
            tracing::error!(
                "{}: the backend thread cannot wait on its events",
                self.name
            );
            return;
        }
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: epoll: {e}", self.name);
                    return;
                }
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    T_STOP => return,
                    T_COMMAND => {
                        let _ = wake.read();
                        while let Ok(cmd) = self.commands.try_recv() {
                            match cmd {
                                Command::Activate(setup, reply) => {
                                    let _ = reply.send(self.activate(setup));
                                }
                                Command::Stop(reply) => {
                                    let _ = reply.send(self.stop());
                                }
                                Command::Log(on, reply) => {
                                    let _ = reply.send(self.set_log(on));
                                }
                            }
                        }
                    }
                    T_HANGUP => self.lost("the socket closed"),
                    T_CTRL => self.serve_ctrl(),
                    T_LISTENER => {
                        let accepted = self.listener.as_ref().map(|l| l.accept());
                        match accepted {
                            Some(Ok((s, _))) if devices::unix_socket::peer_allowed(&s) => {
                                self.came_back(s)
                            }
                            Some(Ok(_)) => devices::limited!(
                                warn,
                                "{}: a backend of another user connected: refused",
                                self.name
                            ),
                            _ => {}
                        }
                    }
                    T_RETRY => {
                        let _ = self.retry.wait();
                        if self.conn.is_none() {
                            if let Ok(Some(s)) = try_connect(&self.socket) {
                                self.came_back(s);
                            }
                        }
                    }
                    t if t >= T_RELAY => {
                        let q = (t - T_RELAY) as u16;
                        if let Some(setup) = &self.setup {
                            if let Some((_, e)) = setup.relay.iter().find(|(i, _)| *i == q) {
                                let _ = e.read();
                                setup.interrupt.queue(q);
                                self.counters
                                    .relayed_interrupts
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> VhostUserNet<M> {
    /// Connects to the backend (or waits for it, server mode) and
    /// negotiates; `name` is the device's (net0). Err: no backend within
    /// `connect_timeout`, or one this device cannot use (why).
    pub fn new(name: &str, config: VhostUserNetConfig) -> Result<Self, String> {
        let at = |e: String| format!("vhost-user {}: {e}", config.socket.display());
        // the listener's socket goes if the start fails after binding it
        let mut bound = None;
        let listener = if config.server {
            let l = devices::unix_socket::bind_private(&config.socket)
                .map_err(|e| at(io_err("listening", e)))?;
            bound = Some(Unbind(config.socket.clone()));
            l.set_nonblocking(true)
                .map_err(|e| at(io_err("listening", e)))?;
            Some(l)
        } else {
            if let Ok(m) = std::fs::metadata(&config.socket) {
                use std::os::unix::fs::FileTypeExt;
                if !m.file_type().is_socket() {
                    return Err(at("not a socket".into()));
                }
            }
            None
        };
        let deadline = Instant::now() + config.connect_timeout;
        let stream = open_socket(&config.socket, listener.as_ref(), deadline).map_err(at)?;
        let watchdog = StopWatchdog(Watchdog::start(name).map_err(at)?);
        let conn = negotiate(stream, &watchdog.0).map_err(at)?;
        if config.pairs > 1 && conn.pairs < config.pairs as u64 {
            return Err(at(format!(
                "queues={} asked, the backend serves {} queue pair(s){}",
                config.pairs,
                conn.pairs,
                if conn.pairs == 1 {
                    " (no PROTOCOL_F_MQ, or one pair)"
                } else {
                    ""
                }
            )));
        }
        let backend_features = conn.features & PASSED_THROUGH;
        let (commands, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| at(e.to_string()))?;
        let link_up = Arc::new(AtomicBool::new(true));
        let counters = Arc::new(VhostUserCounters::default());
        let logged_pages = Arc::new(AtomicU64::new(0));
        let log = SharedLog::default();
        let mut backend = Backend {
            name: name.to_string(),
            socket: config.socket.clone(),
            listener,
            conn: None,
            setup: None,
            link_up: link_up.clone(),
            counters: counters.clone(),
            commands: rx,
            epoll: Epoll::new().map_err(|e| at(e.to_string()))?,
            retry: TimerFd::new().map_err(|e| at(e.to_string()))?,
            watchdog: watchdog.0.clone(),
            pairs: config.pairs.max(1),
            logging: false,
            log: log.clone(),
        };
        backend.adopt(conn).map_err(at)?;
        let (stop, worker_stop) = crate::worker_stop_pair()?;
        let worker_wake = wake.try_clone().map_err(|e| at(e.to_string()))?;
        let worker = WorkerThread::spawn(
            format!("vhost-user {name}"),
            seccomp::Role::DeviceWorker,
            stop,
            move || backend.run(worker_stop, worker_wake),
        )?;
        Ok(VhostUserNet {
            config,
            name: name.to_string(),
            backend_features,
            link_up,
            counters,
            commands,
            wake,
            worker: Some(worker),
            _watchdog: watchdog,
            _bound: bound,
            logged_pages,
            log,
            announce: false,
            pairs_on: Arc::new(AtomicU16::new(1)),
            data_queues: 0,
            active: None,
            mem: None,
        })
    }

    fn ask<T>(&self, cmd: impl FnOnce(mpsc::Sender<T>) -> Command<M>) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(cmd(tx))
            .map_err(|_| format!("{}: the backend thread has ended", self.name))?;
        let _ = self.wake.write(1);
        // every request on the thread has its own deadline: this one
        // covers a whole set-up (a dozen requests)
        rx.recv_timeout(REQUEST_DEADLINE * 4)
            .map_err(|_| format!("{}: the backend thread did not answer", self.name))
    }
}

impl<M> Drop for VhostUserNet<M> {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl<M: GuestMemoryBackend + Clone + Send + Sync + 'static> VirtioDevice<M> for VhostUserNet<M> {
    fn device_type(&self) -> u16 {
        1
    }

    fn features(&self) -> u64 {
        let mut f = self.backend_features | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS;
        if self.config.pairs > 1 {
            f |= 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ;
        }
        if self.config.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    /// rx0, tx0, rx1, tx1, ... and, with more than one pair, the control
    /// queue.
    fn queue_max_sizes(&self) -> Vec<u16> {
        let pairs = self.config.pairs as usize;
        vec![QUEUE_SIZE; 2 * pairs + (pairs > 1) as usize]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = crate::net::nic_config_space(
            &self.config.mac,
            self.link_up.load(Ordering::Acquire),
            self.config.pairs.max(1),
            self.config.mtu,
        );
        crate::read_config_space(&space, offset, data);
    }

    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        acked: u64,
    ) -> Result<(), String> {
        // (2.7 of virtio-net: without MQ, one pair and the control queue
        // right after it)
        let mq = acked & 1 << VIRTIO_NET_F_MQ != 0;
        let ctrl_on = acked & 1 << VIRTIO_NET_F_CTRL_VQ != 0;
        let data = if mq {
            2 * self.config.pairs as usize
        } else {
            2
        };
        if queues.len() != data + ctrl_on as usize {
            return Err(format!(
                "virtio-net here needs every queue enabled: {} receive and transmit queues{} ({} enabled)",
                data,
                if ctrl_on { " and the control queue" } else { "" },
                queues.len()
            ));
        }
        if !mq {
            self.pairs_on.store(1, Ordering::Release);
        }
        let ctrl = match queues.get(data) {
            Some(aq) if ctrl_on => Some(CtrlQueue {
                queue: virtio_queue::Queue::try_from(aq.queue.state())
                    .map_err(|e| format!("the control queue: {e:?}"))?,
                kick: aq.kick.try_clone().map_err(|e| e.to_string())?,
                index: data as u16,
            }),
            _ => None,
        };
        let mut rings = Vec::new();
        let mut relay = Vec::new();
        for (i, aq) in queues.iter().enumerate().take(data) {
            let q = &aq.queue;
            let call = interrupt.queue_eventfd(i as u16);
            if call.is_none() {
                relay.push((
                    i as u16,
                    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
                ));
            }
            rings.push(Ring {
                index: i,
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                kick: aq.kick.try_clone().map_err(|e| e.to_string())?,
                call,
                base: q.next_avail(),
            });
        }
        let setup = Setup {
            mem: mem.clone(),
            interrupt,
            acked,
            rings,
            relay,
            announce: std::mem::take(&mut self.announce).then_some(self.config.mac),
            ctrl,
            pairs_on: self.pairs_on.clone(),
            max_pairs: self.config.pairs.max(1),
        };
        self.ask(|tx| Command::Activate(setup, tx))??;
        self.active = Some(queues);
        self.data_queues = data;
        self.mem = Some(mem);
        Ok(())
    }

    fn reset(&mut self) -> Vec<ActiveQueue> {
        let Some(mut queues) = self.active.take() else {
            return Vec::new();
        };
        let (bases, ctrl) = self.ask(Command::Stop).unwrap_or_default();
        let mem = self.mem.take();
        let data = std::mem::take(&mut self.data_queues);
        if let (Some(q), Some(aq)) = (ctrl, queues.get_mut(data)) {
            // the control queue as the thread that served it left it
            aq.queue = q;
        }
        for (i, aq) in queues.iter_mut().enumerate().take(data) {
            let used = mem
                .as_ref()
                .and_then(|m| aq.queue.used_idx(m, Ordering::Acquire).ok())
                .map(|w| w.0);
            match (bases.get(i).copied().flatten(), used) {
                (Some(b), Some(u)) => {
                    aq.queue.set_next_avail(b);
                    aq.queue.set_next_used(u);
                }
                (None, Some(u)) => {
                    // the backend could not say where it was: what it had
                    // taken but not completed is taken again
                    self.counters
                        .positions_from_used
                        .fetch_add(1, Ordering::Relaxed);
                    aq.queue.set_next_avail(u);
                    aq.queue.set_next_used(u);
                }
                _ => {}
            }
        }
        queues
    }

    /// The NIC's state as a TAP NIC's (so a guest moves between the two),
    /// and, with more than one pair, the pairs the guest turned on.
    fn state(&self) -> Vec<u8> {
        crate::net::nic_state_with_pairs(
            self.link_up.load(Ordering::Acquire),
            &self.config.mac,
            self.config.mtu,
            self.config.pairs,
            self.pairs_on.load(Ordering::Acquire),
            None,
        )
    }

    /// A restored guest (migration, snapshot): the link is this host's
    /// backend's, and the network learns where the MAC now is once the
    /// rings run (SEND_RARP).
    fn set_state(&mut self, state: &[u8]) -> Result<(), String> {
        // (the link is this host's backend's)
        let (_, pairs, _) = crate::net::check_nic_state_with_pairs(
            state,
            &self.config.mac,
            self.config.mtu,
            self.config.pairs,
            0,
        )?;
        self.pairs_on.store(pairs, Ordering::Release);
        self.announce = true;
        Ok(())
    }

    fn driver_reset(&mut self) {
        // (5.1.6.5.5: after a reset only the first pair is used)
        self.pairs_on.store(1, Ordering::Release);
    }

    fn dirty_log(&mut self, on: bool) -> Result<(), String> {
        self.ask(|tx| Command::Log(on, tx))?
    }

    fn harvest_dirty(&mut self, mark: &mut dyn FnMut(u64, u64)) -> u64 {
        let words = lock_log(&self.log)
            .as_ref()
            .map(DirtyLog::harvest)
            .unwrap_or_default();
        let mut pages = 0;
        for (first, bits) in words {
            pages += bits.count_ones() as u64;
            mark(first, bits);
        }
        self.logged_pages.fetch_add(pages, Ordering::Relaxed);
        pages
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("backend_disconnects", c.disconnects.load(Ordering::Relaxed)),
            ("backend_reconnects", c.reconnects.load(Ordering::Relaxed)),
            (
                "backend_failed_requests",
                c.failed_requests.load(Ordering::Relaxed),
            ),
            (
                "relayed_interrupts",
                c.relayed_interrupts.load(Ordering::Relaxed),
            ),
            (
                "positions_from_used",
                c.positions_from_used.load(Ordering::Relaxed),
            ),
            ("link_up", self.link_up.load(Ordering::Relaxed) as u64),
            ("announces", c.announces.load(Ordering::Relaxed)),
            ("logged_pages", self.logged_pages.load(Ordering::Relaxed)),
        ]
    }
}
