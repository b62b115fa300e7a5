//! virtio-blk on a raw image file (virtio 1.2, section 5.2): IN, OUT,
//! FLUSH, GET_ID, DISCARD and WRITE_ZEROES, one worker thread per queue,
//! asynchronous I/O (`block_io`: io_uring or a thread pool), so neither a
//! vCPU nor a worker waits on the disk.
//!
//! Every request is checked before anything reaches the image: the chain
//! must end (no loop), its header must be readable, its status byte the
//! last device-writable byte; a sector range past the end, a length that
//! is not whole sectors, data descriptors in the wrong direction, more
//! segments or bytes than the configuration space allows are answered
//! IOERR; an unknown type or unknown DISCARD/WRITE_ZEROES flags UNSUPP;
//! each is counted, and the queue goes on.
//!
//! FLUSH: completes only after an fdatasync issued once every write
//! submitted before the FLUSH arrived has completed. A driver that did not
//! negotiate FLUSH gets write-through (each write RWF_DSYNC). The order is
//! traced (target `nfvisor::blk_order`, level trace) for the suite to check.
//!
//! Reads land in guest memory behind the VMM's back (the kernel writes
//! it), so their pages are marked dirty for migration before the request
//! completes. A pause drains every request in flight before the queues
//! are handed back: nothing the guest saw completed is lost, and nothing
//! is half done.

use std::collections::{BTreeSet, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use virtio_bindings::virtio_blk::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::block_io::{Completion, Engine, EngineChoice, Op};
use crate::disk::{DiskImage, SECTOR};
use crate::rate_limiter::RateLimiter;
use crate::{whole_chain, ActiveQueue, Interrupt, VirtioDevice, WorkerThread};

pub const QUEUE_SIZE: u16 = 256;
/// Data segments a request may have (Linux's default scatter list).
pub const SEG_MAX: u32 = 128;
/// Bytes one data segment may hold.
pub const SIZE_MAX: u32 = 128 << 10;
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 32;
/// Discards should be aligned to 4 KiB (in sectors).
pub const DISCARD_ALIGNMENT: u32 = 8;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;
/// The most queues a disk takes.
pub const MAX_QUEUES: u16 = 16;
/// GET_ID's answer: at most 20 bytes.
pub const SERIAL_LEN: usize = 20;
/// Bounce buffers (O_DIRECT with unaligned guest buffers) a queue holds at
/// once: a request that would pass it waits for others to complete.
pub const MAX_BOUNCE: usize = 32 << 20;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The tracing target of the flush-order trace.
pub const ORDER_TRACE: &str = "nfvisor::blk_order";

/// How a disk is set up (beyond its image).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlkConfig {
    /// GET_ID's answer (at most 20 bytes).
    pub serial: Option<String>,
    pub queues: u16,
    pub engine: EngineChoice,
    /// Operations a second (all queues together).
    pub iops: Option<u64>,
    /// Bytes a second.
    pub bandwidth: Option<u64>,
}

/// Per-device counters.
pub struct BlkCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub get_ids: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests answered IOERR for what the guest asked (range, length,
    /// direction, limits).
    pub bad_requests: AtomicU64,
    /// Requests answered UNSUPP (type, flags, feature not negotiated).
    pub unsupported: AtomicU64,
    /// Requests the host failed (the syscall's error, answered IOERR).
    pub io_errors: AtomicU64,
    /// Chains with nowhere to put a status (given back, nothing written).
    pub bad_chains: AtomicU64,
    pub bad_queue: AtomicU64,
    /// Times a request waited for the rate limiter.
    pub throttled: AtomicU64,
    pub notifications: AtomicU64,
    pub notifications_suppressed: AtomicU64,
    /// By queue: requests, bytes, errors and latency.
    pub per_queue: Vec<QueueCounters>,
    /// Time from taking a request to completing it, ns, by queue.
    pub latency: Vec<Mutex<Histogram<u64>>>,
}

/// One queue's share.
#[derive(Default)]
pub struct QueueCounters {
    pub requests: AtomicU64,
    /// Bytes read and written.
    pub bytes: AtomicU64,
    /// Requests answered other than OK (IOERR, UNSUPP).
    pub errors: AtomicU64,
}

impl BlkCounters {
    fn new(queues: u16) -> BlkCounters {
        let z = AtomicU64::new;
        BlkCounters {
            reads: z(0),
            writes: z(0),
            flushes: z(0),
            discards: z(0),
            write_zeroes: z(0),
            get_ids: z(0),
            bytes_read: z(0),
            bytes_written: z(0),
            bad_requests: z(0),
            unsupported: z(0),
            io_errors: z(0),
            bad_chains: z(0),
            bad_queue: z(0),
            throttled: z(0),
            notifications: z(0),
            notifications_suppressed: z(0),
            per_queue: (0..queues).map(|_| QueueCounters::default()).collect(),
            latency: (0..queues)
                .map(|_| {
                    Mutex::new(Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("bounds"))
                })
                .collect(),
        }
    }
}

/// Counter names of queue `q`: requests, bytes, errors, latency p50 and
/// p99 (ns). The counters interface takes static names: they are made once
/// a process for the MAX_QUEUES queues a device can have (a bounded leak).
fn queue_names(q: usize) -> [&'static str; 5] {
    static NAMES: std::sync::OnceLock<Vec<[&'static str; 5]>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| {
        (0..MAX_QUEUES)
            .map(|q| {
                [
                    "requests",
                    "bytes",
                    "errors",
                    "latency_p50_ns",
                    "latency_p99_ns",
                ]
                .map(|n| &*Box::leak(format!("q{q}_{n}").into_boxed_str()))
            })
            .collect()
    })[q]
}

pub struct Blk<M> {
    name: String,
    disk: Arc<DiskImage>,
    config: BlkConfig,
    /// The engine the workers use ("io_uring" or "threads").
    engine: &'static str,
    pub counters: Arc<BlkCounters>,
    limiter: Arc<Mutex<RateLimiter>>,
    /// A host I/O error was logged (once per device).
    errno_logged: Arc<AtomicBool>,
    workers: Vec<WorkerThread<ActiveQueue>>,
    _mem: std::marker::PhantomData<M>,
}

impl<M> Blk<M> {
    /// A disk on `disk`; Err names what cannot be: a serial over 20
    /// bytes, a queue count out of range, io_uring asked for and missing.
    pub fn new(name: &str, disk: DiskImage, config: BlkConfig) -> Result<Self, String> {
        if let Some(s) = &config.serial {
            if s.len() > SERIAL_LEN {
                return Err(format!(
                    "serial {s:?} is {} bytes: GET_ID answers at most {SERIAL_LEN}",
                    s.len()
                ));
            }
        }
        if config.queues == 0 || config.queues > MAX_QUEUES {
            return Err(format!("queues={}: from 1 to {MAX_QUEUES}", config.queues));
        }
        // the engine the workers will get: io_uring asked for and missing
        // is refused now, not at the driver's first request
        let engine =
            crate::block_io::engine(config.engine, disk.file.as_raw_fd(), QUEUE_SIZE as u32)?
                .name();
        Ok(Blk {
            name: name.to_string(),
            counters: Arc::new(BlkCounters::new(config.queues)),
            limiter: Arc::new(Mutex::new(RateLimiter::new(config.iops, config.bandwidth))),
            disk: Arc::new(disk),
            config,
            engine,
            errno_logged: Arc::default(),
            workers: Vec::new(),
            _mem: std::marker::PhantomData,
        })
    }

    pub fn engine(&self) -> &'static str {
        self.engine
    }

    pub fn disk(&self) -> &Arc<DiskImage> {
        &self.disk
    }

    fn stop_workers(&mut self) -> Vec<ActiveQueue> {
        // every queue drains at once, then each is waited for
        let workers = std::mem::take(&mut self.workers);
        workers.iter().for_each(WorkerThread::signal);
        workers.into_iter().filter_map(WorkerThread::join).collect()
    }
}

impl<M> Drop for Blk<M> {
    /// The workers stop (drained) with the device: they must not outlive
    /// the VM's memory.
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl<M: GuestMemory + Clone + Send + Sync + 'static> VirtioDevice<M> for Blk<M> {
    fn device_type(&self) -> u16 {
        2
    }

    fn features(&self) -> u64 {
        let mut f = crate::F_VERSION_1
            | crate::F_RING_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY;
        if self.disk.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.config.queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.config.queues as usize]
    }

    /// struct virtio_blk_config up to write_zeroes_may_unmap.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut s = [0u8; 60];
        let mut put = |at: usize, bytes: &[u8]| s[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.disk.sectors().to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR as u32).to_le_bytes());
        // topology: one logical block a physical block, I/O of 4 KiB
        // preferred
        put(26, &1u16.to_le_bytes());
        put(28, &8u32.to_le_bytes());
        put(34, &self.config.queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT.to_le_bytes());
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
        put(56, &[1]);
        crate::read_config_space(&s, offset, data);
    }

    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        acked: u64,
    ) -> Result<(), String> {
        if queues.is_empty() {
            return Err("virtio-blk needs at least its first queue enabled".into());
        }
        let mut serial = [0u8; SERIAL_LEN];
        if let Some(s) = &self.config.serial {
            serial[..s.len()].copy_from_slice(s.as_bytes());
        }
        for (index, q) in queues.into_iter().enumerate() {
            let (stop, worker_stop) = crate::worker_stop_pair()?;
            // the worker sets its engine up itself, under its own filter:
            // the block worker is the only role with io_uring
            let (choice, fd) = (self.config.engine, self.disk.file.as_raw_fd());
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let build = {
                let (mem, interrupt, counters) =
                    (mem.clone(), interrupt.clone(), self.counters.clone());
                let (disk, limiter, name) =
                    (self.disk.clone(), self.limiter.clone(), self.name.clone());
                let errno_logged = self.errno_logged.clone();
                move |queue, kick, engine| Worker {
                    name,
                    index: index as u16,
                    mem,
                    queue,
                    kick,
                    stop: worker_stop,
                    interrupt,
                    counters,
                    disk,
                    limiter,
                    engine,
                    slots: (0..QUEUE_SIZE).map(|_| None).collect(),
                    free: (0..QUEUE_SIZE as usize).rev().collect(),
                    held: None,
                    throttled: false,
                    flush_acked: acked & (1 << VIRTIO_BLK_F_FLUSH) != 0,
                    discard_acked: acked & (1 << VIRTIO_BLK_F_DISCARD) != 0,
                    write_zeroes_acked: acked & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
                    next_write: 0,
                    writes_in_flight: BTreeSet::new(),
                    waiting_flushes: VecDeque::new(),
                    serial,
                    errno_logged,
                    bounce_bytes: 0,
                }
            };
            let ActiveQueue { queue, kick } = q;
            self.workers.push(WorkerThread::spawn(
                format!("{}-q{index}", self.name),
                seccomp::Role::BlockWorker,
                stop,
                move || match crate::block_io::engine(choice, fd, QUEUE_SIZE as u32) {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(()));
                        build(queue, kick, engine).run()
                    }
                    Err(why) => {
                        let _ = ready_tx.send(Err(why));
                        ActiveQueue { queue, kick }
                    }
                },
            )?);
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(format!("{} queue {index}: {why}", self.name)),
                Err(_) => {
                    return Err(format!(
                        "{} queue {index}: the worker ended before its engine was ready",
                        self.name
                    ))
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Vec<ActiveQueue> {
        self.stop_workers()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 2).expect("bounds");
        for h in &c.latency {
            let _ = all.add(&*h.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let mut v = vec![
            ("reads", l(&c.reads)),
            ("writes", l(&c.writes)),
            ("flushes", l(&c.flushes)),
            ("discards", l(&c.discards)),
            ("write_zeroes", l(&c.write_zeroes)),
            ("get_ids", l(&c.get_ids)),
            ("bytes_read", l(&c.bytes_read)),
            ("bytes_written", l(&c.bytes_written)),
            ("bad_requests", l(&c.bad_requests)),
            ("unsupported", l(&c.unsupported)),
            ("io_errors", l(&c.io_errors)),
            ("bad_chains", l(&c.bad_chains)),
            ("bad_queue", l(&c.bad_queue)),
            ("throttled", l(&c.throttled)),
            ("notifications", l(&c.notifications)),
            ("notifications_suppressed", l(&c.notifications_suppressed)),
            ("latency_p50_ns", all.value_at_quantile(0.5)),
            ("latency_p99_ns", all.value_at_quantile(0.99)),
            ("engine_io_uring", (self.engine == "io_uring") as u64),
        ];
        for (q, (n, h)) in c.per_queue.iter().zip(&c.latency).enumerate() {
            let names = queue_names(q);
            let h = h.lock().unwrap_or_else(|e| e.into_inner());
            v.push((names[0], l(&n.requests)));
            v.push((names[1], l(&n.bytes)));
            v.push((names[2], l(&n.errors)));
            v.push((names[3], h.value_at_quantile(0.5)));
            v.push((names[4], h.value_at_quantile(0.99)));
        }
        v
    }

    /// The capacity (8 bytes), read-only (1) and the serial (20, NUL
    /// padded): what the driver saw, which a destination's disk must show
    /// it again.
    fn state(&self) -> Vec<u8> {
        let mut s = self.disk.sectors().to_le_bytes().to_vec();
        s.push(self.disk.readonly as u8);
        let mut serial = [0u8; SERIAL_LEN];
        if let Some(id) = &self.config.serial {
            serial[..id.len()].copy_from_slice(id.as_bytes());
        }
        s.extend_from_slice(&serial);
        s
    }

    fn set_state(&mut self, state: &[u8]) -> Result<(), String> {
        let mine = VirtioDevice::<M>::state(self);
        if state.len() != mine.len() {
            return Err(format!(
                "virtio-blk state of {} bytes ({} expected)",
                state.len(),
                mine.len()
            ));
        }
        let sectors = u64::from_le_bytes(state[..8].try_into().expect("8 bytes"));
        if sectors != self.disk.sectors() {
            return Err(format!(
                "the guest's disk had {sectors} sectors, {} has {}",
                self.disk.path.display(),
                self.disk.sectors()
            ));
        }
        if state[8] != mine[8] {
            return Err(format!(
                "the guest's disk was {}, {} is opened {}",
                if state[8] == 1 {
                    "read-only"
                } else {
                    "read-write"
                },
                self.disk.path.display(),
                if mine[8] == 1 {
                    "read-only"
                } else {
                    "read-write"
                }
            ));
        }
        if state[9..] != mine[9..] {
            return Err("the guest's disk had another serial: give it the same serial=".into());
        }
        Ok(())
    }
}

/// What a request asks, once checked.
enum Action {
    /// Answer this status at once.
    Reply(u8),
    GetId(Vec<(GuestAddress, u32)>),
    Read {
        offset: u64,
        segs: Vec<(GuestAddress, u32)>,
        len: u64,
    },
    Write {
        offset: u64,
        segs: Vec<(GuestAddress, u32)>,
        len: u64,
    },
    Flush,
    /// DISCARD or WRITE_ZEROES: fallocate each range with `mode`.
    Fallocate {
        ranges: Vec<(u64, u64)>,
        mode: i32,
        discard: bool,
    },
}

struct Request {
    head: u16,
    /// The status byte (None: the chain has nowhere to put one).
    status: Option<GuestAddress>,
    action: Action,
    taken: Instant,
}

/// A request whose I/O is under way.
struct InFlight {
    head: u16,
    status: GuestAddress,
    /// Bytes the device writes into the chain (data read + status).
    used_len: u32,
    /// The operations (kept alive: their iovecs point into them).
    ops: Vec<Op>,
    parts_left: usize,
    /// The first error (errno).
    error: Option<i64>,
    /// Bytes each operation must move (reads and writes).
    expect: Option<u64>,
    kind: Kind,
    /// Reads: where the data lands (marked dirty at completion).
    read_to: Vec<(GuestAddress, u32)>,
    /// O_DIRECT with a guest buffer not sector-aligned: the data goes
    /// through this aligned buffer (start offset into it).
    bounce: Option<(Vec<u8>, usize)>,
    write_seq: Option<u64>,
    taken: Instant,
    bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

struct Worker<M> {
    name: String,
    index: u16,
    mem: M,
    queue: Queue,
    kick: EventFd,
    stop: EventFd,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<BlkCounters>,
    disk: Arc<DiskImage>,
    limiter: Arc<Mutex<RateLimiter>>,
    engine: Box<dyn Engine>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// A request taken from the ring that waits for the rate limiter.
    held: Option<Request>,
    throttled: bool,
    flush_acked: bool,
    discard_acked: bool,
    write_zeroes_acked: bool,
    /// The next write's sequence number.
    next_write: u64,
    writes_in_flight: BTreeSet<u64>,
    /// FLUSHes (slot, the first write sequence they need not wait for)
    /// waiting for earlier writes to complete.
    waiting_flushes: VecDeque<(usize, u64)>,
    serial: [u8; SERIAL_LEN],
    errno_logged: Arc<AtomicBool>,
    /// Bytes of bounce buffers in flight.
    bounce_bytes: usize,
}

const EV_KICK: u64 = 0;
const EV_IO: u64 = 1;
const EV_STOP: u64 = 2;
const EV_TIMER: u64 = 3;

/// A sector-aligned home for `len` bytes (O_DIRECT): the buffer and the
/// aligned start within it.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let at = v.as_ptr().align_offset(4096);
    (v, at)
}

impl<M: GuestMemory + Clone + Send + Sync + 'static> Worker<M> {
    fn run(mut self) -> ActiveQueue {
        let timer = match TimerFd::new() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("{}: timerfd: {e}; the queue stops", self.name);
                return self.into_queue();
            }
        };
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("{}: epoll: {e}; the queue stops", self.name);
                return self.into_queue();
            }
        };
        let add = |fd: i32, data: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
        };
        let ok = add(self.kick.as_raw_fd(), EV_KICK).is_ok()
            && add(self.engine.event_fd(), EV_IO).is_ok()
            && add(self.stop.as_raw_fd(), EV_STOP).is_ok()
            && add(timer.as_raw_fd(), EV_TIMER).is_ok();
        if !ok {
            tracing::error!("{}: epoll registration failed", self.name);
            return self.into_queue();
        }
        let mut timer = timer;
        // requests the driver posted while the device was stopped
        self.process_queue(&mut timer);
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: epoll_wait: {e}", self.name);
                    self.drain();
                    return self.into_queue();
                }
            };
            let mut look = false;
            for ev in &events[..n] {
                match ev.data() {
                    EV_STOP => {
                        self.drain();
                        return self.into_queue();
                    }
                    EV_KICK => {
                        let _ = self.kick.read();
                        look = true;
                    }
                    EV_IO => {
                        self.reap();
                        look = true;
                    }
                    EV_TIMER => {
                        let _ = timer.wait();
                        self.throttled = false;
                        look = true;
                    }
                    _ => {}
                }
            }
            if look {
                self.process_queue(&mut timer);
            }
        }
    }

    fn into_queue(self) -> ActiveQueue {
        ActiveQueue {
            queue: self.queue,
            kick: self.kick,
        }
    }

    /// Completes everything in flight (and a request the limiter held)
    /// before the queue is handed back.
    fn drain(&mut self) {
        if let Some(r) = self.held.take() {
            self.start(r);
        }
        let fd = self.engine.event_fd();
        while self.slots.iter().any(Option::is_some) {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own, for the call's duration.
            unsafe { libc::poll(&mut p, 1, 100) };
            self.reap();
        }
        self.notify();
    }

    fn notify(&mut self) {
        match crate::signal_used(&mut self.queue, &self.mem, &*self.interrupt, self.index) {
            Ok(crate::Signal::Sent) => {
                self.counters.notifications.fetch_add(1, Ordering::Relaxed);
            }
            Ok(crate::Signal::Suppressed) => {
                self.counters
                    .notifications_suppressed
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.bad_queue(&e),
        }
    }

    fn bad_queue(&self, why: &str) {
        if self.counters.bad_queue.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "{}: queue {}: {why} (logged once, counted)",
                self.name,
                self.index
            );
        }
    }

    /// Takes requests off the ring while the limiter lets them go.
    fn process_queue(&mut self, timer: &mut TimerFd) {
        let mem = self.mem.clone();
        let mut used = false;
        while !self.throttled && !self.free.is_empty() {
            let req = match self.held.take() {
                Some(r) => r,
                None => {
                    let chain = match crate::pop_chain(&mut self.queue, &mem) {
                        crate::Popped::Chain(c) => c,
                        crate::Popped::Empty => break,
                        crate::Popped::Broken(why) => {
                            self.bad_queue(&why);
                            break;
                        }
                    };
                    self.parse(chain)
                }
            };
            let bytes = match &req.action {
                Action::Read { len, .. } | Action::Write { len, .. } => Some(*len),
                Action::Fallocate { .. } => Some(0),
                _ => None,
            };
            // O_DIRECT bounce buffers are bounded: a request that needs one
            // past MAX_BOUNCE waits for earlier ones to complete
            let bounce = self.bounce_len(&req);
            if bounce > 0 && self.bounce_bytes > 0 && self.bounce_bytes + bounce > MAX_BOUNCE {
                self.held = Some(req);
                break;
            }
            if let Some(bytes) = bytes {
                let taken = self
                    .limiter
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(bytes);
                if let Err(wait) = taken {
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    self.held = Some(req);
                    self.throttled = true;
                    if let Err(e) = timer.reset(wait, None) {
                        tracing::warn!("{}: arming the rate limiter's timer: {e}", self.name);
                        self.throttled = false;
                    }
                    break;
                }
            }
            used |= self.start(req);
        }
        if used {
            self.notify();
        }
    }

    /// Checks a chain and says what it asks.
    fn parse(&self, chain: virtio_queue::DescriptorChain<&M>) -> Request {
        let head = chain.head_index();
        let taken = Instant::now();
        let reply = |status: Option<GuestAddress>, s: u8| Request {
            head,
            status,
            action: Action::Reply(s),
            taken,
        };
        let Some(descs) = whole_chain(chain) else {
            self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
            self.bad_queue("a chain that does not end (a loop, or longer than the queue)");
            return reply(None, S_IOERR);
        };
        // the status: the last byte of the last descriptor, device-writable
        let last = descs.last().expect("a whole chain has a descriptor");
        if !last.is_write_only() || last.len() == 0 {
            self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
            return reply(None, S_IOERR);
        }
        let Some(status) = last.addr().checked_add(last.len() as u64 - 1) else {
            self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
            return reply(None, S_IOERR);
        };
        if !self.mem.check_range(status, 1, Permissions::Write) {
            self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
            return reply(None, S_IOERR);
        }
        let ioerr = |why: &str| {
            tracing::debug!(
                "{} q{}: a request answered IOERR: {why}",
                self.name,
                self.index
            );
            self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            reply(Some(status), S_IOERR)
        };
        let unsupp = || {
            self.counters.unsupported.fetch_add(1, Ordering::Relaxed);
            reply(Some(status), S_UNSUPP)
        };
        // the readable part, then the writable part less the status byte
        let mut readable: Vec<(GuestAddress, u32)> = Vec::new();
        let mut writable: Vec<(GuestAddress, u32)> = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            let len = if i + 1 == descs.len() {
                d.len() - 1
            } else {
                d.len()
            };
            if d.is_write_only() {
                if len > 0 {
                    writable.push((d.addr(), len));
                }
            } else if !writable.is_empty() {
                // a readable descriptor after a writable one
                return ioerr("a device-readable descriptor after a device-writable one");
            } else {
                readable.push((d.addr(), len));
            }
        }
        // the header: the first 16 readable bytes
        let mut header = [0u8; 16];
        let mut got = 0;
        let mut data_out = Vec::new();
        for &(addr, len) in &readable {
            let take = (16 - got).min(len as usize);
            if take > 0
                && self
                    .mem
                    .read_slice(&mut header[got..got + take], addr)
                    .is_err()
            {
                return ioerr("the header is not guest memory");
            }
            got += take;
            if (take as u32) < len {
                data_out.push((addr.unchecked_add(take as u64), len - take as u32));
            }
        }
        if got < 16 {
            return ioerr("the header is shorter than 16 bytes");
        }
        let ty = u32::from_le_bytes(header[0..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        let sum = |segs: &[(GuestAddress, u32)]| segs.iter().map(|s| s.1 as u64).sum::<u64>();
        let capacity = self.disk.sectors();
        let in_range = |sector: u64, bytes: u64| {
            bytes.is_multiple_of(SECTOR)
                && sector
                    .checked_add(bytes / SECTOR)
                    .is_some_and(|end| end <= capacity)
        };
        let segs_ok = |segs: &[(GuestAddress, u32)]| {
            segs.len() <= SEG_MAX as usize && segs.iter().all(|s| s.1 <= SIZE_MAX)
        };
        let action = match ty {
            VIRTIO_BLK_T_IN => {
                let len = sum(&writable);
                if !data_out.is_empty() || !in_range(sector, len) || !segs_ok(&writable) {
                    return ioerr("a read with device-readable data, past the end, not whole sectors, or over the segment limits");
                }
                Action::Read {
                    offset: sector * SECTOR,
                    segs: writable,
                    len,
                }
            }
            VIRTIO_BLK_T_OUT => {
                let len = sum(&data_out);
                if self.disk.readonly
                    || !writable.is_empty()
                    || !in_range(sector, len)
                    || !segs_ok(&data_out)
                {
                    return ioerr("a write to a read-only disk, with device-writable data, past the end, not whole sectors, or over the segment limits");
                }
                Action::Write {
                    offset: sector * SECTOR,
                    segs: data_out,
                    len,
                }
            }
            VIRTIO_BLK_T_FLUSH => Action::Flush,
            VIRTIO_BLK_T_GET_ID => {
                if writable.is_empty() {
                    return ioerr("GET_ID without a buffer");
                }
                Action::GetId(writable)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = ty == VIRTIO_BLK_T_DISCARD;
                let (acked, max_seg, max_sectors) = if discard {
                    (self.discard_acked, MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
                } else {
                    (
                        self.write_zeroes_acked,
                        MAX_WRITE_ZEROES_SEG,
                        MAX_WRITE_ZEROES_SECTORS,
                    )
                };
                if !acked {
                    return unsupp();
                }
                let len = sum(&data_out);
                if self.disk.readonly
                    || !writable.is_empty()
                    || len == 0
                    || len % 16 != 0
                    || len / 16 > max_seg as u64
                {
                    return ioerr("DISCARD/WRITE_ZEROES on a read-only disk, or its segments malformed or too many");
                }
                let mut bytes = Vec::with_capacity(len as usize);
                for &(addr, l) in &data_out {
                    let at = bytes.len();
                    bytes.resize(at + l as usize, 0);
                    if self.mem.read_slice(&mut bytes[at..], addr).is_err() {
                        return ioerr("DISCARD/WRITE_ZEROES segments not guest memory");
                    }
                }
                let mut ranges = Vec::new();
                let mut unmap = false;
                for seg in bytes.chunks_exact(16) {
                    let s = u64::from_le_bytes(seg[0..8].try_into().expect("8"));
                    let n = u32::from_le_bytes(seg[8..12].try_into().expect("4"));
                    let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4"));
                    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && flags != 0) {
                        return unsupp();
                    }
                    unmap |= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                    if n > max_sectors || !in_range(s, n as u64 * SECTOR) {
                        return ioerr(
                            "a DISCARD/WRITE_ZEROES range past the end or over the sector limit",
                        );
                    }
                    ranges.push((s * SECTOR, n as u64 * SECTOR));
                }
                // punching reads back zeros too: WRITE_ZEROES with unmap
                // may free the blocks
                let mode = if discard || unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                Action::Fallocate {
                    ranges,
                    mode,
                    discard,
                }
            }
            _ => return unsupp(),
        };
        Request {
            head,
            status: Some(status),
            action,
            taken,
        }
    }

    /// Host iovecs for guest segments, or None when one is not guest
    /// memory.
    fn iovecs(
        &self,
        segs: &[(GuestAddress, u32)],
        access: Permissions,
    ) -> Option<Vec<libc::iovec>> {
        let mut iov = Vec::with_capacity(segs.len());
        for &(addr, len) in segs {
            let slices = self.mem.get_slices(addr, len as usize, access).ok()?;
            for s in slices {
                let s = s.ok()?;
                iov.push(libc::iovec {
                    iov_base: s.ptr_guard_mut().as_ptr().cast(),
                    iov_len: s.len(),
                });
            }
        }
        Some(iov)
    }

    /// Gives a chain back with `status`; true when a used entry was added.
    fn finish(&mut self, head: u16, status: Option<GuestAddress>, s: u8, used_len: u32) -> bool {
        if let Some(at) = status {
            if self.mem.write_obj(s, at).is_err() {
                self.bad_queue("the status byte is not guest memory");
            }
        }
        if let Err(e) = self.queue.add_used(&self.mem, head, used_len) {
            self.bad_queue(&format!("{e:?}"));
            return false;
        }
        let q = &self.counters.per_queue[self.index as usize];
        q.requests.fetch_add(1, Ordering::Relaxed);
        if s != S_OK {
            q.errors.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    fn record_latency(&self, since: Instant) {
        let ns = since.elapsed().as_nanos().min(60_000_000_000) as u64;
        let _ = self.counters.latency[self.index as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(ns.max(1));
    }

    /// Starts a request; true when it completed at once (a used entry).
    fn start(&mut self, req: Request) -> bool {
        let Request {
            head,
            status,
            action,
            taken,
        } = req;
        let Some(status_at) = status else {
            return self.finish(head, None, S_IOERR, 0);
        };
        let c = self.counters.clone();
        let (kind, ops, expect, read_to, bounce, bytes) = match action {
            Action::Reply(s) => {
                self.record_latency(taken);
                return self.finish(head, Some(status_at), s, 1);
            }
            Action::GetId(segs) => {
                c.get_ids.fetch_add(1, Ordering::Relaxed);
                let mut written = 0u32;
                for (addr, len) in segs {
                    let n = (len as usize).min(SERIAL_LEN - written as usize);
                    if n == 0 {
                        break;
                    }
                    let part = &self.serial[written as usize..written as usize + n];
                    if self.mem.write_slice(part, addr).is_err() {
                        c.bad_requests.fetch_add(1, Ordering::Relaxed);
                        return self.finish(head, Some(status_at), S_IOERR, 1);
                    }
                    written += n as u32;
                }
                self.record_latency(taken);
                return self.finish(head, Some(status_at), S_OK, written + 1);
            }
            Action::Read { offset, segs, len } => {
                c.reads.fetch_add(1, Ordering::Relaxed);
                let Some(iov) = self.iovecs(&segs, Permissions::Write) else {
                    c.bad_requests.fetch_add(1, Ordering::Relaxed);
                    return self.finish(head, Some(status_at), S_IOERR, 1);
                };
                let (iov, bounce) = self.maybe_bounce(iov, len, None);
                (
                    Kind::Read,
                    vec![Op::Read { offset, iov }],
                    Some(len),
                    segs,
                    bounce,
                    len,
                )
            }
            Action::Write { offset, segs, len } => {
                c.writes.fetch_add(1, Ordering::Relaxed);
                let Some(iov) = self.iovecs(&segs, Permissions::Read) else {
                    c.bad_requests.fetch_add(1, Ordering::Relaxed);
                    return self.finish(head, Some(status_at), S_IOERR, 1);
                };
                let (iov, bounce) = self.maybe_bounce(iov, len, Some(&segs));
                (
                    Kind::Write,
                    vec![Op::Write {
                        offset,
                        iov,
                        dsync: !self.flush_acked,
                    }],
                    Some(len),
                    Vec::new(),
                    bounce,
                    len,
                )
            }
            Action::Flush => {
                c.flushes.fetch_add(1, Ordering::Relaxed);
                (Kind::Flush, vec![Op::DataSync], None, Vec::new(), None, 0)
            }
            Action::Fallocate {
                ranges,
                mode,
                discard,
            } => {
                let (kind, n) = if discard {
                    (Kind::Discard, &c.discards)
                } else {
                    (Kind::WriteZeroes, &c.write_zeroes)
                };
                n.fetch_add(1, Ordering::Relaxed);
                let ops = ranges
                    .into_iter()
                    .map(|(offset, len)| Op::Fallocate { offset, len, mode })
                    .collect();
                (kind, ops, None, Vec::new(), None, 0)
            }
        };
        let slot = self
            .free
            .pop()
            .expect("a free slot (checked by the caller)");
        if bounce.is_some() {
            self.bounce_bytes += bytes as usize;
        }
        let write_seq =
            matches!(kind, Kind::Write | Kind::Discard | Kind::WriteZeroes).then(|| {
                let s = self.next_write;
                self.next_write += 1;
                self.writes_in_flight.insert(s);
                s
            });
        let used_len = if kind == Kind::Read {
            bytes as u32 + 1
        } else {
            1
        };
        self.slots[slot] = Some(InFlight {
            head,
            status: status_at,
            used_len,
            parts_left: ops.len(),
            ops,
            error: None,
            expect,
            kind,
            read_to,
            bounce,
            write_seq,
            taken,
            bytes,
        });
        if kind == Kind::Flush {
            let after = self.next_write;
            tracing::trace!(target: ORDER_TRACE, "{} q{} flush-received head={head} waits_for_writes_before={after}", self.name, self.index);
            self.waiting_flushes.push_back((slot, after));
            return self.issue_ready_flushes();
        }
        self.submit_slot(slot)
    }

    /// The bounce buffer a request needs (0: none): O_DIRECT with a guest
    /// buffer not sector-aligned (its host address has the guest address's
    /// alignment: regions are page-aligned).
    fn bounce_len(&self, req: &Request) -> usize {
        if !self.disk.direct {
            return 0;
        }
        match &req.action {
            Action::Read { segs, len, .. } | Action::Write { segs, len, .. }
                if segs.iter().any(|(a, l)| {
                    !a.0.is_multiple_of(SECTOR) || !(*l as u64).is_multiple_of(SECTOR)
                }) =>
            {
                *len as usize
            }
            _ => 0,
        }
    }

    /// With O_DIRECT, a guest buffer that is not sector-aligned goes
    /// through an aligned bounce buffer (writes: filled from `fill` now).
    fn maybe_bounce(
        &self,
        iov: Vec<libc::iovec>,
        len: u64,
        fill: Option<&[(GuestAddress, u32)]>,
    ) -> (Vec<libc::iovec>, Option<(Vec<u8>, usize)>) {
        let misaligned = |v: &libc::iovec| {
            !(v.iov_base as usize).is_multiple_of(SECTOR as usize)
                || !v.iov_len.is_multiple_of(SECTOR as usize)
        };
        if !self.disk.direct || !iov.iter().any(misaligned) {
            return (iov, None);
        }
        let (mut buf, at) = aligned(len as usize);
        if let Some(segs) = fill {
            let mut off = at;
            for &(addr, l) in segs {
                // (checked guest memory: iovecs() found it)
                let _ = self.mem.read_slice(&mut buf[off..off + l as usize], addr);
                off += l as usize;
            }
        }
        let iov = vec![libc::iovec {
            iov_base: buf[at..].as_mut_ptr().cast(),
            iov_len: len as usize,
        }];
        (iov, Some((buf, at)))
    }

    /// Submits a slot's operations; true when the request completed at
    /// once (every submission failed: a used entry was added).
    fn submit_slot(&mut self, slot: usize) -> bool {
        let n = self.slots[slot].as_ref().map_or(0, |f| f.ops.len());
        let mut used = false;
        for i in 0..n {
            let Some(f) = self.slots[slot].as_ref() else {
                break;
            };
            if let Err(e) = self.engine.submit(slot as u64, &f.ops[i]) {
                let errno = e.raw_os_error().unwrap_or(libc::EIO) as i64;
                used |= self.complete(Completion {
                    token: slot as u64,
                    result: -errno,
                });
            }
        }
        used
    }

    /// FLUSHes whose earlier writes have all completed get their
    /// fdatasync.
    fn issue_ready_flushes(&mut self) -> bool {
        let mut used = false;
        while let Some(&(slot, after)) = self.waiting_flushes.front() {
            if self.writes_in_flight.first().is_some_and(|&w| w < after) {
                break;
            }
            self.waiting_flushes.pop_front();
            let head = self.slots[slot].as_ref().map_or(0, |f| f.head);
            tracing::trace!(target: ORDER_TRACE, "{} q{} fdatasync-issued head={head}", self.name, self.index);
            used |= self.submit_slot(slot);
        }
        used
    }

    fn reap(&mut self) {
        let mut done = Vec::new();
        self.engine.reap(&mut done);
        let mut used = false;
        for c in done {
            used |= self.complete(c);
        }
        if used {
            self.notify();
        }
    }

    /// One operation finished; true when its request completed.
    fn complete(&mut self, c: Completion) -> bool {
        let slot = c.token as usize;
        let Some(f) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if c.result < 0 {
            f.error.get_or_insert(-c.result);
        } else if f.expect.is_some_and(|n| n != c.result as u64) {
            // a short read or write: the image shrank under us
            f.error.get_or_insert(libc::EIO as i64);
        }
        f.parts_left -= 1;
        if f.parts_left > 0 {
            return false;
        }
        let f = self.slots[slot].take().expect("in flight");
        self.free.push(slot);
        if f.bounce.is_some() {
            self.bounce_bytes = self.bounce_bytes.saturating_sub(f.bytes as usize);
        }
        let ok = f.error.is_none();
        if let Some(errno) = f.error {
            self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
            if !self.errno_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    "{}: {:?} on {} failed: {} (answered IOERR; logged once, counted)",
                    self.name,
                    f.kind,
                    self.disk.path.display(),
                    std::io::Error::from_raw_os_error(errno as i32)
                );
            }
        }
        if f.kind == Kind::Read && ok {
            match &f.bounce {
                Some((buf, at)) => {
                    let mut off = *at;
                    for &(addr, l) in &f.read_to {
                        let _ = self.mem.write_slice(&buf[off..off + l as usize], addr);
                        off += l as usize;
                    }
                }
                None => self.mark_dirty(&f.read_to),
            }
            self.counters
                .bytes_read
                .fetch_add(f.bytes, Ordering::Relaxed);
        }
        if f.kind == Kind::Write && ok {
            self.counters
                .bytes_written
                .fetch_add(f.bytes, Ordering::Relaxed);
        }
        if ok && matches!(f.kind, Kind::Read | Kind::Write) {
            self.counters.per_queue[self.index as usize]
                .bytes
                .fetch_add(f.bytes, Ordering::Relaxed);
        }
        if let Some(seq) = f.write_seq {
            self.writes_in_flight.remove(&seq);
            tracing::trace!(target: ORDER_TRACE, "{} q{} write-done seq={seq} head={}", self.name, self.index, f.head);
        }
        if f.kind == Kind::Flush {
            tracing::trace!(target: ORDER_TRACE, "{} q{} flush-completed head={} ok={ok}", self.name, self.index, f.head);
        }
        self.record_latency(f.taken);
        let (s, used_len) = if ok { (S_OK, f.used_len) } else { (S_IOERR, 1) };
        let used = self.finish(f.head, Some(f.status), s, used_len);
        self.issue_ready_flushes() | used
    }

    /// The kernel wrote these guest pages: migration must send them again.
    fn mark_dirty(&self, segs: &[(GuestAddress, u32)]) {
        for &(addr, len) in segs {
            if let Ok(slices) = self.mem.get_slices(addr, len as usize, Permissions::Write) {
                for s in slices.flatten() {
                    s.bitmap().mark_dirty(0, s.len());
                }
            }
        }
    }
}

/// A worker over `queue` for the fuzz target (features: FLUSH, DISCARD,
/// WRITE_ZEROES negotiated or not).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_worker<M: GuestMemory + Clone + Send + Sync + 'static>(
    mem: M,
    queue: Queue,
    disk: Arc<DiskImage>,
    engine: Box<dyn Engine>,
    (flush, discard, wz): (bool, bool, bool),
) -> impl FnMut(std::time::Duration) + 'static {
    let (interrupt, kick, _) = crate::fuzzing::quiet();
    let mut serial = [0u8; SERIAL_LEN];
    serial[..4].copy_from_slice(b"fuzz");
    let mut w = Worker {
        name: "blk-fuzz".into(),
        index: 0,
        mem,
        queue,
        kick,
        stop: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        interrupt,
        counters: Arc::new(BlkCounters::new(1)),
        disk,
        limiter: Arc::default(),
        engine,
        slots: (0..QUEUE_SIZE).map(|_| None).collect(),
        free: (0..QUEUE_SIZE as usize).rev().collect(),
        held: None,
        throttled: false,
        flush_acked: flush,
        discard_acked: discard,
        write_zeroes_acked: wz,
        next_write: 0,
        writes_in_flight: BTreeSet::new(),
        waiting_flushes: VecDeque::new(),
        serial,
        errno_logged: Arc::default(),
        bounce_bytes: 0,
    };
    move |limit| {
        if let Ok(mut timer) = TimerFd::new() {
            w.process_queue(&mut timer);
        }
        // every request in flight completes (as a pause drains them)
        crate::fuzzing::until(limit, || {
            w.reap();
            w.slots.iter().all(Option::is_none)
        });
        assert!(
            w.slots.iter().all(Option::is_none),
            "requests still in flight after {limit:?}"
        );
        let c = &w.counters;
        let handled = [
            &c.reads,
            &c.writes,
            &c.flushes,
            &c.discards,
            &c.write_zeroes,
            &c.get_ids,
        ]
        .iter()
        .map(|a| a.swap(0, Ordering::Relaxed))
        .sum::<u64>();
        crate::fuzzing::BLK_HANDLED.fetch_add(handled, Ordering::Relaxed);
        let refused = [&c.bad_requests, &c.unsupported, &c.bad_chains]
            .iter()
            .map(|a| a.swap(0, Ordering::Relaxed))
            .sum::<u64>();
        crate::fuzzing::BLK_REFUSED.fetch_add(refused, Ordering::Relaxed);
    }
}

/// Runs a fuzz worker until its requests completed.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_run(w: &mut impl FnMut(std::time::Duration), limit: std::time::Duration) {
    w(limit)
}

#[cfg(test)]
mod tests;
