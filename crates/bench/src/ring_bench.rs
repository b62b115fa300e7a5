//! `nfvisor bench ivshmem`: the packet ring between two host processes,
//! each pinned to its own CPU, over shared memory (a file in /dev/shm,
//! mapped MAP_SHARED by both, as two VMs map an ivshmem region). 64-byte
//! packets carry a sequence number the consumer verifies; every 64th
//! carries a CLOCK_MONOTONIC stamp for the one-way latency. The cross-core
//! streaming limit is measured in the same run: the same two processes
//! moving 64 KiB slots, as cache lines per second.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::BenchError;

pub const SLOT: usize = 64;
pub const CAPACITY: usize = 8192;
const STREAM_SLOT: usize = 64 * 1024;
const STREAM_CAPACITY: usize = 64;
const SENTINEL: u64 = u64::MAX;

fn err(what: &str, why: impl std::fmt::Display) -> BenchError {
    BenchError::Run {
        what: what.to_string(),
        why: why.to_string(),
    }
}

/// A shared mapping of a file.
pub struct Mapping {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Mapping {
    pub fn open(path: &Path, len: usize, create: bool) -> Result<Mapping, BenchError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(|e| err(&path.display().to_string(), e))?;
        if create {
            f.set_len(len as u64)
                .map_err(|e| err(&path.display().to_string(), e))?;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of a file of at least `len` bytes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(err(
                &path.display().to_string(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Mapping {
            ptr: ptr as *mut u8,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for the write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn wait_until(start_ns: u64) {
    while mono_ns() < start_ns {
        std::hint::spin_loop();
    }
}

/// What one worker process reports (JSON on its stdout).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WorkerReport {
    pub role: String,
    pub cpu: usize,
    pub packets: u64,
    pub seconds: f64,
    pub errors: u64,
    pub latency_p50_ns: u64,
    pub latency_p99_ns: u64,
}

/// One side's parameters: the hidden `bench ring-worker` subcommand's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerSpec {
    /// producer or consumer.
    #[arg(long)]
    pub role: String,
    /// The shared file holding the ring.
    #[arg(long)]
    pub path: PathBuf,
    #[arg(long)]
    pub cpu: usize,
    #[arg(long)]
    pub batch: usize,
    #[arg(long)]
    pub slot: usize,
    #[arg(long)]
    pub capacity: usize,
    #[arg(long)]
    pub seconds: f64,
    /// CLOCK_MONOTONIC ns at which both sides start.
    #[arg(long)]
    pub start_ns: u64,
}

pub fn worker(w: &WorkerSpec) -> Result<WorkerReport, BenchError> {
    let WorkerSpec {
        role,
        path,
        cpu,
        batch,
        slot,
        capacity,
        seconds,
        start_ns,
    } = w.clone();
    let (role, path) = (role.as_str(), path.as_path());
    rt::pin_current_thread(&[cpu]).map_err(|e| err("pinning", e))?;
    let map = Mapping::open(path, ring::region_size(capacity, slot), false)?;
    let mut report = WorkerReport {
        role: role.into(),
        cpu,
        ..Default::default()
    };
    match role {
        "producer" => {
            // SAFETY: the mapping outlives the producer; one producer per ring.
            let mut p =
                unsafe { ring::Producer::attach(map.ptr, map.len) }.map_err(|e| err("ring", e))?;
            wait_until(start_ns);
            let t0 = Instant::now();
            let deadline = Duration::from_secs_f64(seconds);
            let mut seq = 0u64;
            while t0.elapsed() < deadline {
                let n = p.fill_batch(batch, |s| {
                    // the whole packet is written (payload byte = sequence)
                    s.fill(seq as u8);
                    s[..8].copy_from_slice(&seq.to_le_bytes());
                    let stamp = if seq.is_multiple_of(64) { mono_ns() } else { 0 };
                    s[8..16].copy_from_slice(&stamp.to_le_bytes());
                    seq += 1;
                });
                if n == 0 {
                    std::hint::spin_loop();
                }
            }
            report.seconds = t0.elapsed().as_secs_f64();
            while p.fill_batch(1, |s| s[..8].copy_from_slice(&SENTINEL.to_le_bytes())) == 0 {
                std::hint::spin_loop();
            }
            report.packets = seq;
        }
        "consumer" => {
            // SAFETY: the mapping outlives the consumer; one consumer per ring.
            let mut c =
                unsafe { ring::Consumer::attach(map.ptr, map.len) }.map_err(|e| err("ring", e))?;
            let mut hist: Histogram<u64> =
                Histogram::new_with_bounds(1, 10_000_000_000, 2).expect("static bounds");
            let (mut expect, mut errors, mut done) = (0u64, 0u64, false);
            wait_until(start_ns);
            let t0 = Instant::now();
            while !done {
                let n = c.drain_batch(batch.max(32), |s| {
                    let seq = u64::from_le_bytes(s[..8].try_into().unwrap());
                    if seq == SENTINEL {
                        done = true;
                        return;
                    }
                    // the sequence, and the payload's last byte
                    if seq != expect || s[s.len() - 1] != seq as u8 {
                        errors += 1;
                    }
                    expect = seq + 1;
                    if s.len() > 64 {
                        // streaming: every byte of the slot is read
                        let sum = s[16..]
                            .chunks_exact(8)
                            .fold(0u64, |a, w| a ^ u64::from_ne_bytes(w.try_into().unwrap()));
                        std::hint::black_box(sum);
                    }
                    let stamp = u64::from_le_bytes(s[8..16].try_into().unwrap());
                    if stamp != 0 {
                        hist.saturating_record(mono_ns().saturating_sub(stamp).max(1));
                    }
                });
                if n == 0 {
                    std::hint::spin_loop();
                }
            }
            report.seconds = t0.elapsed().as_secs_f64();
            report.packets = expect;
            report.errors = errors;
            report.latency_p50_ns = hist.value_at_quantile(0.5);
            report.latency_p99_ns = hist.value_at_quantile(0.99);
        }
        other => return Err(err("--role", format!("{other:?}: producer or consumer"))),
    }
    Ok(report)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchResult {
    pub batch: usize,
    pub mpps: f64,
    pub packets: u64,
    pub verified: bool,
    pub latency_p50_ns: u64,
    pub latency_p99_ns: u64,
    /// Packets per second over the streaming limit in cache lines per second.
    pub share_of_streaming_limit: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RingReport {
    pub producer_cpu: usize,
    pub consumer_cpu: usize,
    pub slot_bytes: usize,
    pub ring_slots: usize,
    pub seconds_per_run: f64,
    pub streaming_gb_s: f64,
    pub streaming_lines_per_s: f64,
    pub results: Vec<BatchResult>,
}

fn run_pair(
    exe: &Path,
    path: &Path,
    cpus: (usize, usize),
    batch: usize,
    slot: usize,
    capacity: usize,
    seconds: f64,
) -> Result<(WorkerReport, WorkerReport), BenchError> {
    let map = Mapping::open(path, ring::region_size(capacity, slot), true)?;
    // SAFETY: the mapping is fresh and stays alive until both workers end.
    unsafe { ring::init(map.ptr, map.len, slot, capacity) }.map_err(|e| err("ring", e))?;
    let start = mono_ns() + 200_000_000;
    let spawn = |role: &str, cpu: usize| {
        Command::new(exe)
            .args(["bench", "ring-worker", "--role", role, "--path"])
            .arg(path)
            .args([
                "--cpu",
                &cpu.to_string(),
                "--batch",
                &batch.to_string(),
                "--slot",
                &slot.to_string(),
            ])
            .args([
                "--capacity",
                &capacity.to_string(),
                "--seconds",
                &seconds.to_string(),
                "--start-ns",
                &start.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| err("starting a ring worker", e))
    };
    let consumer = spawn("consumer", cpus.1)?;
    let producer = spawn("producer", cpus.0)?;
    let read = |c: std::process::Child| -> Result<WorkerReport, BenchError> {
        let out = c.wait_with_output().map_err(|e| err("ring worker", e))?;
        serde_json::from_slice(&out.stdout).map_err(|e| err("ring worker output", e))
    };
    let p = read(producer)?;
    let c = read(consumer)?;
    drop(map);
    Ok((p, c))
}

/// The whole benchmark.
pub fn run(exe: &Path, seconds: f64, batches: &[usize]) -> Result<RingReport, BenchError> {
    let cpus = rt::online_cpus().map_err(|e| err("online CPUs", e))?;
    if cpus.len() < 2 {
        return Err(err("bench ivshmem", "two CPUs are needed"));
    }
    let pair = (cpus[0], cpus[1]);
    let path: PathBuf = PathBuf::from(format!("/dev/shm/nfvisor-ring-{}", std::process::id()));
    let result = (|| {
        let (_, s) = run_pair(exe, &path, pair, 1, STREAM_SLOT, STREAM_CAPACITY, seconds)?;
        let streaming_bytes = s.packets as f64 * STREAM_SLOT as f64 / s.seconds.max(1e-9);
        let lines = streaming_bytes / 64.0;
        let mut results = Vec::new();
        for &batch in batches {
            let (p, c) = run_pair(exe, &path, pair, batch, SLOT, CAPACITY, seconds)?;
            let pps = c.packets as f64 / c.seconds.max(1e-9);
            results.push(BatchResult {
                batch,
                mpps: pps / 1e6,
                packets: c.packets,
                verified: c.errors == 0 && c.packets == p.packets,
                latency_p50_ns: c.latency_p50_ns,
                latency_p99_ns: c.latency_p99_ns,
                share_of_streaming_limit: pps / lines,
            });
        }
        Ok(RingReport {
            producer_cpu: pair.0,
            consumer_cpu: pair.1,
            slot_bytes: SLOT,
            ring_slots: CAPACITY,
            seconds_per_run: seconds,
            streaming_gb_s: streaming_bytes / 1e9,
            streaming_lines_per_s: lines,
            results,
        })
    })();
    let _ = std::fs::remove_file(&path);
    result
}
