//! Structure-aware fuzz targets for what a guest can write to the virtio
//! devices: descriptor tables, available rings and the bytes behind them
//! (request headers, vsock packets, DISCARD ranges), built from
//! `arbitrary` input rather than raw bytes, and run through the devices'
//! real request handling on a mock queue in a test guest memory (as Cloud
//! Hypervisor's `fuzz/fuzz_targets/block.rs` does). The stable driver in
//! `crates/fuzz` runs them for a time budget and replays their corpora in
//! the suite; a target returns Err only for input it cannot use (it never
//! panics on any input: that is what is tested).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::Interrupt;

/// The test guest's memory.
const MEM_SIZE: u64 = 0x20_0000;
/// Where the guest's buffers lie (above the queues).
const DATA: u64 = 0x10_0000;

struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn queue(&self, _: u16) {}
    fn config(&self) {}
}

/// A guest address as a hostile driver picks one: inside its buffers,
/// straddling the end of memory, or outside it.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Addr {
    Data(u16),
    NearEnd(u8),
    Outside(u32),
    Raw(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::Data(o) => DATA + o as u64 * 8,
            Addr::NearEnd(o) => MEM_SIZE - o as u64,
            Addr::Outside(o) => MEM_SIZE + o as u64,
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Debug, Clone, Arbitrary)]
struct Desc {
    addr: Addr,
    len: u32,
    /// NEXT, WRITE, INDIRECT bits as the driver sets them.
    flags: u8,
    next: u8,
}

/// Bytes the driver wrote somewhere in its buffers.
#[derive(Debug, Clone, Arbitrary)]
struct Blob {
    at: u16,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, Arbitrary)]
struct QueueInput {
    descs: Vec<Desc>,
    /// The heads the available ring offers (may be out of range).
    heads: Vec<u16>,
    blobs: Vec<Blob>,
}

/// Lays `input` out in `mem` on a queue of `size` at `base`.
fn lay_out<'a>(
    mem: &'a GuestMemoryMmap,
    base: u64,
    size: u16,
    input: &QueueInput,
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    let vq = MockSplitQueue::create(mem, GuestAddress(base), size);
    for b in input.blobs.iter().take(64) {
        let at = DATA + b.at as u64 * 8;
        let n = b.bytes.len().min((MEM_SIZE - at) as usize).min(4096);
        let _ = mem.write_slice(&b.bytes[..n], GuestAddress(at));
    }
    for (i, d) in input.descs.iter().take(size as usize).enumerate() {
        let flags = d.flags as u16 & 0x7;
        let raw = RawDescriptor::from(SplitDescriptor::new(
            d.addr.get(),
            d.len % 0x2_0000,
            flags,
            d.next as u16 % size.max(1),
        ));
        let _ = vq.desc_table().store(i as u16, raw);
    }
    let heads: Vec<u16> = input.heads.iter().take(size as usize).copied().collect();
    for (i, h) in heads.iter().enumerate() {
        if let Ok(r) = vq.avail().ring().ref_at(i) {
            r.store(u16::to_le(*h % (size + 2)));
        }
    }
    vq.avail().idx().store(u16::to_le(heads.len() as u16));
    vq
}

/// Posts `heads` on the available ring, in order, and publishes them.
fn post(vq: &MockSplitQueue<GuestMemoryMmap>, heads: &[u16]) {
    for (i, h) in heads.iter().enumerate() {
        if let Ok(r) = vq.avail().ring().ref_at(i) {
            r.store(u16::to_le(*h));
        }
    }
    vq.avail().idx().store(u16::to_le(heads.len() as u16));
}

/// A small image every blk run shares (a file in the temporary directory).
fn image() -> &'static std::path::Path {
    static IMAGE: OnceLock<std::path::PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("nfv-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 << 10]).expect("the fuzz image");
        p
    })
}

/// A request as a driver builds one (header, data, status), maybe bent.
#[derive(Debug, Clone, Arbitrary)]
struct BlkReq {
    /// 0 IN, 1 OUT, 4 FLUSH, 8 GET_ID, 11 DISCARD, 13 WRITE_ZEROES, or any.
    kind: u8,
    raw_type: Option<u32>,
    sector: u16,
    far_sector: bool,
    data_len: u16,
    /// Data descriptors device-writable (right for IN and GET_ID).
    data_writable: bool,
    /// Split the data over this many descriptors.
    pieces: u8,
    /// DISCARD / WRITE_ZEROES ranges: (sector, count, flags).
    ranges: Vec<(u16, u16, u8)>,
    with_status: bool,
}

#[derive(Debug, Clone, Arbitrary)]
enum BlkInput {
    /// Whatever a hostile driver writes into the rings.
    Raw(QueueInput),
    /// Requests shaped as a driver shapes them, some bent.
    Requests(Vec<BlkReq>),
}

/// Lays well-formed chains for `reqs` into a queue of `size`.
fn lay_requests<'a>(
    mem: &'a GuestMemoryMmap,
    size: u16,
    reqs: &[BlkReq],
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let vq = MockSplitQueue::create(mem, GuestAddress(0), size);
    let mut di = 0u16;
    let mut heads = Vec::new();
    let mut at = DATA;
    for r in reqs.iter().take(16) {
        let ty = r.raw_type.unwrap_or(match r.kind % 7 {
            0 => 0,
            1 => 1,
            2 => 4,
            3 => 8,
            4 => 11,
            5 => 13,
            _ => r.kind as u32,
        });
        let sector = if r.far_sector {
            u64::MAX - r.sector as u64
        } else {
            r.sector as u64 % 160
        };
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        let mut chain: Vec<(u64, u32, u16)> = Vec::new();
        let _ = mem.write_slice(&hdr, GuestAddress(at));
        chain.push((at, 16, 0));
        at += 16;
        if ty == 11 || ty == 13 {
            let mut segs = Vec::new();
            for (s, n, f) in r.ranges.iter().take(40) {
                segs.extend_from_slice(&(*s as u64 % 200).to_le_bytes());
                segs.extend_from_slice(&(*n as u32 % 300).to_le_bytes());
                segs.extend_from_slice(&(*f as u32 % 4).to_le_bytes());
            }
            let _ = mem.write_slice(&segs, GuestAddress(at));
            chain.push((at, segs.len() as u32, 0));
            at += segs.len() as u64;
        } else if r.data_len > 0 {
            let len = r.data_len as u32 % 9000;
            let pieces = (r.pieces % 4 + 1) as u32;
            let each = len / pieces;
            for p in 0..pieces {
                let n = if p + 1 == pieces {
                    len - each * p
                } else {
                    each
                };
                let flags = if r.data_writable { WRITE } else { 0 };
                chain.push((at, n, flags));
                at += n as u64;
            }
        }
        if r.with_status {
            chain.push((at, 1, WRITE));
            at += 1;
        }
        if at > MEM_SIZE - 0x1_0000 || di as usize + chain.len() > size as usize {
            break;
        }
        heads.push(di);
        for (i, (a, l, f)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let raw = RawDescriptor::from(SplitDescriptor::new(
                *a,
                *l,
                if last { *f } else { *f | NEXT },
                if last { 0 } else { di + 1 },
            ));
            let _ = vq.desc_table().store(di, raw);
            di += 1;
        }
    }
    post(&vq, &heads);
    vq
}

/// virtio-blk: request chains through the worker (parse, I/O,
/// completion), raw or shaped as a driver shapes them, with every feature
/// negotiated or not.
pub fn blk(u: &mut Unstructured) -> arbitrary::Result<()> {
    let input = BlkInput::arbitrary(u)?;
    let (flush, discard, wz, readonly): (bool, bool, bool, bool) = Arbitrary::arbitrary(u)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("memory");
    let vq = match &input {
        BlkInput::Raw(q) => lay_out(&mem, 0, 64, q),
        BlkInput::Requests(r) => lay_requests(&mem, 64, r),
    };
    let disk = crate::disk::DiskImage::open(&crate::disk::DiskOptions {
        path: image().to_path_buf(),
        readonly,
        direct: false,
        lock_now: false,
    })
    .expect("the fuzz image opens");
    let Ok(queue) = vq.create_queue::<Queue>() else {
        return Ok(());
    };
    let engine = crate::block_io::engine(
        crate::block_io::EngineChoice::Auto,
        disk.file.as_raw_fd(),
        64,
    )
    .expect("an I/O engine");
    let mut w = crate::blk::fuzz_worker(
        mem.clone(),
        queue,
        Arc::new(disk),
        engine,
        (flush, discard, wz),
    );
    crate::blk::fuzz_run(&mut w, Duration::from_secs(2));
    Ok(())
}

/// virtio-vsock: arbitrary transmit chains (headers, payloads, ops, CIDs,
/// ports) and receive buffers through the worker.
pub fn vsock(u: &mut Unstructured) -> arbitrary::Result<()> {
    let tx = QueueInput::arbitrary(u)?;
    let rx = QueueInput::arbitrary(u)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("memory");
    let rxq = lay_out(&mem, 0, 32, &rx);
    let txq = lay_out(&mem, 0x2000, 32, &tx);
    let evq = MockSplitQueue::create(&mem, GuestAddress(0x4000), 4);
    let (Ok(rxq), Ok(txq), Ok(evq)) = (
        rxq.create_queue::<Queue>(),
        txq.create_queue::<Queue>(),
        evq.create_queue::<Queue>(),
    ) else {
        return Ok(());
    };
    crate::vsock::fuzz_run(mem, [rxq, txq, evq], listener());
    Ok(())
}

/// The vsock host socket every run shares.
fn listener() -> Arc<UnixListener> {
    static L: OnceLock<Arc<UnixListener>> = OnceLock::new();
    L.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("nfv-fuzz-vsock-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let l = crate::vsock::bind(&p).expect("the fuzz socket");
        Arc::new(l)
    })
    .clone()
}

/// The shared pieces a worker wants that the targets do not vary.
pub(crate) fn quiet() -> (Arc<dyn Interrupt>, EventFd, Arc<AtomicBool>) {
    (
        Arc::new(NoInterrupt),
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        Arc::default(),
    )
}

/// Runs `f` until it says done or `limit` passes.
pub(crate) fn until(limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() && t.elapsed() < limit {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Requests the blk target's runs handled (reached the disk or GET_ID) and
/// refused (bad request, unsupported, bad chain): the driver reports how
/// deep its inputs got.
pub static BLK_HANDLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static BLK_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// (serialises the vsock runs: they share one socket)
pub(crate) static VSOCK_LOCK: Mutex<()> = Mutex::new(());

/// A descriptor of a chain as a driver lays one out: its length, whether
/// the device may write it, and (bent) an address of the driver's choice.
#[derive(Debug, Clone, Arbitrary)]
struct Piece {
    len: u16,
    /// A length past 64 KiB (a frame or request the device must refuse).
    huge: bool,
    writable: bool,
    addr: Option<Addr>,
}

/// A chain of pieces, its readable bytes filled with `fill`.
#[derive(Debug, Clone, Arbitrary)]
struct Chain {
    pieces: Vec<Piece>,
    fill: u8,
}

/// A queue as the driver fills it: raw rings, or chains shaped as a
/// driver shapes them (some bent).
#[derive(Debug, Clone, Arbitrary)]
enum Ring {
    /// Raw rings, and an available index of the driver's choice (one
    /// more than a queue ahead of the device is the driver's error).
    Raw(QueueInput, Option<u16>),
    Chains(Vec<Chain>),
}

/// Lays `chains` out as a driver does on a queue of `size` at `base`,
/// their buffers from `data` up (at most `room` bytes).
fn lay_chains<'a>(
    mem: &'a GuestMemoryMmap,
    base: u64,
    size: u16,
    data: u64,
    room: u64,
    chains: &[Chain],
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let vq = MockSplitQueue::create(mem, GuestAddress(base), size);
    let (mut di, mut at) = (0u16, data);
    let mut heads = Vec::new();
    for c in chains.iter().take(size as usize) {
        let pieces: Vec<&Piece> = c.pieces.iter().take(8).collect();
        if pieces.is_empty() || di as usize + pieces.len() > size as usize {
            break;
        }
        heads.push(di);
        for (i, p) in pieces.iter().enumerate() {
            let len = if p.huge {
                0x1_0000 + p.len as u32
            } else {
                p.len as u32
            };
            let addr = match p.addr {
                Some(a) => a.get(),
                None => {
                    let a = at;
                    let n = (len as u64).min(data + room - at);
                    if !p.writable {
                        let _ = mem.write_slice(&vec![c.fill; n as usize], GuestAddress(a));
                    }
                    at += n;
                    a
                }
            };
            let last = i + 1 == pieces.len();
            let flags = if p.writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let raw = RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                flags,
                if last { 0 } else { di + 1 },
            ));
            let _ = vq.desc_table().store(di, raw);
            di += 1;
        }
    }
    post(&vq, &heads);
    vq
}

fn lay_ring<'a>(
    mem: &'a GuestMemoryMmap,
    base: u64,
    size: u16,
    data: u64,
    ring: &Ring,
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    match ring {
        Ring::Raw(q, idx) => {
            let vq = lay_out(mem, base, size, q);
            if let Some(i) = idx {
                vq.avail().idx().store(u16::to_le(*i));
            }
            vq
        }
        Ring::Chains(c) => lay_chains(mem, base, size, data, 0x8_0000, c),
    }
}

/// Every used element of `vq` so far (id, len).
fn used(vq: &MockSplitQueue<GuestMemoryMmap>, size: u16) -> Vec<(u32, u32)> {
    let n = vq.used().idx().load().min(size);
    (0..n as usize)
        .filter_map(|i| vq.used().ring().ref_at(i).ok())
        .map(|r| {
            let e = r.load();
            (e.id(), e.len())
        })
        .collect()
}

/// A frame the host side (the TAP's other end) sends the guest.
#[derive(Debug, Clone, Arbitrary)]
struct HostFrame {
    len: u16,
    /// Larger than the largest frame (64 KiB after the header).
    huge: bool,
    byte: u8,
    /// The header's flags and GSO bytes as the frame's other bytes (any
    /// offload claim), or clear (what a TAP without offloads writes).
    raw_header: bool,
}

/// What the fuzz target puts in the TAP's place (see
/// `net::FramePort`): one end of a datagram socket pair, which keeps
/// frame boundaries as a TAP does; the target holds the other end.
struct Datagrams(std::os::unix::net::UnixDatagram);

impl AsRawFd for Datagrams {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl crate::net::FramePort for Datagrams {
    fn port_name(&self) -> &str {
        "fuzz"
    }
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.0.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        self.0.send(frame).map(|_| ())
    }
}

/// Frames a net run received into guest buffers and sent to the host.
pub static NET_RX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static NET_TX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// virtio-net: transmit chains (headers, frames split over descriptors,
/// bent lengths and addresses, device-writable pieces, loops) and receive
/// buffers, against frames of any size from the host, through the
/// worker's real receive and transmit passes, with the link up or down,
/// EVENT_IDX on or off and the rate limits on or off. What reaches the
/// host must be a whole, plain frame; what the guest is given must fit
/// the buffer it posted.
pub fn net(u: &mut Unstructured) -> arbitrary::Result<()> {
    use std::sync::atomic::Ordering;
    use virtio_queue::QueueT;
    const SIZE: u16 = 64;
    const RX_DATA: u64 = DATA;
    const TX_DATA: u64 = DATA + 0x8_0000;
    let rx = Ring::arbitrary(u)?;
    let tx = Ring::arbitrary(u)?;
    let frames = Vec::<HostFrame>::arbitrary(u)?;
    let (link_up, event_idx, limits): (bool, bool, Option<(u8, u16)>) = Arbitrary::arbitrary(u)?;
    // the offloads and mergeable buffers a driver may have accepted
    // (dependencies kept, as activation checks them)
    let acked = {
        use crate::net::*;
        let mut a = u64::arbitrary(u)?
            & (F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_USO | F_GUEST_CSUM | F_MRG_RXBUF);
        if a & F_CSUM == 0 {
            a &= !(F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_USO);
        }
        a
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("memory");
    let rxq = lay_ring(&mem, 0, SIZE, RX_DATA, &rx);
    let txq = lay_ring(&mem, 0x4000, SIZE, TX_DATA, &tx);
    let (Ok(mut rxq_q), Ok(mut txq_q)) = (rxq.create_queue::<Queue>(), txq.create_queue::<Queue>())
    else {
        return Ok(());
    };
    rxq_q.set_event_idx(event_idx);
    txq_q.set_event_idx(event_idx);
    let Ok((host, device)) = std::os::unix::net::UnixDatagram::pair() else {
        return Ok(());
    };
    if host.set_nonblocking(true).is_err() || device.set_nonblocking(true).is_err() {
        return Ok(());
    }
    const MAX_FRAME: usize = crate::net::MAX_FRAME;
    for f in frames.iter().take(16) {
        let len = if f.huge {
            MAX_FRAME + f.len as usize % 64
        } else {
            f.len as usize
        };
        let mut frame = vec![f.byte; len];
        if !f.raw_header {
            let n = frame.len().min(10);
            frame[..n].fill(0);
        }
        // (a full socket refuses the rest, as a TAP's queue would drop them)
        let _ = host.send(&frame);
    }
    let config = crate::net::NetConfig {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        mtu: None,
        rx_pps: limits.map(|(p, _)| p as u64),
        rx_bw: limits.map(|(_, b)| b as u64),
        tx_pps: limits.map(|(p, _)| p as u64),
        tx_bw: limits.map(|(_, b)| b as u64),
        ..Default::default()
    };
    let (rx_frames, tx_frames) = crate::net::fuzz_run(
        mem.clone(),
        [rxq_q, txq_q],
        Arc::new(Datagrams(device)),
        link_up,
        &config,
        acked,
    );
    NET_RX.fetch_add(rx_frames, Ordering::Relaxed);
    NET_TX.fetch_add(tx_frames, Ordering::Relaxed);
    // what the host got: whole frames, header first, offloads claimed
    // only as negotiated and checked
    let host_offloads = acked
        & (crate::net::F_CSUM
            | crate::net::F_HOST_TSO4
            | crate::net::F_HOST_TSO6
            | crate::net::F_HOST_USO)
        != 0;
    let mut buf = vec![0u8; MAX_FRAME + 64];
    let mut sent = 0u64;
    while let Ok(n) = host.recv(&mut buf) {
        assert!(
            (crate::tap::VNET_HDR_LEN..=MAX_FRAME).contains(&n),
            "a {n}-byte frame reached the host"
        );
        if host_offloads {
            let checked =
                crate::net::check_tx_header(&buf[..10], n - crate::tap::VNET_HDR_LEN, acked);
            assert!(
                checked.is_ok(),
                "a bad offload header reached the host: {checked:?}"
            );
        } else {
            assert!(
                buf[..10].iter().all(|&b| b == 0),
                "a frame reached the host with offload flags the guest set"
            );
        }
        sent += 1;
    }
    assert_eq!(sent, tx_frames, "frames counted as sent reached the host");
    // every chain given back says no more than its buffers hold (checked
    // when the frames are zeros: a buffer may lie over the used ring, and
    // a frame's bytes then overwrite what the device put there)
    let zeros = frames.iter().take(16).all(|f| f.byte == 0);
    for (id, len) in used(&rxq, SIZE).into_iter().filter(|_| zeros) {
        assert!(
            len as usize <= MAX_FRAME,
            "receive chain {id}: {len} bytes used"
        );
    }
    for (id, len) in used(&txq, SIZE) {
        assert_eq!(len, 0, "transmit chain {id}: the device wrote {len} bytes");
    }
    Ok(())
}

/// A file whose reads fail (an entropy source gone bad): an empty file.
fn empty_file() -> &'static std::path::Path {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("nfv-fuzz-rng-{}.empty", std::process::id()));
        std::fs::write(&p, b"").expect("the empty fuzz file");
        p
    })
}

/// Requests and bytes the rng runs served.
pub static RNG_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static RNG_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// virtio-rng: buffers (raw rings, or chains with readable pieces, bent
/// lengths and addresses) through the worker's real serving pass, from
/// getrandom, /dev/zero or a source that fails, with a rate limit or not.
/// No buffer may be said to hold more than the device's request limit.
pub fn rng(u: &mut Unstructured) -> arbitrary::Result<()> {
    use std::sync::atomic::Ordering;
    use virtio_queue::QueueT;
    const SIZE: u16 = 64;
    let ring = Ring::arbitrary(u)?;
    let (source, event_idx, rate): (u8, bool, Option<u32>) = Arbitrary::arbitrary(u)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("memory");
    let vq = lay_ring(&mem, 0, SIZE, DATA, &ring);
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return Ok(());
    };
    q.set_event_idx(event_idx);
    let file = match source % 4 {
        0 => None,
        1 => std::fs::File::open(empty_file()).ok(),
        _ => std::fs::File::open("/dev/zero").ok(),
    };
    let (requests, bytes) = crate::rng::fuzz_run(mem.clone(), q, file, rate.map(u64::from));
    RNG_REQUESTS.fetch_add(requests, Ordering::Relaxed);
    RNG_BYTES.fetch_add(bytes, Ordering::Relaxed);
    // (a buffer may lie over the used ring itself, and getrandom's bytes
    // then overwrite what the device put there: checked for zeros only)
    if source % 4 != 0 {
        for (id, len) in used(&vq, SIZE) {
            assert!(len <= 64 << 10, "rng chain {id}: {len} bytes given");
        }
    }
    Ok(())
}

/// vhost-user-net's control queue (served by the VMM): commands as chains
/// (a guest's, some bent: no answer byte, writable pieces in the command,
/// commands too long, addresses outside memory) or raw rings, with MQ or
/// not and any pair count. Every used entry says at most the one answer
/// byte, and a pair count taken lies in 1..=max.
pub fn net_ctrl(u: &mut Unstructured) -> arbitrary::Result<()> {
    const SIZE: u16 = 64;
    let ring = Ring::arbitrary(u)?;
    let (mq, max_pairs): (bool, u8) = Arbitrary::arbitrary(u)?;
    let max_pairs = u16::from(max_pairs % 17);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("memory");
    let vq = lay_ring(&mem, 0, SIZE, DATA, &ring);
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return Ok(());
    };
    let refuse: bool = Arbitrary::arbitrary(u)?;
    let offer = crate::net_ctrl::CtrlOffer {
        mq,
        max_pairs,
        announce: u.arbitrary()?,
        guest_offloads: u.arbitrary()?,
    };
    let served = crate::net_ctrl::serve_ctrl_queue(&mem, &mut q, &offer, &mut |_| !refuse);
    if let Some(n) = served.pairs {
        assert!(
            mq && (1..=max_pairs).contains(&n),
            "pairs {n} of {max_pairs} taken"
        );
    }
    for (id, len) in used(&vq, SIZE) {
        assert!(len <= 1, "control chain {id}: {len} bytes said written");
    }
    Ok(())
}

/// An access width as a CPU makes one (and some no CPU makes).
fn width(w: u8) -> usize {
    [1, 2, 4, 8, 1, 2, 4, 0, 3, 5][w as usize % 10]
}

/// One thing a guest (or the VMM, for pause and state) does to a virtio
/// PCI function.
#[derive(Debug, Clone, Arbitrary)]
enum PciOp {
    /// 0xCF8: the address register (enable bit, bus, device, function,
    /// register), then 0xCFC..0xCFF reads or writes of any width.
    PortAddress {
        enable: bool,
        bus: u8,
        dev: u8,
        func: u8,
        reg: u8,
    },
    Port {
        offset: u8,
        w: u8,
        value: u64,
        write: bool,
    },
    /// ECAM: bus 0 mostly, any device, function and register.
    Ecam {
        bus: u8,
        dev: u8,
        func: u8,
        reg: u16,
        w: u8,
        value: u64,
        write: bool,
    },
    /// The function's configuration space directly, any register, byte
    /// offset and length.
    Config {
        reg: u8,
        offset: u8,
        w: u8,
        value: u64,
        write: bool,
    },
    /// BAR sizing (all ones written, the mask read back), then a move.
    SizeBar {
        bar: u8,
    },
    MoveBar {
        bar: u8,
        addr: u64,
    },
    Command(u16),
    /// Walks the capability list as a driver does, reading each.
    CapWalk,
    /// MSI-X Message Control through the capability: enable, mask.
    MsixControl {
        enable: bool,
        mask: bool,
        raw: Option<u16>,
    },
    /// The MSI-X table and PBA (BAR 1): any offset, width, value.
    MsixTable {
        offset: u16,
        w: u8,
        value: u64,
        write: bool,
    },
    /// One vector's entry written whole: address, data, unmasked or not.
    MsixVector {
        vector: u8,
        address: u64,
        data: u32,
        masked: bool,
    },
    /// The virtio BAR: common configuration, ISR, device configuration,
    /// notifications, and past them.
    Bar {
        offset: u16,
        w: u8,
        value: u64,
        write: bool,
    },
    /// The PCI configuration-access capability's window.
    CfgAccess {
        bar: u8,
        offset: u32,
        len: u32,
        value: u32,
        write: bool,
    },
    /// A driver's initialisation: reset, features, the queue at its
    /// addresses (or bent ones), vectors, DRIVER_OK, then a kick.
    Driver {
        features: [u32; 2],
        size: u16,
        bent: Option<(Addr, Addr, Addr)>,
        vector: u16,
        config_vector: u16,
        driver_ok: bool,
    },
    Status(u8),
    Pause,
    Resume,
    Control(bool),
    /// A saved state, bent, checked and (if the check passes) taken.
    SaveRestore(Vec<StateBend>),
}

/// A change to a saved state, as a hostile stream would make it.
#[derive(Debug, Clone, Arbitrary)]
enum StateBend {
    Config(u8, u32),
    ConfigLen(u8),
    Msix(u8, [u32; 4]),
    MsixLen(u8),
    Features(u64),
    Status(u8),
    QueueSelect(u16),
    ConfigVector(u16),
    Queue {
        size: u16,
        ready: bool,
        desc: u64,
        avail: u64,
        used: u64,
        next_avail: u16,
        next_used: u16,
        vector: u16,
        enabled: bool,
    },
    QueueCount(u8),
    Device(Vec<u8>),
    Running(bool),
}

/// Counts the BAR moves the transport reports (each must be a change).
struct Moves(std::sync::atomic::AtomicU64);

impl devices::pci::BarObserver for Moves {
    fn bar_moved(&self, bar: usize, from: Option<u64>, to: Option<u64>) {
        assert!(
            bar < 6 && from != to,
            "BAR {bar} 'moved' from {from:?} to {to:?}"
        );
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Records MSI-X routes as the VMM's router would apply them.
struct Routes(Mutex<Vec<(u16, devices::msix::VectorRoute)>>);

impl devices::msix::MsiRouter for Routes {
    fn route(&self, vector: u16, route: devices::msix::VectorRoute) {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() < 4096 {
            r.push((vector, route));
        }
    }
}

/// Accesses the pci runs made that a device answered (not all-ones).
pub static PCI_ANSWERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Runs in which the device was activated (DRIVER_OK taken).
pub static PCI_ACTIVATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The virtio PCI transport (a real virtio-rng behind it) on bus 0, as a
/// guest reaches it: the 0xCF8/0xCFC ports and ECAM (any bus, device,
/// function, register and width), its configuration space (BAR sizing and
/// moves, the command register, capability walks, MSI-X enable and mask),
/// the MSI-X table and PBA, the virtio BAR (common configuration, ISR,
/// device configuration, notifications, the configuration-access window)
/// and a driver's initialisation with good or bent queues; and, as the VMM
/// does, pause, resume and a saved state bent, checked and taken.
pub fn pci(u: &mut Unstructured) -> arbitrary::Result<()> {
    use devices::pci::{PciConfigPorts, PciEcam, PciFunction, PciRoot};
    use devices::BusDevice;
    use std::sync::atomic::Ordering;
    let ops = Vec::<PciOp>::arbitrary(u)?;
    let ring = QueueInput::arbitrary(u)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("memory");
    // the queue as the driver lays it out (addresses the Driver op uses)
    let vq = lay_out(&mem, 0, 64, &ring);
    let (desc, avail, usedr) = (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
    let Ok(rng) =
        crate::rng::Rng::<GuestMemoryMmap>::new(crate::rng::Source::File("/dev/zero".into()), None)
    else {
        return Ok(());
    };
    let vectors = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK))
        .collect::<Result<Vec<_>, _>>();
    let Ok(vectors) = vectors else {
        return Ok(());
    };
    let Ok(dev) = crate::pci::VirtioPci::new(
        "virtio-rng-fuzz",
        Box::new(rng),
        mem.clone(),
        0xe000_0000,
        0xe000_4000,
        vectors,
        5,
    ) else {
        return Ok(());
    };
    let dev = Arc::new(dev);
    let moves = Arc::new(Moves(Default::default()));
    dev.set_bar_observer(moves.clone());
    dev.msix.set_router(Arc::new(Routes(Mutex::default())));
    let root = PciRoot::new(vec![dev.clone()]);
    let ports = PciConfigPorts::new(root.clone());
    let ecam = PciEcam(root);
    let bar = crate::pci::VirtioBar(dev.clone());
    let answered = |d: &[u8]| {
        if d.iter().any(|&b| b != 0xff) {
            PCI_ANSWERED.fetch_add(1, Ordering::Relaxed);
        }
    };
    let rw = |dev: &dyn BusDevice, offset: u64, w: u8, value: u64, write: bool| {
        let n = width(w);
        if write {
            dev.write(offset, &value.to_le_bytes()[..n]);
        } else {
            let mut d = [0u8; 8];
            dev.read(offset, &mut d[..n]);
            answered(&d[..n]);
        }
    };
    // the common configuration's registers, written as a driver does
    let common = |offset: u64, v: u64, n: usize| bar.write(offset, &v.to_le_bytes()[..n]);
    let msix_cap = || {
        let mut at = dev.config_read(0x34) as u8 & 0xfc;
        for _ in 0..48 {
            if at == 0 {
                return None;
            }
            let head = dev.config_read(at);
            if head as u8 == devices::msix::CAP_ID {
                return Some(at);
            }
            at = (head >> 8) as u8 & 0xfc;
        }
        None
    };
    for op in ops.into_iter().take(64) {
        match op {
            PciOp::PortAddress {
                enable,
                bus,
                dev: d,
                func,
                reg,
            } => {
                let a = (enable as u32) << 31
                    | (bus as u32 % 2) << 16
                    | (d as u32 % 4) << 11
                    | (func as u32 % 2) << 8
                    | reg as u32;
                ports.write(0, &a.to_le_bytes());
            }
            PciOp::Port {
                offset,
                w,
                value,
                write,
            } => rw(&ports, offset as u64 % 8, w, value, write),
            PciOp::Ecam {
                bus,
                dev: d,
                func,
                reg,
                w,
                value,
                write,
            } => {
                let at = (bus as u64 % 2) << 20
                    | (d as u64 % 4) << 15
                    | (func as u64 % 2) << 12
                    | (reg as u64 % 0x1000);
                rw(&ecam, at, w, value, write)
            }
            PciOp::Config {
                reg,
                offset,
                w,
                value,
                write,
            } => {
                // (as the root passes them: an aligned register, a byte
                // offset in it)
                if write {
                    dev.config_write(reg & 0xfc, offset % 4, &value.to_le_bytes()[..width(w)]);
                } else {
                    let _ = dev.config_read(reg & 0xfc);
                }
            }
            PciOp::SizeBar { bar: b } => {
                let reg = 0x10 + (b % 6) * 4;
                let old = dev.config_read(reg);
                dev.config_write(reg, 0, &u32::MAX.to_le_bytes());
                let _ = dev.config_read(reg);
                dev.config_write(reg, 0, &old.to_le_bytes());
            }
            PciOp::MoveBar { bar: b, addr } => {
                let reg = 0x10 + (b % 6) * 4;
                dev.config_write(reg, 0, &(addr as u32).to_le_bytes());
                dev.config_write(reg + 4, 0, &((addr >> 32) as u32).to_le_bytes());
            }
            PciOp::Command(c) => dev.config_write(4, 0, &c.to_le_bytes()),
            PciOp::CapWalk => {
                let mut at = dev.config_read(0x34) as u8 & 0xfc;
                let mut seen = 0;
                while at != 0 && seen < 48 {
                    let head = dev.config_read(at);
                    for k in 1..5u8 {
                        let _ = dev.config_read(at.wrapping_add(4 * k));
                    }
                    at = (head >> 8) as u8 & 0xfc;
                    seen += 1;
                }
                assert!(seen < 48, "the capability list does not end");
            }
            PciOp::MsixControl { enable, mask, raw } => {
                if let Some(cap) = msix_cap() {
                    let c = raw.unwrap_or((enable as u16) << 15 | (mask as u16) << 14);
                    dev.config_write(cap, 2, &c.to_le_bytes());
                }
            }
            PciOp::MsixTable {
                offset,
                w,
                value,
                write,
            } => rw(&*dev.msix, offset as u64 % 0x1000, w, value, write),
            PciOp::MsixVector {
                vector,
                address,
                data,
                masked,
            } => {
                let at = (vector as u64 % 4) * 16;
                dev.msix.write(at, &(address as u32).to_le_bytes());
                dev.msix
                    .write(at + 4, &((address >> 32) as u32).to_le_bytes());
                dev.msix.write(at + 8, &data.to_le_bytes());
                dev.msix.write(at + 12, &(masked as u32).to_le_bytes());
            }
            PciOp::Bar {
                offset,
                w,
                value,
                write,
            } => rw(&bar, offset as u64 % 0x4100, w, value, write),
            PciOp::CfgAccess {
                bar: b,
                offset,
                len,
                value,
                write,
            } => {
                // the capability is the last vendor one: found by its type
                let mut at = dev.config_read(0x34) as u8 & 0xfc;
                for _ in 0..48 {
                    if at == 0 {
                        break;
                    }
                    let head = dev.config_read(at);
                    if head as u8 == 0x09 && head >> 24 == 5 {
                        dev.config_write(at + 4, 0, &[b % 8]);
                        dev.config_write(at + 8, 0, &(offset % 0x5000).to_le_bytes());
                        dev.config_write(at + 12, 0, &(len % 9).to_le_bytes());
                        if write {
                            dev.config_write(at + 16, 0, &value.to_le_bytes());
                        } else {
                            let _ = dev.config_read(at + 16);
                        }
                        break;
                    }
                    at = (head >> 8) as u8 & 0xfc;
                }
            }
            PciOp::Driver {
                features,
                size,
                bent,
                vector,
                config_vector,
                driver_ok,
            } => {
                common(0x14, 0, 1);
                common(0x14, 1 | 2, 1);
                for (sel, f) in features.iter().enumerate() {
                    common(0x08, sel as u64, 4);
                    common(0x0c, *f as u64, 4);
                }
                common(0x14, 1 | 2 | 8, 1);
                common(0x10, config_vector as u64 % 4, 2);
                common(0x16, 0, 2);
                common(0x18, if size % 2 == 0 { 64 } else { size as u64 }, 2);
                let (d, a, us) = match bent {
                    Some((d, a, us)) => (d.get(), a.get(), us.get()),
                    None => (desc, avail, usedr),
                };
                for (reg, v) in [(0x20, d), (0x28, a), (0x30, us)] {
                    common(reg, v & 0xffff_ffff, 4);
                    common(reg + 4, v >> 32, 4);
                }
                common(0x1a, vector as u64 % 4, 2);
                common(0x1c, 1, 2);
                if driver_ok {
                    common(0x14, 1 | 2 | 8 | 4, 1);
                    let mut s = [0u8];
                    bar.read(0x14, &mut s);
                    if s[0] & 4 != 0 && s[0] & 0x40 == 0 {
                        PCI_ACTIVATED.fetch_add(1, Ordering::Relaxed);
                    }
                    // a kick the ioeventfd did not take
                    bar.write(crate::pci::NOTIFY_OFFSET, &0u16.to_le_bytes());
                }
            }
            PciOp::Status(s) => common(0x14, s as u64, 1),
            PciOp::Pause => dev.pause(),
            PciOp::Resume => dev.resume(),
            PciOp::Control(up) => {
                let _ = dev.control(if up { "link-up" } else { "anything" });
            }
            PciOp::SaveRestore(bends) => {
                dev.pause();
                let mut s = dev.save_state();
                for b in bends.into_iter().take(16) {
                    bend(&mut s, b);
                }
                if dev.check_state(&s).is_ok() {
                    let _ = dev.restore_state(s);
                }
            }
        }
    }
    // the device stops (its worker joined) before the memory goes
    common(0x14, 0, 1);
    let _ = moves.0.load(Ordering::Relaxed);
    Ok(())
}

fn bend(s: &mut crate::pci::VirtioPciState, b: StateBend) {
    match b {
        StateBend::Config(i, v) => {
            if let Some(r) = s.config.get_mut(i as usize % 64) {
                *r = v;
            }
        }
        StateBend::ConfigLen(n) => s.config.resize(n as usize % 80, 0),
        StateBend::Msix(i, e) => {
            if let Some(r) = s.msix.get_mut(i as usize % 4) {
                *r = e;
            }
        }
        StateBend::MsixLen(n) => s.msix.resize(n as usize % 4, [0; 4]),
        StateBend::Features(f) => s.driver_features = f,
        StateBend::Status(v) => s.status = v,
        StateBend::QueueSelect(q) => s.queue_select = q,
        StateBend::ConfigVector(v) => s.config_vector = v,
        StateBend::Queue {
            size,
            ready,
            desc,
            avail,
            used,
            next_avail,
            next_used,
            vector,
            enabled,
        } => {
            if let Some(q) = s.queues.first_mut() {
                *q = crate::pci::QueueSnapshot {
                    size,
                    ready,
                    desc,
                    avail,
                    used,
                    next_avail,
                    next_used,
                    event_idx: ready,
                    enabled,
                    vector,
                };
            }
        }
        StateBend::QueueCount(n) => {
            let q = s.queues.first().cloned();
            if let Some(q) = q {
                s.queues.resize(n as usize % 3, q);
            }
        }
        StateBend::Device(d) => s.device = d,
        StateBend::Running(r) => s.running = r,
    }
}
