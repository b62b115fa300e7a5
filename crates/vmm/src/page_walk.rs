//! Walking guest memory for a snapshot or a migration: which pages the
//! first round sends (touched and not zero, scanned in place on several
//! threads), and one stream's share of a selection of pages, written as
//! page frames and zero-page markers.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use migration::{Writer, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{self, GuestRam};
use crate::{Error, Result};

/// Holds pre-copy to a byte rate: sleeps while ahead of it.
pub(crate) struct Limiter {
    pub(crate) start: Instant,
    pub(crate) rate: Option<u64>,
}

impl Limiter {
    pub(crate) fn account(&self, bytes_so_far: u64) {
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(bytes_so_far as f64 / rate as f64);
            let elapsed = self.start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct PartCount {
    pub(crate) sent: u64,
    pub(crate) zero: u64,
    pub(crate) looked: u64,
}

/// Which of `parts` streams carries the page at `gpa` (2 MiB chunks, dealt
/// round-robin).
pub(crate) fn part_of(gpa: u64, parts: usize) -> usize {
    ((gpa >> 21) % parts as u64) as usize
}

/// One stream's share of `selection` (bitmaps per slot): sent on `w`
/// (a snapshot sends all of memory this way too).
pub(crate) fn send_part<W: Write>(
    mem: &GuestRam,
    w: &mut Writer<W>,
    selection: &[Vec<u64>],
    (part, parts): (usize, usize),
    later: bool,
    limiter: Option<&Limiter>,
    sent_so_far: &AtomicU64,
) -> Result<PartCount> {
    let mut batch = migration::PageBatch::default();
    let mut zeros = Vec::new();
    let mut c = PartCount::default();
    for (slot, region) in mem.iter().enumerate() {
        let base = region.start_addr().0;
        let pages = region.len() / PAGE_SIZE as u64;
        let Some(bitmap) = selection.get(slot) else {
            continue;
        };
        let selected = bitmap.iter().enumerate().flat_map(|(i, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = w.trailing_zeros() as u64;
                    w &= w - 1;
                    i as u64 * 64 + bit
                })
            })
        });
        for p in selected {
            if p >= pages {
                break;
            }
            let gpa = base + p * PAGE_SIZE as u64;
            if parts > 1 && part_of(gpa, parts) != part {
                continue;
            }
            c.looked += 1;
            // zero pages are found in place (no copy): the scan then runs at
            // memory speed
            let in_place = mem
                .get_slice(GuestAddress(gpa), PAGE_SIZE)
                .map_err(|e| Error::Memory(format!("page {gpa:#x}: {e}")))?;
            let guard = in_place.ptr_guard();
            // SAFETY: the page is mapped for the VM's life; the guest may
            // write it meanwhile, which is_zero_at allows (dirty tracking
            // sends a page written during the scan again).
            let zero = unsafe { crate::zero_page::is_zero_at(guard.as_ptr(), PAGE_SIZE) };
            if zero {
                // (in the first round, a page that became zero since the
                // scan: the destination's is zero already)
                c.zero += 1;
                if later {
                    zeros.push(gpa);
                }
                continue;
            }
            // copied (volatile reads) into the frame: a page the guest writes
            // meanwhile is dirty and goes again, and the frame's checksum
            // covers exactly what was copied
            mem.read_slice(batch.slot(gpa), GuestAddress(gpa))
                .map_err(|e| Error::Memory(format!("reading page {gpa:#x}: {e}")))?;
            c.sent += 1;
            if batch.is_full() {
                w.page_batch(&mut batch).map_err(io)?;
                let total = sent_so_far.fetch_add(1024, Ordering::Relaxed) + 1024;
                if let Some(l) = limiter {
                    l.account(total * PAGE_SIZE as u64);
                }
            }
        }
    }
    w.page_batch(&mut batch).map_err(io)?;
    w.zero_pages(&zeros).map_err(io)?;
    Ok(c)
}

/// The first round's pages, as one bitmap per slot: every page the guest
/// ever touched (memory::residency: the memfd's holes, or the page tables for hugepages; untouched ones are not even read)
/// that is not zero. The zero scan runs in place on up to 8 threads (as
/// many as this thread may use), so memory bandwidth, not one core, bounds
/// an idle prefaulted guest.
pub(crate) fn first_round_pages(mem: &GuestRam) -> FirstRound {
    let resident = memory::residency(mem);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let mut out = FirstRound {
        scan_threads: threads as u32,
        ..Default::default()
    };
    for (slot, region) in mem.iter().enumerate() {
        let pages = (region.len() / PAGE_SIZE as u64) as usize;
        let words = pages.div_ceil(64);
        let mut bitmap = vec![0u64; words];
        // the host address as an integer, so the scoped threads may share it
        let host = region.as_ptr() as usize;
        let map = resident.get(slot).and_then(|m| m.as_deref());
        let per_thread = words.div_ceil(threads).max(1);
        let counts: Vec<(u64, u64)> = std::thread::scope(|scope| {
            let workers: Vec<_> = bitmap
                .chunks_mut(per_thread)
                .enumerate()
                .map(|(t, chunk)| {
                    scope.spawn(move || {
                        let (mut untouched, mut zero) = (0u64, 0u64);
                        for (w, word) in chunk.iter_mut().enumerate() {
                            for bit in 0..64 {
                                let p = (t * per_thread + w) * 64 + bit;
                                if p >= pages {
                                    break;
                                }
                                if map.is_some_and(|m| m[p] & 1 == 0) {
                                    untouched += 1;
                                    continue;
                                }
                                let at = (host + p * PAGE_SIZE) as *const u8;
                                // SAFETY: a page of this region's mapping,
                                // live for the VM's life; the guest may write
                                // it meanwhile (dirty tracking, on since
                                // before this scan, sends it again then).
                                if unsafe { crate::zero_page::is_zero_at(at, PAGE_SIZE) } {
                                    zero += 1;
                                } else {
                                    *word |= 1 << bit;
                                }
                            }
                        }
                        (untouched, zero)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or((0, 0)))
                .collect()
        });
        for (untouched, zero) in counts {
            out.untouched_pages += untouched;
            out.zero_pages += zero;
        }
        out.bitmaps.push(bitmap);
    }
    out
}

/// What the first round's scan found.
#[derive(Default)]
pub(crate) struct FirstRound {
    /// Per slot, the pages to send.
    pub(crate) bitmaps: Vec<Vec<u64>>,
    pub(crate) untouched_pages: u64,
    pub(crate) zero_pages: u64,
    pub(crate) scan_threads: u32,
}

pub(crate) fn io(e: std::io::Error) -> Error {
    Error::Device(format!("migration link: {e}"))
}
