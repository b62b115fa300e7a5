//! Live migration, the sending side: pre-copy rounds over dirty logging
//! (KVM's dirty ring or bitmap, and the VMM's own writes), stop-and-copy,
//! and the two-phase hand-over (the destination says READY after verifying
//! everything; the source says GO; the destination resumes and answers
//! RUNNING; only then does the source stop). The control lines beside the
//! stream are typed in `migration::control`; the receiving side is
//! receive.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use migration::{Kind, Writer, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub use migration::control::Line;
pub use migration::report::{DowntimePhases, MigrationReport, Progress};

use crate::page_walk::{io, send_part, Limiter, PartCount};
use crate::vm_handle::{RunState, VmHandle};
use crate::{memory, Error, Result};

/// A migration endpoint: `unix:PATH` or `tcp:HOST:PORT`.
pub enum Endpoint {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl Endpoint {
    pub fn parse(s: &str) -> std::result::Result<Endpoint, String> {
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Endpoint::Unix(p.into())),
            Some(("tcp", a)) if a.contains(':') => Ok(Endpoint::Tcp(a.to_string())),
            _ => Err(format!("{s:?}: give unix:PATH or tcp:HOST:PORT")),
        }
    }
}

/// A connected stream, both directions.
pub trait Link: Read + Write + Send {
    fn split(&self) -> std::io::Result<Box<dyn Link>>;
    /// Reads wait at most this long (SO_RCVTIMEO, the socket's).
    fn set_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
    /// Writes wait at most this long (SO_SNDTIMEO, the socket's).
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
    /// The socket's descriptor (for the test-only fault hook).
    fn raw_fd(&self) -> i32;
}

impl Link for UnixStream {
    fn split(&self) -> std::io::Result<Box<dyn Link>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, d)
    }
    fn raw_fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

impl Link for TcpStream {
    fn split(&self) -> std::io::Result<Box<dyn Link>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_write_timeout(self, d)
    }
    fn raw_fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

pub fn connect(to: &Endpoint) -> std::io::Result<Box<dyn Link>> {
    Ok(match to {
        Endpoint::Unix(p) => Box::new(UnixStream::connect(p)?),
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a)?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    })
}

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Proves to the destination that we know its token.
    pub token: Option<Vec<u8>>,
    pub downtime: Duration,
    pub timeout: Duration,
    /// On timeout: stop the guest and complete (true) or abort (false).
    pub force: bool,
    /// Pre-copy sends at most this many bytes per second (stop-and-copy is
    /// never held back: that is downtime).
    pub bandwidth_limit: Option<u64>,
    /// Streams in parallel: each carries the pages of its share of guest
    /// memory (2 MiB chunks, dealt round-robin, so a page always travels on
    /// the same one and its versions arrive in order), read and written by a
    /// thread of its own; the first also carries the state.
    pub connections: usize,
    /// How long one write of the stream may wait for the destination to
    /// read, and each answer (PREPARED, its VM created; SYNCED; READY;
    /// RUNNING) may take: a destination that stops reading fails the
    /// migration (and, before GO, the guest runs on here) instead of
    /// holding it paused.
    pub io_timeout: Duration,
}

/// How long a connecting peer has to answer the receiver's challenge, all
/// of it.
pub const GREETING_DEADLINE: Duration = Duration::from_secs(5);

/// The default of `io_timeout` (and of `receive --io-timeout`).
pub const DEFAULT_IO_TIMEOUT_S: f64 = 30.0;

/// The destination's confirmation: the downtime and, for each of its
/// steps, when it happened after the source's pause (signed: the
/// destination's clock may be behind the source's).
pub fn running_line(downtime_ns: i128, paused_at: u128, marks: &[(&str, u128)]) -> Line {
    Line::Running {
        downtime_ns: Some(downtime_ns),
        steps: marks
            .iter()
            .filter(|(_, at)| *at > 0)
            .map(|(name, at)| (name.to_string(), *at as i128 - paused_at as i128))
            .collect(),
    }
}

/// Reads the peer's next control line: the line, or what came instead
/// (an I/O error, the connection closed, a line that is not one of ours).
fn next_line(back: &mut BufReader<Box<dyn Link>>) -> std::result::Result<Line, String> {
    let mut line = String::new();
    match back.read_line(&mut line) {
        Err(e) => Err(e.to_string()),
        Ok(0) => Err("connection closed".into()),
        Ok(_) => Line::parse(&line).map_err(|e| e.to_string()),
    }
}

fn ms_since(at: u128) -> f64 {
    crate::clock::now_ns().saturating_sub(at) as f64 / 1e6
}

/// Sends the given pages (all of guest memory when `dirty` is None):
/// non-zero pages with their data, zero pages as markers (only when
/// re-sent: the destination starts from zero memory). With several
/// writers, each sends its share of memory from a thread of its own.
fn send_pages<W: Write + Send>(
    h: &VmHandle,
    ws: &mut [Writer<W>],
    dirty: Option<&[Vec<u64>]>,
    report: &mut MigrationReport,
    limiter: Option<&Limiter>,
) -> Result<u64> {
    // first round: the pages worth sending (touched and not zero), found by
    // scanning memory on several threads; later rounds: the dirty ones
    let first;
    let selection = match dirty {
        Some(d) => d,
        None => {
            let scan = crate::page_walk::first_round_pages(&h.mem);
            report.scan_threads = scan.scan_threads;
            report.untouched_pages += scan.untouched_pages;
            report.zero_pages += scan.zero_pages;
            first = scan.bitmaps;
            first.as_slice()
        }
    };
    let later = report.rounds > 0;
    let parts = ws.len();
    let sent_so_far = AtomicU64::new(report.pages_sent);
    let mem = &h.mem;
    let results: Vec<Result<PartCount>> = if parts == 1 {
        vec![send_part(
            mem,
            &mut ws[0],
            selection,
            (0, 1),
            later,
            limiter,
            &sent_so_far,
        )]
    } else {
        std::thread::scope(|scope| {
            let workers: Vec<_> = ws
                .iter_mut()
                .enumerate()
                .map(|(i, w)| {
                    let sent_so_far = &sent_so_far;
                    scope.spawn(move || {
                        send_part(mem, w, selection, (i, parts), later, limiter, sent_so_far)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(Error::Device("a migration sender thread panicked".into()))
                    })
                })
                .collect()
        })
    };
    let mut looked = 0;
    for r in results {
        let c = r?;
        report.pages_sent += c.sent;
        report.zero_pages += c.zero;
        looked += c.looked;
    }
    Ok(looked)
}

/// The destination's clock against ours, from one Sync round trip.
#[derive(Debug, Clone, Copy)]
struct ClockSample {
    rtt: Duration,
    /// Destination CLOCK_REALTIME minus ours, ns (NTP's estimate: its
    /// answer's time against the middle of the round trip; off by at most
    /// half the round trip).
    offset_ns: i128,
}

/// A Sync frame on every stream, then the destination's SYNCED answer for
/// each: it has applied everything sent so far. The first stream's answer
/// carries the destination's clock: a sample of the offset between hosts.
fn sync<W: Write>(
    ws: &mut [Writer<W>],
    back: &mut BufReader<Box<dyn Link>>,
    seq: u32,
    to: &str,
    io_timeout: Duration,
) -> Result<Option<ClockSample>> {
    let (sent, sent_ns) = (Instant::now(), crate::clock::now_ns());
    for w in ws.iter_mut() {
        w.frame(Kind::Sync, &(seq as u64).to_le_bytes())
            .map_err(io)?;
    }
    flush_all(ws)?;
    // a destination that stops answering fails the migration in time
    let _ = back.get_ref().set_timeout(Some(io_timeout));
    let mut answered = vec![false; ws.len()];
    let mut sample = None;
    while answered.contains(&false) {
        match next_line(back) {
            Ok(Line::Synced {
                stream,
                seq: n,
                clock_ns,
            }) if n == seq as u64 => {
                let (rtt, back_ns) = (sent.elapsed(), crate::clock::now_ns());
                if let (0, Some(dest_ns)) = (stream, clock_ns) {
                    let middle = (sent_ns as i128 + back_ns as i128) / 2;
                    sample = Some(ClockSample {
                        rtt,
                        offset_ns: dest_ns - middle,
                    });
                }
                if let Some(a) = answered.get_mut(stream) {
                    *a = true;
                }
            }
            // (an answer to an earlier Sync)
            Ok(Line::Synced { .. }) => {}
            other => {
                return Err(Error::Device(format!(
                    "waiting for {to} to catch up: {}; the guest runs on here",
                    match other {
                        Ok(l) => l.to_string(),
                        Err(e) => e,
                    }
                )))
            }
        }
    }
    let _ = back.get_ref().set_timeout(None);
    Ok(sample)
}

fn flush_all<W: Write>(ws: &mut [Writer<W>]) -> Result<()> {
    for w in ws {
        w.flush().map_err(io)?;
    }
    Ok(())
}

fn dirty_bitmaps(h: &VmHandle) -> Result<Vec<Vec<u64>>> {
    let mut maps: Vec<Vec<u64>> = h
        .mem
        .iter()
        .map(|r| vec![0u64; (r.len() / PAGE_SIZE as u64).div_ceil(64) as usize])
        .collect();
    add_dirty(h, &mut maps)?;
    Ok(maps)
}

/// Adds the pages dirtied since the last harvest to `maps` (one bitmap per
/// slot). The stop-and-copy adds them to the bitmaps it already holds: a
/// fresh 256 KiB bitmap (8 GiB guest) is fresh memory, and its page
/// faults cost time inside the downtime (BENCHMARKS.md).
fn add_dirty(h: &VmHandle, maps: &mut [Vec<u64>]) -> Result<()> {
    // the pages the VMM wrote itself (devices): KVM logs only the guest's
    for (r, map) in h.mem.iter().zip(maps.iter_mut()) {
        memory::vmm_dirty(r).drain_into(map);
    }
    // and those other processes wrote for devices (vhost-user backends)
    let regions: Vec<(u64, u64)> = h
        .mem
        .iter()
        .map(|r| {
            (
                r.start_addr().0 / PAGE_SIZE as u64,
                r.len() / PAGE_SIZE as u64,
            )
        })
        .collect();
    h.devices.harvest_dirty(&mut |first, mut bits| {
        while bits != 0 {
            let page = first + bits.trailing_zeros() as u64;
            bits &= bits - 1;
            if let Some((slot, (start, _))) = regions
                .iter()
                .enumerate()
                .find(|(_, (start, pages))| (*start..start + pages).contains(&page))
            {
                let i = (page - start) as usize;
                if let Some(w) = maps[slot].get_mut(i / 64) {
                    *w |= 1 << (i % 64);
                }
            }
        }
    });
    if !h.rings.is_empty() {
        return h.rings.collect(maps);
    }
    for (slot, (r, map)) in h.mem.iter().zip(maps.iter_mut()).enumerate() {
        let log =
            h.vm.get_dirty_log(slot as u32, r.len() as usize)
                .map_err(|e| Error::Kvm(format!("KVM_GET_DIRTY_LOG slot {slot}: {e}")))?;
        if h.dirty_manual.enabled {
            // protected again before they are read for sending: a write
            // after this is logged for the next round
            crate::dirty_log::clear(&h.vm, slot as u32, r.len() / PAGE_SIZE as u64, &log)?;
        }
        for (a, b) in map.iter_mut().zip(log) {
            *a |= b;
        }
    }
    Ok(())
}

/// After a migration that did not complete: dirty logging off, and the
/// rings emptied, so a guest resumed here never waits on a full ring.
fn stop_dirty_tracking(h: &VmHandle) {
    let _ = memory::register_slots(&h.vm, &h.mem, 0);
    h.devices.stop_dirty_log();
    if !h.rings.is_empty() {
        let _ = dirty_bitmaps(h);
    }
}

fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| w.count_ones() as u64)
        .sum()
}

/// Migrates the running VM to `to`. On success the source VM is stopped
/// (reported as migrated); before GO any failure resumes the source guest;
/// after GO without an answer the guest stays paused and the error says so.
pub fn migrate(
    h: &VmHandle,
    to: &str,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport> {
    let t0 = Instant::now();
    h.refuse_unmovable()?;
    let endpoint = Endpoint::parse(to).map_err(Error::Config)?;
    let mut link =
        connect(&endpoint).map_err(|e| Error::Device(format!("connecting to {to}: {e}")))?;
    let mut back = BufReader::new(link.split().map_err(io)?);
    let key = answer_greeting(&mut back, &mut link, opts.token.as_deref(), to)?;
    let mut w = stream_writer(link, key, opts.io_timeout)?;
    let mut report = MigrationReport {
        dirty_tracking: if h.rings.is_empty() { "bitmap" } else { "ring" }.into(),
        ..Default::default()
    };
    let connections = opts.connections.clamp(1, 16);
    report.connections = connections as u32;
    let config = crate::snapshot::SnapshotConfig {
        connections: connections as u32,
        ..h.config.clone()
    };
    w.frame(
        Kind::Config,
        &serde_json::to_vec(&config).expect("serialisable"),
    )
    .map_err(io)?;
    w.flush().map_err(io)?;
    // the other streams: each proves the token too, then carries pages only
    let mut ws = vec![w];
    for i in 1..connections {
        let mut extra = connect(&endpoint)
            .map_err(|e| Error::Device(format!("connection {i} to {to}: {e}")))?;
        let mut extra_back = BufReader::new(extra.split().map_err(io)?);
        let key = answer_greeting(&mut extra_back, &mut extra, opts.token.as_deref(), to)?;
        let mut extra = stream_writer(extra, key, opts.io_timeout)?;
        // the stream's header now: the destination reads it before it
        // prepares its VM
        extra.flush().map_err(io)?;
        ws.push(extra);
    }
    // the destination creates its VM first: that stays out of the downtime
    // (within the io-timeout too: a destination that stalls here must not
    // hold the migration for longer than any other read)
    let _ = back.get_ref().set_timeout(Some(opts.io_timeout));
    // what saving and restoring the state cost on the destination's fresh
    // VM (older destinations do not say)
    let state_round_trip = match next_line(&mut back) {
        Ok(Line::Prepared { state_ns }) => Duration::from_nanos(state_ns),
        other => {
            return Err(Error::Device(format!(
                "{to} did not prepare a VM ({}); the guest runs on here",
                match other {
                    Ok(l) => l.to_string(),
                    Err(e) => e,
                }
            )))
        }
    };
    let _ = back.get_ref().set_timeout(None);
    report.prepared_ms = t0.elapsed().as_secs_f64() * 1000.0;

    h.rings.prepare();
    memory::register_slots(&h.vm, &h.mem, KVM_MEM_LOG_DIRTY_PAGES)?;
    // the first round reads every touched page: what the VMM wrote before
    // it is in there, what it writes from now on goes in the next rounds
    for r in h.mem.iter() {
        memory::vmm_dirty(r).clear();
    }
    // so do the devices' outside writers (vhost-user backends)
    if let Err(e) = h.devices.start_dirty_log() {
        stop_dirty_tracking(h);
        return Err(Error::Device(format!(
            "{e}: the migration cannot see every page written; the guest runs on here"
        )));
    }
    report.dirty_log_manual_protect = h.dirty_manual.enabled;
    let full_before = h.rings.full_exits();
    // the destination's clock against ours (set by the idle Syncs)
    let mut clock: Option<ClockSample> = None;
    let result = (|| -> Result<u128> {
        if h.dirty_manual.initially_set {
            // logging started with every page dirty and none protected: the
            // first round reads every page after this, so protect all now,
            // a chunk at a time
            for (slot, r) in h.mem.iter().enumerate() {
                crate::dirty_log::clear_all(&h.vm, slot as u32, r.len() / PAGE_SIZE as u64)?;
            }
        }
        // round 1: everything; then what was dirtied meanwhile
        let r0 = Instant::now();
        let limiter = Limiter {
            start: r0,
            rate: opts.bandwidth_limit,
        };
        send_pages(h, &mut ws, None, &mut report, Some(&limiter))?;
        // each round ends delivered, not buffered: the bandwidth is then
        // what reached the destination, and when the guest is paused no
        // earlier round is still in flight to hold the stop-and-copy up
        // (unflushed, a few MiB of backlog added to the downtime: BENCHMARKS.md)
        flush_all(&mut ws)?;
        report.rounds = 1;
        report.round_ms.push(r0.elapsed().as_secs_f64() * 1000.0);
        let mut bandwidth = (report.pages_sent.max(1) * PAGE_SIZE as u64) as f64
            / r0.elapsed().as_secs_f64().max(1e-6);
        // the last round: when it started and what it sent (round 1's zero
        // pages are found, not sent)
        let (mut round_start, mut round_pages) = (r0, report.pages_sent);
        let mut synced = false;
        // the downtime's part that no page causes: the state's save and
        // restore (measured by the destination) and three crossings of
        // the link (pause, READY, GO; measured by an idle Sync)
        let mut fixed = None;
        let mut dirty = dirty_bitmaps(h)?;
        loop {
            let pages = count(&dirty);
            let estimate = Duration::from_secs_f64(pages as f64 * PAGE_SIZE as f64 / bandwidth)
                + fixed.unwrap_or(Duration::ZERO);
            progress(&Progress {
                round: report.rounds,
                bytes: (report.pages_sent + report.zero_pages) * PAGE_SIZE as u64,
                dirty_pages: pages,
                estimated_downtime_ms: estimate.as_secs_f64() * 1000.0,
                elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
                synced,
            });
            // (with nothing dirty, more rounds cannot help)
            if estimate <= opts.downtime || (synced && pages == 0) {
                if !synced {
                    // a flushed round may still be in the socket and the
                    // destination's buffers, waiting to be applied: that
                    // backlog (MiBs) would be downtime. Wait until the
                    // destination has applied everything, add what was
                    // dirtied meanwhile, and look again.
                    let waited = Instant::now();
                    let _ = sync(&mut ws, &mut back, report.rounds, to, opts.io_timeout)?;
                    report.sync_ms += waited.elapsed().as_secs_f64() * 1000.0;
                    synced = true;
                    // the rate the last round was applied at, end to end
                    // (the rate it left at ignores the destination's work,
                    // and the stop-and-copy pays for that too)
                    bandwidth = (round_pages.max(1) * PAGE_SIZE as u64) as f64
                        / round_start.elapsed().as_secs_f64().max(1e-6);
                    if fixed.is_none() {
                        // the destination is idle now: a Sync is a round
                        // trip (the shortest of three: one preempted end
                        // would count for the whole)
                        let mut rtt = Duration::MAX;
                        for _ in 0..3 {
                            let t = Instant::now();
                            let sample =
                                sync(&mut ws, &mut back, report.rounds, to, opts.io_timeout)?;
                            rtt = rtt.min(t.elapsed());
                            // the shortest round trip bounds the offset best
                            if let Some(s) = sample {
                                if clock.is_none_or(|c: ClockSample| s.rtt < c.rtt) {
                                    clock = Some(s);
                                }
                            }
                        }
                        let f = state_round_trip + rtt * 3;
                        tracing::info!(
                            "downtime without pages estimated at {:.2} ms: state {:.2} ms (measured at {to}), link round trip {:.2} ms",
                            f.as_secs_f64() * 1e3,
                            state_round_trip.as_secs_f64() * 1e3,
                            rtt.as_secs_f64() * 1e3
                        );
                        report.fixed_downtime_estimate_ms = f.as_secs_f64() * 1000.0;
                        fixed = Some(f);
                    }
                    add_dirty(h, &mut dirty)?;
                    continue;
                }
                // small enough: these go in the stop-and-copy
                return stop_and_copy(h, &mut ws, dirty, &mut report, true);
            }
            if t0.elapsed() > opts.timeout {
                if !opts.force {
                    return Err(Error::Device(format!(
                        "did not converge in {:?} ({pages} pages dirty per round, budget {:?}, {:.2} ms of it taken by the state and the hand-over); the guest keeps running here",
                        opts.timeout, opts.downtime, report.fixed_downtime_estimate_ms
                    )));
                }
                report.forced = true;
                return stop_and_copy(h, &mut ws, dirty, &mut report, synced);
            }
            let r = Instant::now();
            let before = report.pages_sent + report.zero_pages;
            send_pages(h, &mut ws, Some(&dirty), &mut report, Some(&limiter))?;
            flush_all(&mut ws)?;
            let sent = report.pages_sent + report.zero_pages - before;
            (round_start, round_pages) = (r, sent);
            bandwidth =
                (sent.max(1) * PAGE_SIZE as u64) as f64 / r.elapsed().as_secs_f64().max(1e-6);
            report.rounds += 1;
            report.round_ms.push(r.elapsed().as_secs_f64() * 1000.0);
            synced = false;
            dirty = dirty_bitmaps(h)?;
        }
    })();
    let paused_at = match result {
        Ok(t) => t,
        Err(e) => {
            stop_dirty_tracking(h);
            if h.state() == RunState::Paused {
                h.resume();
            }
            return Err(e);
        }
    };
    // the last of the stream may still sit in the buffers: a link that
    // breaks here is a destination that has not said READY, so the guest
    // resumes here as it does for any failure before GO
    let flushed = ws
        .swap_remove(0)
        .finish()
        .and_then(|(out, bytes)| out.into_inner().map(|_| bytes).map_err(|e| e.into_error()));
    match flushed {
        Ok(bytes) => report.bytes += bytes,
        Err(e) => {
            stop_dirty_tracking(h);
            h.resume();
            return Err(Error::Device(format!(
                "migration link: {e}; the guest runs on here"
            )));
        }
    }
    report.downtime_phases.flushed_ms = ms_since(paused_at);

    // phase 1: the destination verifies and says READY (within the
    // io-timeout: a stalled destination must not hold the guest paused)
    let _ = back.get_ref().set_timeout(Some(opts.io_timeout));
    match next_line(&mut back) {
        Ok(Line::Ready) => {}
        other => {
            stop_dirty_tracking(h);
            h.resume();
            return Err(Error::Device(format!(
                "the destination did not accept the VM ({}); the guest runs on here",
                match other {
                    Ok(l) => l.to_string(),
                    Err(e) => e,
                }
            )));
        }
    }
    report.downtime_phases.ready_ms = ms_since(paused_at);
    // phase 2: GO; from here a lost answer leaves the guest paused. The
    // disks' locks go first: the destination takes them as it starts
    h.release_disk_locks();
    let mut link = back.into_inner();
    report.downtime_phases.go_ms = ms_since(paused_at);
    if let Err(e) = link
        .write_all(
            Line::Go {
                paused_at_ns: paused_at,
            }
            .to_wire()
            .as_bytes(),
        )
        .and_then(|_| link.flush())
    {
        // the kernel did not take GO: the destination cannot have it, and
        // it starts nothing without it, so the guest is safe to resume here
        stop_dirty_tracking(h);
        h.retake_disk_locks();
        h.resume();
        return Err(Error::Device(format!(
            "the destination went away before GO could be sent ({e}); the guest runs on here"
        )));
    }
    let mut back = BufReader::new(link);
    match next_line(&mut back) {
        Ok(Line::Running { downtime_ns, steps }) => {
            // the destination measured against our pause time with its own
            // clock: take the offset between the clocks out
            let offset_ms = clock.map_or(0.0, |c| c.offset_ns as f64 / 1e6);
            report.clock_offset_ms = clock.map(|c| c.offset_ns as f64 / 1e6);
            report.clock_offset_uncertainty_ms = clock.map(|c| c.rtt.as_secs_f64() * 1e3 / 2.0);
            report.downtime_ms = match downtime_ns {
                Some(ns) => ns as f64 / 1e6 - offset_ms,
                None => {
                    tracing::warn!("{to} runs the guest but did not say its downtime");
                    0.0
                }
            };
            let phases = &mut report.downtime_phases;
            phases.read_destination(&steps, offset_ms);
            phases.dest_resumed_ms = report.downtime_ms;
        }
        other => {
            // the guest may be resumed here by the operator: stop tracking
            stop_dirty_tracking(h);
            return Err(Error::Device(format!(
                "OUTCOME UNKNOWN: GO was sent to {to} but no RUNNING came back ({}); the guest stays PAUSED here. Check whether it runs on the destination before resuming it here (nfvisor resume) — two running copies are worse than a paused one",
                match other {
                    Ok(l) => l.to_string(),
                    Err(e) => e,
                }
            )));
        }
    }
    report.downtime_seen_by_source_ms =
        (crate::clock::now_ns().saturating_sub(paused_at)) as f64 / 1e6;
    report.ring_full_exits = h.rings.full_exits() - full_before;
    report.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    report.bandwidth_mib_s =
        report.bytes as f64 / (1 << 20) as f64 / t0.elapsed().as_secs_f64().max(1e-6);
    *h.migrated.lock().unwrap_or_else(|e| e.into_inner()) = Some(to.to_string());
    h.stop_all();
    Ok(report)
}

/// Pauses the guest and sends the last dirty pages and every state.
/// Returns the pause time (CLOCK_REALTIME ns). `synced`: the destination
/// has applied everything sent so far (its SYNCED answers), so a page's
/// older versions are in place whichever stream brought them.
fn stop_and_copy<W: Write + Send>(
    h: &VmHandle,
    ws: &mut Vec<Writer<W>>,
    pending: Vec<Vec<u64>>,
    report: &mut MigrationReport,
    synced: bool,
) -> Result<u128> {
    if synced {
        // the last pages all go on the first stream and the others end
        // now, before the pause: ending them inside it, each flushed while
        // its reader on the destination fought for the CPUs, made 4
        // streams' downtime 2-3x one stream's here
        end_extra_streams(ws, report)?;
    }
    let paused_at = crate::clock::now_ns();
    h.pause()?;
    report.downtime_phases.paused_ms = ms_since(paused_at);
    // each vCPU thread reads its own state while this one sends the last
    // pages (on a nested host each ioctl is slow)
    let saving = h.request_vcpu_saves()?;
    // what was dirty when pre-copy stopped (read, so cleared in KVM, but not
    // yet sent) and what was dirtied since
    let mut dirty = pending;
    add_dirty(h, &mut dirty)?;
    // (counted as they are sent: one pass over the bitmaps, not two)
    report.last_round_pages = send_pages(h, ws, Some(&dirty), report, None)?;
    // (unsynced, forced: the other streams carried their share and end
    // here; the destination has all pages before the state arrives)
    end_extra_streams(ws, report)?;
    let w = &mut ws[0];
    report.downtime_phases.last_pages_ms = ms_since(paused_at);
    let (states, devices) = h.collect_saves(saving)?;
    // test-only hook: a longer stop-and-copy, so a test can tell whether the
    // guest's clocks show the stall
    if let Some(ms) =
        crate::fault::test_hook("NFVISOR_TEST_STOP_COPY_DELAY_MS").and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    w.frame(Kind::DeviceState, &crate::snapshot::encode_state(&devices))
        .map_err(io)?;
    for s in &states {
        w.frame(Kind::VcpuState, &crate::snapshot::encode_state(s))
            .map_err(io)?;
    }
    report.rounds += 1;
    report.downtime_phases.state_ms = ms_since(paused_at);
    tracing::debug!("stop-and-copy: {:?}", report.downtime_phases);
    Ok(paused_at)
}

/// Ends every stream but the first (flushed, with its End frame).
fn end_extra_streams<W: Write>(
    ws: &mut Vec<Writer<W>>,
    report: &mut MigrationReport,
) -> Result<()> {
    for extra in ws.drain(1..) {
        let (_, bytes) = extra.finish().map_err(io)?;
        report.bytes += bytes;
    }
    Ok(())
}

/// The stream a connection carries: keyed when the greeting gave a key,
/// each write waiting `io_timeout` at most.
fn stream_writer(
    link: Box<dyn Link>,
    key: Option<migration::StreamKey>,
    io_timeout: Duration,
) -> Result<Writer<std::io::BufWriter<Box<dyn Link>>>> {
    link.set_write_timeout(Some(io_timeout)).map_err(io)?;
    let out = std::io::BufWriter::with_capacity(4 << 20, link);
    match key {
        Some(k) => Writer::keyed(out, k),
        None => Writer::new(out),
    }
    .map_err(io)
}

/// HMAC-SHA256(token, message) in hex.
fn mac_hex(token: &[u8], message: &str) -> String {
    mac(token, message)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mac(token: &[u8], message: &str) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut m =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(token).expect("HMAC takes any key length");
    m.update(message.as_bytes());
    m.finalize().into_bytes().into()
}

/// What the source proves over the destination's nonce.
fn source_proof(token: &[u8], nonce_d: &str) -> String {
    mac_hex(token, &format!("nfvisor source {nonce_d}"))
}

/// What the destination proves over both nonces (the source's first).
fn destination_proof(token: &[u8], nonce_s: &str, nonce_d: &str) -> String {
    mac_hex(token, &format!("nfvisor destination {nonce_s} {nonce_d}"))
}

/// The key of the stream that follows a greeting with these nonces.
fn stream_key(token: &[u8], nonce_d: &str, nonce_s: &str) -> migration::StreamKey {
    mac(token, &format!("nfvisor stream {nonce_d} {nonce_s}"))
}

fn fresh_nonce() -> Result<String> {
    let mut nonce = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut nonce))
        .map_err(|e| Error::Device(format!("reading /dev/urandom: {e}")))?;
    Ok(nonce.iter().map(|b| format!("{b:02x}")).collect())
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a token file (its trimmed contents; at least 16 bytes).
pub fn read_token(path: &std::path::Path) -> Result<Vec<u8>> {
    let t = std::fs::read(path)
        .map_err(|e| Error::Config(format!("token file {}: {e}", path.display())))?;
    let t: Vec<u8> = t.trim_ascii().to_vec();
    if t.len() < 16 {
        return Err(Error::Config(format!(
            "token file {}: the token is {} bytes; use at least 16 (e.g. head -c 32 /dev/urandom | base64)",
            path.display(),
            t.len()
        )));
    }
    Ok(t)
}

/// Destination side: greets the connecting source and, with a token, has
/// it prove the token before anything else is read, proves it back, and
/// returns the key of the stream that follows.
pub fn greet(link: &mut dyn Link, token: Option<&[u8]>) -> Result<Option<migration::StreamKey>> {
    let Some(token) = token else {
        link.write_all(Line::Open.to_wire().as_bytes())
            .map_err(io)?;
        link.flush().map_err(io)?;
        return Ok(None);
    };
    let nonce_d = fresh_nonce()?;
    link.write_all(
        Line::Challenge {
            nonce: nonce_d.clone(),
        }
        .to_wire()
        .as_bytes(),
    )
    .map_err(io)?;
    link.flush().map_err(io)?;
    // byte by byte: nothing past this line may be consumed here; the whole
    // answer within GREETING_DEADLINE, however slowly its bytes come (a
    // peer dripping one byte at a time must not hold the listener)
    let deadline = std::time::Instant::now() + GREETING_DEADLINE;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 300 {
        let late = || {
            Error::Config(format!(
                "the connecting peer did not answer the challenge within {GREETING_DEADLINE:?}: refused"
            ))
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        link.set_timeout(Some(left)).map_err(io)?;
        match link.read(&mut byte) {
            Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(late())
            }
            Err(e) => {
                return Err(Error::Config(format!(
                    "the connecting peer did not answer the challenge ({e}): refused"
                )))
            }
        }
    }
    link.set_timeout(None).map_err(io)?;
    let answered = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| Line::parse(l).ok());
    let nonce_s = match answered {
        Some(Line::Response { mac, nonce })
            if same(mac.as_bytes(), source_proof(token, &nonce_d).as_bytes()) =>
        {
            nonce
        }
        _ => {
            let _ = link.write_all(Line::Denied.to_wire().as_bytes());
            return Err(Error::Config(
                "the connecting peer does not know the token: refused".into(),
            ));
        }
    };
    let proof = destination_proof(token, &nonce_s, &nonce_d);
    link.write_all(Line::Ok { proof }.to_wire().as_bytes())
        .map_err(io)?;
    link.flush().map_err(io)?;
    Ok(Some(stream_key(token, &nonce_d, &nonce_s)))
}

/// Source side: reads the greeting, answers a challenge and checks the
/// destination's proof; with a token, a destination that does not ask for
/// it (OPEN) or cannot prove it is refused before any page leaves. The key
/// of the stream to send, with a token.
fn answer_greeting(
    back: &mut BufReader<Box<dyn Link>>,
    out: &mut dyn Write,
    token: Option<&[u8]>,
    to: &str,
) -> Result<Option<migration::StreamKey>> {
    let _ = back.get_ref().set_timeout(Some(Duration::from_secs(10)));
    let key = match (next_line(back), token) {
        (Ok(Line::Open), None) => None,
        (Ok(Line::Open), Some(_)) => {
            return Err(Error::Config(format!(
                "{to} does not ask for the token: it may not be the destination meant; refused before any page left (the guest runs on here)"
            )))
        }
        (Ok(Line::Challenge { .. }), None) => {
            return Err(Error::Config(format!(
                "{to} asks for a token: pass --token-file"
            )))
        }
        (Ok(Line::Challenge { nonce: nonce_d }), Some(token)) => {
            let nonce_s = fresh_nonce()?;
            let response = Line::Response {
                mac: source_proof(token, &nonce_d),
                nonce: nonce_s.clone(),
            };
            out.write_all(response.to_wire().as_bytes()).map_err(io)?;
            out.flush().map_err(io)?;
            match next_line(back) {
                Ok(Line::Ok { proof })
                    if same(
                        proof.as_bytes(),
                        destination_proof(token, &nonce_s, &nonce_d).as_bytes(),
                    ) =>
                {
                    Some(stream_key(token, &nonce_d, &nonce_s))
                }
                Ok(Line::Ok { .. }) => {
                    return Err(Error::Config(format!(
                        "{to} took our proof but could not prove the token: refused before any page left (the guest runs on here)"
                    )))
                }
                other => {
                    return Err(Error::Config(format!(
                        "{to} refused our token ({})",
                        match other {
                            Ok(l) => l.to_string(),
                            Err(e) => e,
                        }
                    )))
                }
            }
        }
        (other, _) => {
            return Err(Error::Device(format!(
                "{to} is not an nfvisor receiver ({}); the guest runs on here",
                match other {
                    Ok(l) => format!("said {l}"),
                    Err(e) => e,
                }
            )))
        }
    };
    let _ = back.get_ref().set_timeout(None);
    Ok(key)
}
