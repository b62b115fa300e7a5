//! What a migration reports: its progress after each pre-copy round, and
//! its outcome, with where the total time and the downtime went.

use serde::{Deserialize, Serialize};

/// Where a migration stands, after each pre-copy round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub round: u32,
    pub bytes: u64,
    pub dirty_pages: u64,
    pub estimated_downtime_ms: f64,
    pub elapsed_ms: f64,
    /// The destination has applied everything sent (it answered a Sync):
    /// the last look before the stop-and-copy.
    pub synced: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    pub total_ms: f64,
    /// Source pause to destination resume, measured by the destination.
    pub downtime_ms: f64,
    /// Source pause to the RUNNING answer (includes the round trip).
    pub downtime_seen_by_source_ms: f64,
    pub rounds: u32,
    pub bytes: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Pages the guest never touched: skipped in the first round unread.
    pub untouched_pages: u64,
    pub last_round_pages: u64,
    /// "bitmap" (KVM_GET_DIRTY_LOG) or "ring" (the KVM dirty ring).
    pub dirty_tracking: String,
    /// The bitmap is protected again by KVM_CLEAR_DIRTY_LOG, in chunks.
    pub dirty_log_manual_protect: bool,
    /// Times a vCPU found its dirty ring full and emptied it itself.
    pub ring_full_exits: u64,
    /// Where the total went: until the destination had its VM (PREPARED),
    pub prepared_ms: f64,
    /// each pre-copy round (sent and flushed),
    pub round_ms: Vec<f64>,
    /// and waiting for the destination to apply what it was sent (Sync).
    pub sync_ms: f64,
    /// The destination's CLOCK_REALTIME minus the source's, estimated from
    /// the Sync round trips (the destination's times here are corrected by
    /// it); null when not measured. Off by at most
    pub clock_offset_ms: Option<f64>,
    /// this: half the shortest round trip.
    pub clock_offset_uncertainty_ms: Option<f64>,
    /// The downtime expected with no page left to send (the destination's
    /// state save-and-restore, three link crossings), added to the pages'
    /// share when the budget is checked.
    pub fixed_downtime_estimate_ms: f64,
    pub bandwidth_mib_s: f64,
    pub forced: bool,
    /// Threads that scanned memory for the first round.
    pub scan_threads: u32,
    /// Streams the pages went on.
    pub connections: u32,
    /// Where the downtime went.
    pub downtime_phases: DowntimePhases,
}

/// Where a migration's downtime went: ms from the source's pause to the end
/// of each step, the source's on its clock, the destination's (`dest_`) on
/// its own (the same clock on one host; across hosts, as far apart as the
/// two clocks are).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DowntimePhases {
    /// The vCPUs out of KVM_RUN and parked.
    pub paused_ms: f64,
    /// The last dirty pages harvested and written to the stream.
    pub last_pages_ms: f64,
    /// Every vCPU's and device's state read and written.
    pub state_ms: f64,
    /// The stream handed to the kernel to its end.
    pub flushed_ms: f64,
    /// The destination read the stream to its end (applying vCPU state as
    /// it came).
    pub dest_stream_end_ms: f64,
    /// The destination restored devices and clocks: all verified.
    pub dest_applied_ms: f64,
    /// The destination said READY.
    pub dest_ready_ms: f64,
    /// READY arrived here.
    pub ready_ms: f64,
    /// GO sent.
    pub go_ms: f64,
    /// GO arrived at the destination.
    pub dest_go_ms: f64,
    /// The destination released its vCPUs: the downtime.
    pub dest_resumed_ms: f64,
}

impl DowntimePhases {
    /// Takes the destination's steps from its RUNNING line (unknown names
    /// are ignored: a newer destination may say more), `offset_ms` (its
    /// clock against ours) taken out.
    pub fn read_destination(&mut self, steps: &[(String, i128)], offset_ms: f64) {
        for (name, ns) in steps {
            let ms = *ns as f64 / 1e6 - offset_ms;
            match name.as_str() {
                "stream_end" => self.dest_stream_end_ms = ms,
                "applied" => self.dest_applied_ms = ms,
                "ready" => self.dest_ready_ms = ms,
                "go" => self.dest_go_ms = ms,
                _ => {}
            }
        }
    }
}
