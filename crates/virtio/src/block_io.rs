//! Asynchronous I/O on a disk image, so a virtio-blk queue worker never
//! blocks on the disk: io_uring where the kernel offers it (and the
//! operations a disk needs), a small thread pool of blocking syscalls
//! otherwise. Either way the worker submits operations tagged with a token
//! and learns of completions on an eventfd it waits on beside its queue.
//!
//! The operations' buffers are host addresses of guest memory: the caller
//! keeps the guest memory mapped and the iovec arrays alive until each
//! operation's completion has been reaped.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

/// The most operations one request becomes (a DISCARD or WRITE_ZEROES of
/// its most ranges).
pub const OPS_PER_REQUEST: u32 = 32;

/// Which engine serves a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring when it works here, else the thread pool.
    #[default]
    Auto,
    IoUring,
    Threads,
}

impl std::str::FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "io_uring" | "io-uring" => Ok(EngineChoice::IoUring),
            "threads" => Ok(EngineChoice::Threads),
            _ => Err(format!("aio {s:?}: use io_uring, threads or auto")),
        }
    }
}

/// One operation on the image.
pub enum Op {
    /// Into `iov` from the image at `offset`.
    Read { offset: u64, iov: Vec<libc::iovec> },
    /// From `iov` to the image; `dsync`: durable before it completes (a
    /// driver without FLUSH gets write-through).
    Write {
        offset: u64,
        iov: Vec<libc::iovec>,
        dsync: bool,
    },
    /// fdatasync.
    DataSync,
    /// fallocate with `mode` (punch hole or zero range, size kept).
    Fallocate { offset: u64, len: u64, mode: i32 },
}

// SAFETY: the iovecs are host addresses of guest memory (or of a bounce
// buffer) that the submitter keeps mapped and alive until the operation
// completes; nothing else about an Op ties it to a thread.
unsafe impl Send for Op {}

/// A finished operation: its token and the syscall's result (bytes, or a
/// negative errno).
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub token: u64,
    pub result: i64,
}

pub trait Engine: Send {
    /// "io_uring" or "threads".
    fn name(&self) -> &'static str;
    /// Starts `op` (which the caller keeps alive until its completion).
    fn submit(&mut self, token: u64, op: &Op) -> std::io::Result<()>;
    /// Readable when completions are waiting.
    fn event_fd(&self) -> RawFd;
    /// Takes the completions that are waiting.
    fn reap(&mut self, out: &mut Vec<Completion>);
}

/// The engine `choice` asks for on `fd`, with room for `depth` operations
/// in flight; Err names why io_uring was asked for and cannot be had.
pub fn engine(choice: EngineChoice, fd: RawFd, depth: u32) -> Result<Box<dyn Engine>, String> {
    match choice {
        EngineChoice::Threads => Ok(Box::new(ThreadPool::new(fd, 4)?)),
        EngineChoice::IoUring => Ok(Box::new(Uring::new(fd, depth)?)),
        EngineChoice::Auto => match Uring::new(fd, depth) {
            Ok(u) => Ok(Box::new(u)),
            Err(why) => {
                tracing::info!("io_uring not used ({why}): a thread pool serves the disk");
                Ok(Box::new(ThreadPool::new(fd, 4)?))
            }
        },
    }
}

struct Uring {
    ring: IoUring,
    fd: RawFd,
    done: EventFd,
}

impl Uring {
    fn new(fd: RawFd, depth: u32) -> Result<Uring, String> {
        // the completion ring holds every operation that can be in flight:
        // a request may be many (a DISCARD of 32 ranges), so the
        // completions of `depth` requests of OPS_PER_REQUEST operations
        // each never overflow it
        let entries = depth.next_power_of_two().max(8);
        // the ring starts disabled so it can be restricted to the four
        // operations this engine submits (IORING_REGISTER_RESTRICTIONS):
        // io_uring's own work bypasses seccomp
        let ring = IoUring::builder()
            .setup_cqsize((entries * OPS_PER_REQUEST).next_power_of_two())
            .setup_r_disabled()
            .build(entries)
            .map_err(|e| format!("io_uring_setup: {e}"))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("probing io_uring: {e}"))?;
        for (code, name) in [
            (opcode::Readv::CODE, "readv"),
            (opcode::Writev::CODE, "writev"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Fallocate::CODE, "fallocate"),
        ] {
            if !probe.is_supported(code) {
                return Err(format!("this kernel's io_uring has no {name}"));
            }
        }
        let done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| format!("eventfd: {e}"))?;
        ring.submitter()
            .register_eventfd(done.as_raw_fd())
            .map_err(|e| format!("registering the completion eventfd: {e}"))?;
        let mut allowed: Vec<io_uring::register::Restriction> = [
            opcode::Readv::CODE,
            opcode::Writev::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
        ]
        .into_iter()
        .map(io_uring::register::Restriction::sqe_op)
        .collect();
        ring.submitter()
            .register_restrictions(&mut allowed)
            .map_err(|e| format!("restricting the ring to its operations: {e}"))?;
        ring.submitter()
            .register_enable_rings()
            .map_err(|e| format!("enabling the ring: {e}"))?;
        Ok(Uring { ring, fd, done })
    }
}

impl Engine for Uring {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn submit(&mut self, token: u64, op: &Op) -> std::io::Result<()> {
        let fd = types::Fd(self.fd);
        let entry = match op {
            Op::Read { offset, iov } => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(*offset)
                .build(),
            Op::Write { offset, iov, dsync } => {
                opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(*offset)
                    .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Op::DataSync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        }
        .user_data(token);
        loop {
            // SAFETY: the entry's buffers (iovec arrays and what they
            // point at) stay valid until its completion is reaped: the
            // caller's contract for `submit`.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // the submission queue is full: hand it to the kernel first
            // (nothing of this entry is queued yet: an error is its own)
            self.ring.submit()?;
        }
        // queued: from here the operation will complete, whatever this
        // submit says (one that fails is retried at the next reap), so no
        // error may make the caller free its buffers
        if let Err(e) = self.ring.submit() {
            tracing::debug!("io_uring_enter: {e}; retried at the next completion");
        }
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        self.done.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.done.read();
        // entries a failed submit left queued go now
        let _ = self.ring.submit();
        for c in self.ring.completion() {
            out.push(Completion {
                token: c.user_data(),
                result: c.result() as i64,
            });
        }
    }
}

/// Jobs and results shared by the pool's threads.
#[derive(Default)]
struct PoolState {
    jobs: VecDeque<(u64, Job)>,
    stop: bool,
}

/// An operation as a pool thread runs it (its own copy of the iovecs).
struct Job {
    kind: JobKind,
    offset: u64,
    len: u64,
    iov: Vec<libc::iovec>,
}

#[derive(Clone, Copy)]
enum JobKind {
    Read,
    Write { dsync: bool },
    DataSync,
    Fallocate(i32),
}

// SAFETY: as for Op: the submitter keeps the buffers alive until the
// completion is reaped.
unsafe impl Send for Job {}

/// Blocking syscalls on a few threads: where io_uring is missing or
/// disabled (io_uring_disabled, seccomp in a container).
struct ThreadPool {
    shared: Arc<(Mutex<PoolState>, Condvar)>,
    results: Arc<Mutex<Vec<Completion>>>,
    done: Arc<EventFd>,
    threads: Vec<JoinHandle<Option<()>>>,
}

impl ThreadPool {
    fn new(fd: RawFd, n: usize) -> Result<ThreadPool, String> {
        let done = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let shared: Arc<(Mutex<PoolState>, Condvar)> = Arc::default();
        let results: Arc<Mutex<Vec<Completion>>> = Arc::default();
        let mut threads = Vec::new();
        for i in 0..n {
            let (shared, results, done) = (shared.clone(), results.clone(), done.clone());
            let t = seccomp::spawn(
                format!("blk-io{i}"),
                seccomp::Role::BlockWorker,
                move || loop {
                    let (token, job) = {
                        let (lock, cv) = &*shared;
                        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            if let Some(j) = s.jobs.pop_front() {
                                break j;
                            }
                            if s.stop {
                                return;
                            }
                            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
                        }
                    };
                    let result = run_job(fd, &job);
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Completion { token, result });
                    let _ = done.write(1);
                },
            )
            .map_err(|e| format!("spawning an I/O thread: {e}"))?;
            threads.push(t);
        }
        Ok(ThreadPool {
            shared,
            results,
            done,
            threads,
        })
    }
}

fn run_job(fd: RawFd, job: &Job) -> i64 {
    // SAFETY: each call works on the descriptor the disk keeps open and on
    // iovecs whose buffers the submitter keeps alive until this job's
    // completion is reaped.
    let r = unsafe {
        match job.kind {
            JobKind::Read => libc::preadv(
                fd,
                job.iov.as_ptr(),
                job.iov.len() as i32,
                job.offset as i64,
            ) as i64,
            JobKind::Write { dsync } => libc::pwritev2(
                fd,
                job.iov.as_ptr(),
                job.iov.len() as i32,
                job.offset as i64,
                if dsync { libc::RWF_DSYNC } else { 0 },
            ) as i64,
            JobKind::DataSync => libc::fdatasync(fd) as i64,
            JobKind::Fallocate(mode) => {
                libc::fallocate(fd, mode, job.offset as i64, job.len as i64) as i64
            }
        }
    };
    if r < 0 {
        -(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as i64)
    } else {
        r
    }
}

impl Engine for ThreadPool {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn submit(&mut self, token: u64, op: &Op) -> std::io::Result<()> {
        let job = match op {
            Op::Read { offset, iov } => Job {
                kind: JobKind::Read,
                offset: *offset,
                len: 0,
                iov: iov.clone(),
            },
            Op::Write { offset, iov, dsync } => Job {
                kind: JobKind::Write { dsync: *dsync },
                offset: *offset,
                len: 0,
                iov: iov.clone(),
            },
            Op::DataSync => Job {
                kind: JobKind::DataSync,
                offset: 0,
                len: 0,
                iov: Vec::new(),
            },
            Op::Fallocate { offset, len, mode } => Job {
                kind: JobKind::Fallocate(*mode),
                offset: *offset,
                len: *len,
                iov: Vec::new(),
            },
        };
        let (lock, cv) = &*self.shared;
        lock.lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .push_back((token, job));
        cv.notify_one();
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        self.done.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.done.read();
        out.append(&mut self.results.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both engines write, sync, read back, punch and zero a real file.
    #[test]
    fn both_engines_do_every_operation_on_a_file() {
        for choice in [EngineChoice::IoUring, EngineChoice::Threads] {
            let path = std::env::temp_dir().join(format!(
                "nfv-blkio-ut-{}-{choice:?}.img",
                std::process::id()
            ));
            std::fs::write(&path, vec![0u8; 16384]).unwrap();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut e = match engine(choice, file.as_raw_fd(), 16) {
                Ok(e) => e,
                // (a kernel without io_uring: Auto falls back, and the
                // thread pool is still tested)
                Err(why) if choice == EngineChoice::IoUring => {
                    eprintln!("io_uring unavailable here: {why}");
                    continue;
                }
                Err(why) => panic!("{why}"),
            };
            let mut data = vec![0xabu8; 4096];
            let mut back = vec![0u8; 4096];
            let iov = |b: &mut Vec<u8>| {
                vec![libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                }]
            };
            let ops = [
                Op::Write {
                    offset: 4096,
                    iov: iov(&mut data),
                    dsync: false,
                },
                Op::DataSync,
                Op::Read {
                    offset: 4096,
                    iov: iov(&mut back),
                },
                Op::Fallocate {
                    offset: 8192,
                    len: 4096,
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                },
            ];
            for (i, op) in ops.iter().enumerate() {
                e.submit(i as u64, op).unwrap();
                let mut got = Vec::new();
                while got.is_empty() {
                    e.reap(&mut got);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                assert_eq!(got[0].token, i as u64);
                assert!(got[0].result >= 0, "{choice:?} op {i}: {}", got[0].result);
            }
            assert_eq!(back, data, "{}", e.name());
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 16384);
            let _ = std::fs::remove_file(&path);
        }
    }
}
