//! The PMDs: busy-polling threads, each taking its ports' transmitted
//! frames in bursts of up to [`BURST`] and putting each in the receive
//! ring of the port the MAC table names (or of every other port).
//!
//! One copy per frame and destination: from the source ring's buffer
//! straight into the destination ring's buffer. A burst costs one lock of
//! the source ring to take its chains, one of the table, one of each
//! destination ring, and one to give the chains back. The `vhost-user-
//! backend` crate's epoll threads only run the protocol: its kick-driven
//! model would wake a thread per notification, which a polling switch must
//! not wait for (and the transmit rings it polls carry NO_NOTIFY).

use std::cell::Cell;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::VolatileSlice;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};

use crate::fdb::{Fdb, Learnt};
use crate::port::{Port, Vring};
use crate::ring::{Mapped, RingError};

/// Frames taken from one port before the PMD looks at the next.
pub const BURST: usize = 32;
/// The virtio-net header every frame carries (VERSION_1).
pub(crate) const HDR: usize = 12;
/// The largest frame taken (no segmentation offloads are offered).
pub const MAX_FRAME: usize = 9216 + 18;
/// The header put before each delivered frame: no offloads, one buffer.
const RX_HEADER: [u8; HDR] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

type GuestMem = GuestMemoryMmap<crate::dirty_log::DirtyLog>;

/// What the PMDs share with the switch's control side.
pub(crate) struct Shared {
    /// Port slots: a removed port leaves a hole (the table's entries name
    /// slots), filled by the next port added.
    pub ports: RwLock<Vec<Option<Arc<Port>>>>,
    /// Moves whenever `ports` changes: each PMD takes the table again.
    pub table_generation: AtomicU64,
    pub fdb: Mutex<Fdb>,
    pub ageing: Duration,
    /// Frames (from any port) whose source address the table saw move
    /// to another port: a migrated VM's announce.
    pub moves: AtomicU64,
    /// Per PMD: nanoseconds it polled, and of those the rounds that
    /// moved frames took (the busy-poll fraction), published every
    /// [`PUBLISH_EVERY`] rounds.
    pub rounds: Vec<(AtomicU64, AtomicU64)>,
    /// Per PMD: the table generation it works with (no view of a port
    /// removed before it).
    pub seen: Vec<AtomicU64>,
    /// Per PMD: whether it polls (it started under its filter and has not
    /// ended).
    pub alive: Vec<AtomicBool>,
}

/// Rounds between two publications of a PMD's round counts.
const PUBLISH_EVERY: u64 = 4096;

/// A PMD's view of one port.
struct View {
    port: Arc<Port>,
    generation: u64,
    rings: Option<Vec<Vring>>,
    /// The receive and transmit rings, mapped (NO_NOTIFY set on both).
    maps: [Option<Mapped>; 2],
    /// The mappings are to be made (again): the rings are new, not ready
    /// yet, or moved.
    stale: Cell<bool>,
    /// Since when its ready rings could not be mapped (a frontend whose
    /// rings stay outside its memory for 100 ms is cut off).
    unmapped_since: Option<Instant>,
}

/// Why a chain was not forwarded.
#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    Ok,
    /// Malformed: a buffer the driver may not hand over (write-only on
    /// transmit, outside its memory: every buffer is checked as the chain
    /// is taken), or a chain that does not end.
    Bad,
    /// Shorter than a header and an Ethernet header.
    Runt,
    TooBig,
}

/// A taken frame: its chain's head and segments, where it goes.
struct Taken {
    head: u16,
    segs: Range<usize>,
    /// Frame bytes (past the header).
    len: usize,
    verdict: Verdict,
    out: Out,
}

#[derive(Clone, Copy, PartialEq)]
enum Out {
    Nowhere,
    One(usize),
    Flood,
}

/// The frame bytes a delivery copies from.
enum Source<'a> {
    /// A source ring's buffers (the header first).
    Ring {
        mem: &'a GuestMem,
        segs: &'a [(u64, u32)],
    },
    /// A frame read from a TAP (no header).
    Buf(&'a [u8]),
}

/// A PMD's reused buffers.
struct Scratch {
    segs: Vec<(u64, u32)>,
    frames: Vec<Taken>,
    /// Frames read from a TAP (header first), and their lengths.
    tap_bufs: Vec<Vec<u8>>,
    tap_lens: Vec<usize>,
    /// Per destination slot: frames and bytes put, drops.
    put: Vec<(u64, u64, u64, u64)>,
}

/// A PMD: the ports whose `pmd` is `index`, over and over, until `stop`.
pub(crate) fn run(index: usize, shared: &Shared, stop: &AtomicBool) {
    let mut views: Vec<Option<View>> = Vec::new();
    let mut table_generation = u64::MAX;
    let mut s = Scratch {
        segs: Vec::with_capacity(BURST * 4),
        frames: Vec::with_capacity(BURST),
        tap_bufs: (0..BURST).map(|_| vec![0u8; HDR + MAX_FRAME]).collect(),
        tap_lens: Vec::with_capacity(BURST),
        put: Vec::new(),
    };
    let (mut rounds, mut busy_ns) = (0u64, 0u64);
    let started = Instant::now();
    while !stop.load(Ordering::Acquire) {
        rounds += 1;
        if rounds % PUBLISH_EVERY == 0 {
            if let Some((r, b)) = shared.rounds.get(index) {
                r.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                b.store(busy_ns, Ordering::Relaxed);
            }
        }
        let round = Instant::now();
        let g = shared.table_generation.load(Ordering::Acquire);
        if g != table_generation {
            table_generation = g;
            let table = shared.ports.read().unwrap_or_else(|e| e.into_inner());
            let mut old = std::mem::take(&mut views);
            views = table
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let p = p.as_ref()?;
                    match old.get_mut(i).and_then(Option::take) {
                        Some(v) if Arc::ptr_eq(&v.port, p) => Some(v),
                        _ => Some(View {
                            port: p.clone(),
                            generation: u64::MAX,
                            rings: None,
                            maps: [None, None],
                            stale: Cell::new(true),
                            unmapped_since: None,
                        }),
                    }
                })
                .collect();
            drop(table);
            // (views of a removed port are gone: del-port waits for this)
            if let Some(seen) = shared.seen.get(index) {
                seen.store(g, Ordering::Release);
            }
        }
        // the vrings change only when a frontend comes or goes
        for v in views.iter_mut().flatten() {
            let now = v.port.generation.load(Ordering::Acquire);
            if now != v.generation {
                v.generation = now;
                v.rings = v.port.rings();
                v.maps = [None, None];
                v.stale.set(true);
            }
            if v.stale.get() && v.rings.is_some() {
                match map_rings(&v.port, v.rings.as_deref().unwrap_or(&[]), &mut v.maps) {
                    Ok(fresh) => {
                        v.stale.set(!fresh);
                        v.unmapped_since = None;
                    }
                    // (a ready ring comes after its memory table; a
                    // moment's grace for a frontend changing both)
                    Err(e) => match v.unmapped_since {
                        None => v.unmapped_since = Some(Instant::now()),
                        Some(t) if t.elapsed() > Duration::from_millis(100) => {
                            cut_off(&v.port, &format!("a ring it made ready: {e:?}"));
                            // (cut off: its rings are not looked at again)
                            v.rings = None;
                            v.unmapped_since = None;
                        }
                        Some(_) => {}
                    },
                }
            }
        }
        let mut moved = false;
        for src in 0..views.len() {
            if views[src].as_ref().is_some_and(|v| v.port.pmd == index) {
                moved |= burst(src, &mut views, shared, &mut s) > 0;
            }
        }
        if moved {
            busy_ns += round.elapsed().as_nanos() as u64;
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Maps both rings once they are ready, and sets NO_NOTIFY on them: the
/// PMDs poll, so the frontend need not kick, whether it sends or posts
/// receive buffers (each kick would wake the crate's epoll thread, which
/// takes the ring's lock and CPU time from the pollers). Whether both are
/// mapped, or why a ready one cannot be.
fn map_rings(
    port: &Port,
    rings: &[Vring],
    maps: &mut [Option<Mapped>; 2],
) -> Result<bool, RingError> {
    let mem = port.mem.memory();
    for (r, map) in rings.iter().zip(maps.iter_mut()) {
        let st = r.get_mut();
        if !st.is_enabled() || !st.get_queue().ready() {
            return Ok(false);
        }
        if map.as_ref().is_some_and(|m| m.is_of(st.get_queue(), &mem)) {
            continue;
        }
        match Mapped::new(st.get_queue(), &mem) {
            Ok(m) => {
                m.quiet();
                *map = Some(m);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// One burst from port `src`: the frames it took.
fn burst(src: usize, views: &mut [Option<View>], shared: &Shared, s: &mut Scratch) -> usize {
    s.frames.clear();
    s.segs.clear();
    let Some(view) = views[src].as_ref() else {
        return 0;
    };
    let port = view.port.clone();
    if port.tap.is_some() {
        return tap_burst(src, &port, views, shared, s);
    }
    let (Some(tx), Some(ring)) = (view.rings.as_ref().map(|r| &r[1]), view.maps[1].as_ref()) else {
        return 0;
    };
    if view.stale.get() {
        return 0;
    }
    let smem = port.mem.memory();
    // The transmit ring stays locked from taking its chains to giving them
    // back: a GET_VRING_BASE, SET_MEM_TABLE or SET_VRING_ADDR waits for the
    // burst rather than seeing chains taken and never used. (No deadlock:
    // only this PMD takes this ring's lock besides the port's protocol
    // thread, which takes one vring lock at a time, and receive rings are
    // taken only under a transmit ring's, never the other way.)
    let mut st = tx.get_mut();
    if !st.is_enabled() || !st.get_queue().ready() || !ring.is_of(st.get_queue(), &smem) {
        view.stale.set(true);
        return 0;
    }
    let mut hostile_ring = None;
    let q = st.get_queue_mut();
    let mut next = q.next_avail();
    let pending = match ring.pending(next) {
        Ok(n) => n,
        Err(e) => {
            hostile_ring = Some(e);
            0
        }
    };
    for _ in 0..pending.min(BURST as u16) {
        let head = match ring.avail_head(next) {
            Ok(h) => h,
            Err(e) => {
                hostile_ring = Some(e);
                break;
            }
        };
        next = next.wrapping_add(1);
        let first = s.segs.len();
        let mut len = 0usize;
        let mut verdict = Verdict::Ok;
        let segs = &mut s.segs;
        let walked = ring.walk(head, false, |d| {
            len += d.len as usize;
            if len > HDR + MAX_FRAME {
                verdict = Verdict::TooBig;
                return false;
            }
            // every buffer in the sender's memory before anything is read
            // from it (held mapped by `smem` until the copies are done)
            if smem
                .get_slice(GuestAddress(d.addr), d.len as usize)
                .is_err()
            {
                verdict = Verdict::Bad;
                return false;
            }
            segs.push((d.addr, d.len));
            true
        });
        if walked.is_err() {
            verdict = Verdict::Bad;
        }
        if verdict == Verdict::Ok && len < HDR + 14 {
            verdict = Verdict::Runt;
        }
        s.frames.push(Taken {
            head,
            segs: first..s.segs.len(),
            len: len.saturating_sub(HDR),
            verdict,
            out: Out::Nowhere,
        });
    }
    q.set_next_avail(next);
    if let Some(e) = hostile_ring {
        // (its frames taken so far still go back below)
        cut_off(&port, &format!("its transmit ring: {e:?}"));
    }
    let taken = s.frames.len();
    if taken > 0 {
        // where each frame goes: the addresses first (read once, from the
        // ring), the table once for the burst
        let mut macs = [[0u8; 12]; BURST];
        for (f, m) in s.frames.iter_mut().zip(macs.iter_mut()) {
            if f.verdict == Verdict::Ok {
                let src = Source::Ring {
                    mem: &smem,
                    segs: &s.segs[f.segs.clone()],
                };
                if copy_frame(&src, 0, VolatileSlice::from(&mut m[..])).is_err() {
                    f.verdict = Verdict::Bad;
                }
            }
        }
        route(src, &mut s.frames, &macs, shared, &port);
    }
    let cut = match taken {
        0 => Vec::new(),
        _ => deliver_all(src, views, s, |f, segs| Source::Ring {
            mem: &smem,
            segs: &segs[f.segs.clone()],
        }),
    };
    // the chains go back (empty) once every copy out of them is done
    if taken > 0 {
        let q = st.get_queue_mut();
        let mut used = q.next_used();
        for f in &s.frames {
            ring.put_used(used, f.head, 0);
            used = used.wrapping_add(1);
        }
        ring.publish_used(used);
        q.set_next_used(used);
        if ring.wants_interrupt() {
            let _ = st.signal_used_queue();
        }
    }
    drop(st);
    let hostile = count_source(&port, &s.frames) || hostile_ring.is_some();
    // (a cut frontend's rings are not polled again: its next connection
    // brings new ones)
    for d in cut.into_iter().chain(hostile.then_some(src)) {
        if let Some(v) = views[d].as_mut() {
            v.rings = None;
        }
    }
    taken
}

/// One burst read from a TAP port.
fn tap_burst(
    src: usize,
    port: &Arc<Port>,
    views: &mut [Option<View>],
    shared: &Shared,
    s: &mut Scratch,
) -> usize {
    let tap = port.tap.as_ref().expect("a TAP port");
    s.tap_lens.clear();
    while s.tap_lens.len() < BURST {
        match tap.read_frame(&mut s.tap_bufs[s.tap_lens.len()]) {
            Ok(Some(n)) => s.tap_lens.push(n),
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("port {}: reading the TAP: {e}", port.name);
                break;
            }
        }
    }
    let mut macs = [[0u8; 12]; BURST];
    for (i, &n) in s.tap_lens.iter().enumerate() {
        let verdict = match n {
            n if n < HDR + 14 => Verdict::Runt,
            n if n >= HDR + MAX_FRAME => Verdict::TooBig,
            _ => Verdict::Ok,
        };
        if verdict == Verdict::Ok {
            macs[i].copy_from_slice(&s.tap_bufs[i][HDR..HDR + 12]);
        }
        s.frames.push(Taken {
            head: 0,
            segs: i..i,
            len: n.saturating_sub(HDR),
            verdict,
            out: Out::Nowhere,
        });
    }
    let taken = s.frames.len();
    if taken == 0 {
        return 0;
    }
    route(src, &mut s.frames, &macs, shared, port);
    let bufs = std::mem::take(&mut s.tap_bufs);
    let cut = deliver_all(src, views, s, |f, _| {
        Source::Buf(&bufs[f.segs.start][HDR..HDR + f.len])
    });
    s.tap_bufs = bufs;
    count_source(port, &s.frames);
    for d in cut {
        if let Some(v) = views[d].as_mut() {
            v.rings = None;
        }
    }
    taken
}

/// Learns each good frame's source, and looks its destination up: under
/// one lock of the table for the burst.
fn route(src: usize, frames: &mut [Taken], macs: &[[u8; 12]; BURST], shared: &Shared, port: &Port) {
    let now = Instant::now();
    let mut fdb = shared.fdb.lock().unwrap_or_else(|e| e.into_inner());
    let mut flooded = 0;
    let mut moved = 0;
    let (mut refused, mut link_local) = (0, 0);
    // (a burst's frames mostly share their addresses: each source is
    // learnt and each destination looked up once per run of equal ones)
    let mut last_from: Option<[u8; 6]> = None;
    let mut last_dst: Option<([u8; 6], Out)> = None;
    for (f, m) in frames.iter_mut().zip(macs) {
        if f.verdict != Verdict::Ok {
            continue;
        }
        let dst: [u8; 6] = m[..6].try_into().expect("6 bytes");
        let from: [u8; 6] = m[6..].try_into().expect("6 bytes");
        if last_from != Some(from) {
            match fdb.learn(from, src, now, shared.ageing) {
                Learnt::Moved => moved += 1,
                Learnt::Refused => refused += 1,
                Learnt::Same | Learnt::New => {}
            }
            last_from = Some(from);
        }
        // IEEE 802.1D: a bridge does not forward link-local control frames
        // (01:80:c2:00:00:0x: pause, STP, LACP, EAPOL)
        if dst[..5] == [0x01, 0x80, 0xc2, 0x00, 0x00] && dst[5] & 0xf0 == 0 {
            f.out = Out::Nowhere;
            link_local += 1;
            continue;
        }
        f.out = match last_dst {
            Some((d, out)) if d == dst => out,
            _ => {
                let out = match fdb.lookup(&dst, now, shared.ageing) {
                    // (back where it came from: the frontend's own business)
                    Some(d) if d == src => Out::Nowhere,
                    Some(d) => Out::One(d),
                    None => Out::Flood,
                };
                last_dst = Some((dst, out));
                out
            }
        };
        if f.out == Out::Flood {
            flooded += 1;
        }
    }
    drop(fdb);
    for (c, n) in [
        (&port.counters.flooded, flooded),
        (&port.counters.learn_refused, refused),
        (&port.counters.drop_link_local, link_local),
    ] {
        if n > 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
    if moved > 0 {
        shared.moves.fetch_add(moved, Ordering::Relaxed);
    }
}

/// Puts the burst's frames in their destinations: each destination ring
/// locked once, its frames in the order taken. The destinations whose
/// frontends were cut off (hostile receive buffers).
fn deliver_all<'a, F>(
    src: usize,
    views: &[Option<View>],
    s: &'a mut Scratch,
    source: F,
) -> Vec<usize>
where
    F: Fn(&Taken, &'a [(u64, u32)]) -> Source<'a>,
{
    let (frames, segs, put) = (&s.frames, &s.segs[..], &mut s.put);
    put.clear();
    put.resize(views.len(), (0, 0, 0, 0));
    let mut cut = Vec::new();
    for (d, view) in views.iter().enumerate() {
        let Some(view) = view else { continue };
        if d == src {
            continue;
        }
        let mut mine = frames
            .iter()
            .filter(|f| f.out == Out::One(d) || f.out == Out::Flood)
            .peekable();
        if mine.peek().is_none() {
            continue;
        }
        let tally = &mut put[d];
        let mut hostile = false;
        if let Some(tap) = &view.port.tap {
            for f in mine {
                match write_tap(tap, &source(f, segs), f.len) {
                    Ok(()) => {
                        tally.0 += 1;
                        tally.1 += f.len as u64;
                    }
                    Err(_) => tally.2 += 1,
                }
            }
        } else {
            hostile = deliver_ring(view, mine, |f| source(f, segs), tally);
        }
        let c = &view.port.counters;
        let (frames_put, bytes, no_buffer, bad_buffer) = *tally;
        for (a, n) in [
            (&c.tx_frames, frames_put),
            (&c.tx_bytes, bytes),
            (&c.drop_no_buffer, no_buffer),
            (&c.drop_bad_buffer, bad_buffer),
        ] {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
        if hostile {
            cut_off(
                &view.port,
                "a receive buffer outside its memory or not writable",
            );
            cut.push(d);
        }
    }
    cut
}

/// Frames into one port's receive ring, under one lock of it; the ring
/// is notified once, if its driver wants to hear. Whether a buffer was
/// hostile.
fn deliver_ring<'a, 'f, I, F>(
    view: &View,
    frames: I,
    source: F,
    tally: &mut (u64, u64, u64, u64),
) -> bool
where
    I: Iterator<Item = &'f Taken>,
    F: Fn(&'f Taken) -> Source<'a>,
{
    let (Some(rx), Some(ring)) = (view.rings.as_ref().map(|r| &r[0]), view.maps[0].as_ref()) else {
        tally.2 += frames.count() as u64;
        return false;
    };
    if view.stale.get() {
        tally.2 += frames.count() as u64;
        return false;
    }
    let dmem = view.port.mem.memory();
    let mut st = rx.get_mut();
    if !st.is_enabled() || !st.get_queue().ready() || !ring.is_of(st.get_queue(), &dmem) {
        view.stale.set(true);
        tally.2 += frames.count() as u64;
        return false;
    }
    let q = st.get_queue_mut();
    let (mut next, mut used) = (q.next_avail(), q.next_used());
    let mut waiting = 0u16;
    let mut hostile = false;
    for f in frames {
        if waiting == 0 {
            // (the driver may have posted more since)
            match ring.pending(next) {
                Ok(n) => waiting = n,
                Err(_) => {
                    hostile = true;
                    break;
                }
            }
        }
        if waiting == 0 {
            tally.2 += 1;
            continue;
        }
        let head = match ring.avail_head(next) {
            Ok(h) => h,
            Err(_) => {
                hostile = true;
                break;
            }
        };
        next = next.wrapping_add(1);
        waiting -= 1;
        let written = match fill_rx(&dmem, ring, head, &source(f), f.len) {
            Ok(n) => {
                tally.0 += 1;
                tally.1 += f.len as u64;
                n
            }
            Err(e) => {
                tally.3 += 1;
                hostile |= matches!(e, FillError::Hostile);
                0
            }
        };
        ring.put_used(used, head, written);
        used = used.wrapping_add(1);
    }
    if used != q.next_used() {
        ring.publish_used(used);
        q.set_next_avail(next);
        q.set_next_used(used);
        if ring.wants_interrupt() {
            let _ = st.signal_used_queue();
        }
    }
    hostile
}

/// Why a frame did not go into a receive chain.
enum FillError {
    /// The receiving frontend's chain is malformed, not writable, or
    /// outside its memory: it is cut off.
    Hostile,
    /// Its buffers are too small for the frame.
    TooSmall,
    /// The frame could not be read from its source (never expected: the
    /// source's buffers are checked when its chain is taken).
    Source,
}

/// Writes the header and the frame into the receive chain at `head`: the
/// bytes written.
fn fill_rx(
    dmem: &GuestMem,
    ring: &Mapped,
    head: u16,
    src: &Source,
    len: usize,
) -> Result<u32, FillError> {
    let total = HDR + len;
    let mut at = 0usize;
    let mut fault = None;
    let walked = ring.walk(head, true, |d| {
        if at == total {
            return false;
        }
        let n = (d.len as usize).min(total - at);
        let Ok(slice) = dmem.get_slice(GuestAddress(d.addr), n) else {
            fault = Some(FillError::Hostile);
            return false;
        };
        let mut off = 0;
        if at < HDR {
            off = (HDR - at).min(n);
            match slice.subslice(0, off) {
                Ok(h) => h.copy_from(&RX_HEADER[at..at + off]),
                Err(_) => {
                    fault = Some(FillError::Hostile);
                    return false;
                }
            }
        }
        if off < n {
            let Ok(part) = slice.subslice(off, n - off) else {
                fault = Some(FillError::Hostile);
                return false;
            };
            if copy_frame(src, at + off - HDR, part).is_err() {
                fault = Some(FillError::Source);
                return false;
            }
        }
        at += n;
        true
    });
    if walked.is_err() {
        return Err(FillError::Hostile);
    }
    if let Some(f) = fault {
        return Err(f);
    }
    if at < total {
        return Err(FillError::TooSmall);
    }
    Ok(total as u32)
}

/// Copies the frame's bytes from `at` (past the header) into `dst`, all
/// of it.
fn copy_frame<B: vm_memory::bitmap::BitmapSlice>(
    src: &Source,
    at: usize,
    dst: VolatileSlice<B>,
) -> Result<(), ()> {
    let want = dst.len();
    match src {
        Source::Buf(frame) => {
            let bytes = frame.get(at..at + want).ok_or(())?;
            dst.copy_from(bytes);
            Ok(())
        }
        Source::Ring { mem, segs } => {
            let mut skip = HDR + at;
            let mut done = 0;
            for &(addr, len) in segs.iter() {
                let len = len as usize;
                if skip >= len {
                    skip -= len;
                    continue;
                }
                let k = (len - skip).min(want - done);
                let from = addr
                    .checked_add(skip as u64)
                    .and_then(|a| mem.get_slice(GuestAddress(a), k).ok())
                    .ok_or(())?;
                from.copy_to_volatile_slice(dst.subslice(done, k).map_err(|_| ())?);
                done += k;
                skip = 0;
                if done == want {
                    return Ok(());
                }
            }
            match done == want {
                true => Ok(()),
                false => Err(()),
            }
        }
    }
}

/// A frame to a TAP: a plain header, then the frame, in one writev.
fn write_tap(tap: &virtio::tap::Tap, src: &Source, len: usize) -> Result<(), ()> {
    let mut iov: [libc::iovec; 17] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 17];
    iov[0] = libc::iovec {
        iov_base: RX_HEADER.as_ptr() as *mut libc::c_void,
        iov_len: HDR,
    };
    let mut n = 1;
    match src {
        Source::Buf(frame) => {
            iov[1] = libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len().min(len),
            };
            n = 2;
        }
        Source::Ring { mem, segs } => {
            let mut skip = HDR;
            for &(addr, l) in segs.iter() {
                let l = l as usize;
                if skip >= l {
                    skip -= l;
                    continue;
                }
                if n == iov.len() {
                    return Err(());
                }
                let s = addr
                    .checked_add(skip as u64)
                    .and_then(|a| mem.get_slice(GuestAddress(a), l - skip).ok())
                    .ok_or(())?;
                iov[n] = libc::iovec {
                    iov_base: s.ptr_guard().as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                };
                n += 1;
                skip = 0;
            }
        }
    }
    // SAFETY: each iovec points at memory that lives through the call (a
    // constant, the PMD's buffer, or guest memory whose mapping the
    // caller's memory guard keeps); writev only reads it.
    let r = unsafe { libc::writev(tap.as_raw_fd(), iov.as_ptr(), n as i32) };
    match r < 0 {
        true => Err(()),
        false => Ok(()),
    }
}

/// The source port's counters for a burst; a hostile chain cuts its
/// frontend off (whether it did).
fn count_source(port: &Port, frames: &[Taken]) -> bool {
    let c = &port.counters;
    let (mut ok, mut bytes, mut bad, mut runt, mut big) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for f in frames {
        match f.verdict {
            Verdict::Ok => {
                ok += 1;
                bytes += f.len as u64;
            }
            Verdict::Bad => bad += 1,
            Verdict::Runt => runt += 1,
            Verdict::TooBig => big += 1,
        }
    }
    c.rx_frames.fetch_add(ok, Ordering::Relaxed);
    c.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    if bad + runt > 0 {
        c.drop_bad_chain.fetch_add(bad + runt, Ordering::Relaxed);
    }
    if big > 0 {
        c.drop_too_big.fetch_add(big, Ordering::Relaxed);
    }
    if bad > 0 {
        cut_off(
            port,
            "a transmit chain that is malformed or outside its memory",
        );
    }
    bad > 0
}

/// Cuts a hostile frontend's connection: counted, logged once a port.
fn cut_off(port: &Port, why: &str) {
    port.counters.cut_off.fetch_add(1, Ordering::Relaxed);
    if !port.cut_logged.swap(true, Ordering::Relaxed) {
        tracing::warn!("port {}: {why}: its frontend is cut off", port.name);
    }
    port.cut();
}
