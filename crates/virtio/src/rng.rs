//! virtio-rng (virtio 1.2, section 5.4): one queue whose device-writable
//! buffers the device fills with entropy from the host (getrandom, or a
//! file such as /dev/urandom), at most `rate` bytes a second (the token
//! bucket every device here uses). A worker thread serves the queue; a
//! buffer that is not all device-writable or not guest memory is given
//! back empty and counted.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::rate_limiter::RateLimiter;
use crate::{whole_chain, ActiveQueue, Interrupt, VirtioDevice, WorkerThread};

const QUEUE_SIZE: u16 = 64;
/// The most one request is given (a larger buffer gets this much).
const MAX_REQUEST: usize = 64 << 10;

/// Where the entropy comes from.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Source {
    /// getrandom(2).
    #[default]
    Getrandom,
    /// A file read in order (a character device such as /dev/urandom).
    File(std::path::PathBuf),
}

#[derive(Default)]
pub struct RngCounters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub bad_chains: AtomicU64,
    pub throttled: AtomicU64,
    pub source_errors: AtomicU64,
}

pub struct Rng<M> {
    source: Source,
    /// Bytes a second (None: no limit).
    rate: Option<u64>,
    pub counters: Arc<RngCounters>,
    worker: Option<WorkerThread<ActiveQueue>>,
    _mem: std::marker::PhantomData<M>,
}

impl<M> Rng<M> {
    /// Checks the source now: a file that cannot be read is refused.
    pub fn new(source: Source, rate: Option<u64>) -> Result<Self, String> {
        if let Source::File(p) = &source {
            std::fs::File::open(p)
                .and_then(|mut f| f.read_exact(&mut [0u8; 1]))
                .map_err(|e| format!("entropy source {}: {e}", p.display()))?;
        }
        Ok(Rng {
            source,
            rate,
            counters: Arc::default(),
            worker: None,
            _mem: std::marker::PhantomData,
        })
    }
}

impl<M> Drop for Rng<M> {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl<M: GuestMemory + Clone + Send + Sync + 'static> VirtioDevice<M> for Rng<M> {
    fn device_type(&self) -> u16 {
        4
    }

    fn features(&self) -> u64 {
        crate::F_VERSION_1 | crate::F_RING_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
        mut queues: Vec<ActiveQueue>,
        _acked: u64,
    ) -> Result<(), String> {
        let Some(q) = queues.pop() else {
            return Err("virtio-rng needs its queue enabled".into());
        };
        let file = match &self.source {
            Source::Getrandom => None,
            Source::File(p) => Some(
                std::fs::File::open(p)
                    .map_err(|e| format!("entropy source {}: {e}", p.display()))?,
            ),
        };
        let (stop, worker_stop) = crate::worker_stop_pair()?;
        let worker = Worker {
            mem,
            queue: q.queue,
            kick: q.kick,
            stop: worker_stop,
            interrupt,
            counters: self.counters.clone(),
            limiter: RateLimiter::new(None, self.rate),
            file,
            buf: vec![0; MAX_REQUEST],
        };
        self.worker = Some(WorkerThread::spawn(
            "rng".into(),
            seccomp::Role::DeviceWorker,
            stop,
            move || worker.run(),
        )?);
        Ok(())
    }

    fn reset(&mut self) -> Vec<ActiveQueue> {
        self.worker
            .take()
            .and_then(WorkerThread::stop)
            .map(|q| vec![q])
            .unwrap_or_default()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("requests", l(&c.requests)),
            ("bytes", l(&c.bytes)),
            ("bad_chains", l(&c.bad_chains)),
            ("throttled", l(&c.throttled)),
            ("source_errors", l(&c.source_errors)),
        ]
    }
}

struct Worker<M> {
    mem: M,
    queue: Queue,
    kick: EventFd,
    stop: EventFd,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<RngCounters>,
    limiter: RateLimiter,
    file: Option<std::fs::File>,
    buf: Vec<u8>,
}

const EV_KICK: u64 = 0;
const EV_STOP: u64 = 1;
const EV_TIMER: u64 = 2;

impl<M: GuestMemory + Clone + Send + Sync + 'static> Worker<M> {
    fn run(mut self) -> ActiveQueue {
        let (Ok(epoll), Ok(timer)) = (Epoll::new(), TimerFd::new()) else {
            tracing::error!("virtio-rng: epoll or timerfd; the device stops");
            return self.into_queue();
        };
        let add = |fd: i32, d: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, d))
        };
        if add(self.kick.as_raw_fd(), EV_KICK).is_err()
            || add(self.stop.as_raw_fd(), EV_STOP).is_err()
            || add(timer.as_raw_fd(), EV_TIMER).is_err()
        {
            return self.into_queue();
        }
        let mut timer = timer;
        self.serve(&mut timer);
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return self.into_queue(),
            };
            for ev in &events[..n] {
                match ev.data() {
                    EV_STOP => return self.into_queue(),
                    EV_KICK => {
                        let _ = self.kick.read();
                    }
                    EV_TIMER => {
                        let _ = timer.wait();
                    }
                    _ => {}
                }
            }
            self.serve(&mut timer);
        }
    }

    fn into_queue(self) -> ActiveQueue {
        ActiveQueue {
            queue: self.queue,
            kick: self.kick,
        }
    }

    /// Fills the posted buffers while the limiter lets it.
    fn serve(&mut self, timer: &mut TimerFd) {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            if self.limiter.is_limited() {
                // (one token check a request: its size is known only once
                // the chain is read, so the bucket may go into debt)
                if let Err(wait) = self.limiter.take(0) {
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    let _ = timer.reset(wait, None);
                    break;
                }
            }
            let chain = match crate::pop_chain(&mut self.queue, &mem) {
                crate::Popped::Chain(c) => c,
                crate::Popped::Empty => break,
                crate::Popped::Broken(_) => {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            let head = chain.head_index();
            let mut written = 0u32;
            match whole_chain(chain) {
                Some(descs) if descs.iter().all(|d| d.is_write_only()) => {
                    for d in descs {
                        let room = MAX_REQUEST - written as usize;
                        let n = (d.len() as usize).min(room);
                        if n == 0 {
                            break;
                        }
                        if !self.fill(n) {
                            break;
                        }
                        if mem.write_slice(&self.buf[..n], d.addr()).is_err() {
                            self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        written += n as u32;
                    }
                    if self.limiter.is_limited() {
                        // the bytes taken count against the bucket
                        let _ = self.limiter.take(written as u64);
                    }
                }
                _ => {
                    self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(written as u64, Ordering::Relaxed);
            if self.queue.add_used(&mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        if used {
            let _ = crate::signal_used(&mut self.queue, &mem, &*self.interrupt, 0);
        }
    }

    /// `n` bytes of entropy into the buffer.
    fn fill(&mut self, n: usize) -> bool {
        let ok = match &mut self.file {
            Some(f) => f.read_exact(&mut self.buf[..n]).is_ok(),
            None => getrandom(&mut self.buf[..n]),
        };
        if !ok && self.counters.source_errors.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::error!("virtio-rng: the entropy source failed (logged once, counted)");
        }
        ok
    }
}

/// Serves fuzzed buffers with the worker's own `serve` until nothing
/// moves (`file`: the entropy source, getrandom when None; `rate`: bytes a
/// second); returns (requests, bytes given).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_run<M: GuestMemory + Clone + Send + Sync + 'static>(
    mem: M,
    queue: Queue,
    file: Option<std::fs::File>,
    rate: Option<u64>,
) -> (u64, u64) {
    let (interrupt, kick, _) = crate::fuzzing::quiet();
    let counters = Arc::new(RngCounters::default());
    let mut w = Worker {
        mem,
        queue,
        kick,
        stop: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        interrupt,
        counters: counters.clone(),
        limiter: RateLimiter::new(None, rate),
        file,
        buf: vec![0; MAX_REQUEST],
    };
    let Ok(mut timer) = TimerFd::new() else {
        return (0, 0);
    };
    for _ in 0..2 {
        w.serve(&mut timer);
    }
    let _ = w.into_queue();
    (
        counters.requests.load(Ordering::Relaxed),
        counters.bytes.load(Ordering::Relaxed),
    )
}

/// Fills `buf` from getrandom(2).
fn getrandom(buf: &mut [u8]) -> bool {
    let mut at = 0;
    while at < buf.len() {
        // SAFETY: getrandom writes at most the given length into the
        // buffer we own.
        let r = unsafe { libc::getrandom(buf[at..].as_mut_ptr().cast(), buf.len() - at, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        at += r as usize;
    }
    true
}
