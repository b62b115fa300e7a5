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
    for (i, h) in heads.iter().enumerate() {
        if let Ok(r) = vq.avail().ring().ref_at(i) {
            r.store(u16::to_le(*h));
        }
    }
    vq.avail().idx().store(u16::to_le(heads.len() as u16));
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
