//! virtio-net on a TAP: one or more queue pairs (`queues=`, one TAP queue
//! each, IFF_MULTI_QUEUE), each served by a worker thread of its own that
//! waits (epoll) on its TAP queue and its two queues' kick eventfds, or,
//! in poll mode, busy-polls them as a DPDK PMD does, with the guest's kicks
//! suppressed. So a vCPU never waits on the network. MAC, MTU, STATUS, the
//! control queue (VQ_PAIRS_SET, ANNOUNCE_ACK), MQ and GUEST_ANNOUNCE.
//!
//! Receive: a frame read from the TAP goes into the next posted chain
//! (header first, num_buffers = 1); a frame larger than the chain is
//! dropped and counted, never truncated, and the chain stays for the next;
//! with no chain posted the worker stops reading the TAP until the driver
//! posts one. Transmit: a chain shorter than the header, larger than
//! [`MAX_FRAME`] or holding device-writable descriptors is dropped and
//! counted; a TAP write error is counted and the queue goes on.
//!
//! Offloads (`offload=`): the guest's checksum and segmentation headers go
//! to the TAP once checked ([`check_tx_header`]); the TAP hands the guest
//! unfinished frames only as far as the guest said it takes them
//! (TUNSETOFFLOAD from its GUEST_* features and GUEST_OFFLOADS_SET). With
//! MRG_RXBUF a frame spans as many receive chains as it needs.
//!
//! Pairs the driver has not turned on are detached from the TAP
//! (TUNSETQUEUE), so the kernel steers no frame to a queue nobody reads.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::net_ctrl::{serve_ctrl_queue, CtrlCommand, CtrlOffer, MAX_PAIRS};
use crate::rate_limiter::RateLimiter;
use crate::tap::{Tap, VNET_HDR_LEN};
use crate::{whole_chain, ActiveQueue, Interrupt, VirtioDevice, WorkerThread};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
const CTRL_QUEUE_SIZE: u16 = 64;
/// Frames one receive pass takes before it looks at its other events.
const RX_BUDGET: u32 = 64;
/// Chains one transmit pass takes before it looks at its other events.
const TX_BUDGET: u32 = 256;
/// RARPs sent after the first for a restored guest that cannot announce
/// itself, the first 50 ms after it, each gap twice the last.
const RARP_ROUNDS: u32 = 5;
const RARP_FIRST_GAP: std::time::Duration = std::time::Duration::from_millis(50);
/// The largest frame either way, header included: the largest IPv4 or
/// IPv6 packet (64 KiB less a byte: a GSO frame's) behind an Ethernet
/// header with a VLAN tag.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 18 + 65535;
/// Offload feature bits (virtio 1.2, 5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_GUEST_USO4: u64 = 1 << 54;
pub const F_GUEST_USO6: u64 = 1 << 55;
pub const F_HOST_USO: u64 = 1 << 56;
/// The guest-receive offloads (what GUEST_OFFLOADS_SET may turn on and off).
const GUEST_OFFLOADS: u64 =
    F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_USO4 | F_GUEST_USO6;
/// virtio_net_hdr flags and GSO types (5.1.6).
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;

/// Poll mode: passes over the queues between two looks at the worker's
/// other events (stop, the control queue, a pair turned on or off).
const POLL_PASSES: u32 = 64;

/// Per-device counters.
#[derive(Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped_too_big: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped_bad_chain: AtomicU64,
    pub tx_write_errors: AtomicU64,
    /// Interrupts sent, and those EVENT_IDX let the device leave out, per
    /// queue (receive, transmit).
    pub notifications: [AtomicU64; 2],
    pub notifications_suppressed: [AtomicU64; 2],
    pub bad_queue: AtomicU64,
    /// Frames dropped either way while the link is down.
    pub dropped_link_down: AtomicU64,
    /// Times a rate limit held frames back, each way.
    pub rx_throttled: AtomicU64,
    pub tx_throttled: AtomicU64,
    /// A frame read from the TAP while no buffer was posted, dropped when
    /// the device stopped (pause, reset).
    pub rx_dropped_at_stop: AtomicU64,
    /// Announces of a restored or migrated guest's MAC: RARPs this device
    /// sent, or (GUEST_ANNOUNCE) times the guest was asked to announce.
    pub announces: AtomicU64,
    /// Frames each way per queue pair.
    pub pair_rx_frames: [AtomicU64; MAX_PAIRS as usize],
    pub pair_tx_frames: [AtomicU64; MAX_PAIRS as usize],
    /// Notifications the guest wrote on the receive and transmit queues
    /// (its kicks, read off the eventfds).
    pub guest_kicks: AtomicU64,
    /// Control commands answered, and those answered ERR.
    pub ctrl_commands: AtomicU64,
    pub ctrl_refused: AtomicU64,
    /// TAP queues attached or detached failing (TUNSETQUEUE).
    pub queue_steering_errors: AtomicU64,
    /// Guest frames whose offload header was bad (dropped).
    pub tx_dropped_bad_offload: AtomicU64,
    /// Frames received into more than one buffer (MRG_RXBUF).
    pub rx_merged: AtomicU64,
    /// TUNSETOFFLOAD failing (the guest then gets finished frames).
    pub offload_errors: AtomicU64,
    /// A TAP queue that polled as an error (detached, or the TAP gone).
    pub tap_errors: AtomicU64,
    /// Frames the TAP handed over unfinished (a partial checksum, GSO)
    /// beyond the offloads the guest has on now: dropped.
    pub rx_dropped_unfinished: AtomicU64,
    /// Transmit passes cut at their budget (the rest in the next pass).
    pub tx_budget_spent: AtomicU64,
}

/// Receive and transmit: how the queue workers wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetMode {
    /// On the TAP and the guest's kicks (epoll).
    #[default]
    Event,
    /// Busy-polling the queues and the TAP, kicks suppressed (needs CPUs
    /// of their own: `cpus=`).
    Poll,
}

/// The offloads a NIC offers (`offload=csum+tso4+tso6+uso`): each both
/// ways, the host's (the guest hands over partial checksums and GSO
/// frames) and the guest's (it takes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub uso: bool,
}

impl Offloads {
    /// Parses `csum+tso4+tso6+uso` (any subset; `none`): TSO and USO need
    /// csum (5.1.3.1: no segmentation without checksum offload).
    pub fn parse(list: &str) -> Result<Offloads, String> {
        let mut o = Offloads::default();
        for name in list.split('+') {
            match name {
                "none" => {}
                "csum" => o.csum = true,
                "tso4" => o.tso4 = true,
                "tso6" => o.tso6 = true,
                "uso" => o.uso = true,
                "ufo" => {
                    return Err(
                        "offload \"ufo\": UDP fragmentation offload is gone from Linux; uso (UDP segmentation) is offered instead".into(),
                    )
                }
                other => {
                    return Err(format!(
                        "offload {other:?}: csum, tso4, tso6 or uso (joined with +)"
                    ))
                }
            }
        }
        if (o.tso4 || o.tso6 || o.uso) && !o.csum {
            return Err(format!(
                "offload {list:?}: tso4, tso6 and uso need csum (segmentation needs checksum offload)"
            ));
        }
        Ok(o)
    }

    /// The feature bits these offloads offer.
    pub fn features(&self) -> u64 {
        let mut f = 0;
        if self.csum {
            f |= F_CSUM | F_GUEST_CSUM | F_CTRL_GUEST_OFFLOADS;
        }
        if self.tso4 {
            f |= F_HOST_TSO4 | F_GUEST_TSO4;
        }
        if self.tso6 {
            f |= F_HOST_TSO6 | F_GUEST_TSO6;
        }
        if self.uso {
            f |= F_HOST_USO | F_GUEST_USO4 | F_GUEST_USO6;
        }
        f
    }
}

/// Checks that the features a driver accepted keep the specification's
/// dependencies (5.1.3.1): each segmentation offload with its checksum
/// offload, GUEST_OFFLOADS control with the control queue.
pub fn check_offload_features(acked: u64) -> Result<(), String> {
    let needs = [
        (F_HOST_TSO4, F_CSUM, "HOST_TSO4 without CSUM"),
        (F_HOST_TSO6, F_CSUM, "HOST_TSO6 without CSUM"),
        (F_HOST_USO, F_CSUM, "HOST_USO without CSUM"),
        (F_GUEST_TSO4, F_GUEST_CSUM, "GUEST_TSO4 without GUEST_CSUM"),
        (F_GUEST_TSO6, F_GUEST_CSUM, "GUEST_TSO6 without GUEST_CSUM"),
        (F_GUEST_USO4, F_GUEST_CSUM, "GUEST_USO4 without GUEST_CSUM"),
        (F_GUEST_USO6, F_GUEST_CSUM, "GUEST_USO6 without GUEST_CSUM"),
        (
            F_CTRL_GUEST_OFFLOADS,
            1 << VIRTIO_NET_F_CTRL_VQ,
            "CTRL_GUEST_OFFLOADS without CTRL_VQ",
        ),
        (
            1 << VIRTIO_NET_F_MQ,
            1 << VIRTIO_NET_F_CTRL_VQ,
            "MQ without CTRL_VQ",
        ),
        (
            1 << VIRTIO_NET_F_GUEST_ANNOUNCE,
            1 << VIRTIO_NET_F_CTRL_VQ,
            "GUEST_ANNOUNCE without CTRL_VQ",
        ),
    ];
    for (f, needed, what) in needs {
        if acked & f != 0 && acked & needed == 0 {
            return Err(format!("the driver accepted {what} (5.1.3.1)"));
        }
    }
    Ok(())
}

/// TUNSETOFFLOAD's flags for the guest-receive offloads `guest` (feature
/// bits): what the TAP may hand over unfinished.
pub fn tun_offloads(guest: u64) -> u32 {
    use crate::tap::*;
    if guest & F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut t = TUN_F_CSUM;
    for (f, flag) in [(F_GUEST_TSO4, TUN_F_TSO4), (F_GUEST_TSO6, TUN_F_TSO6)] {
        if guest & f != 0 {
            t |= flag;
        }
    }
    // (tun takes USO for both IP versions or not at all)
    if guest & (F_GUEST_USO4 | F_GUEST_USO6) == F_GUEST_USO4 | F_GUEST_USO6 {
        t |= TUN_F_USO4 | TUN_F_USO6;
    }
    t
}

/// Whether a frame the TAP hands over (header first) needs no more than
/// the guest-receive offloads `on` (feature bits) to be taken.
fn finished_enough(frame: &[u8], on: u64) -> bool {
    let needs = match frame.get(1).copied().unwrap_or(GSO_NONE) & 0x7f {
        GSO_NONE => 0,
        GSO_TCPV4 => F_GUEST_TSO4,
        GSO_TCPV6 => F_GUEST_TSO6,
        GSO_UDP_L4 => F_GUEST_USO4 | F_GUEST_USO6,
        _ => return false,
    };
    let csum = if frame.first().is_some_and(|f| f & HDR_F_NEEDS_CSUM != 0) {
        F_GUEST_CSUM
    } else {
        0
    };
    let needs = needs | csum;
    // (USO: either IP version's bit will do, tun sets both or none)
    needs == 0
        || (needs & !(F_GUEST_USO4 | F_GUEST_USO6) & !on == 0
            && (needs & (F_GUEST_USO4 | F_GUEST_USO6) == 0
                || on & (F_GUEST_USO4 | F_GUEST_USO6) != 0))
}

/// Checks the virtio_net_hdr of a frame the guest sends (`hdr`, the first
/// 10 bytes; `frame_len`, the bytes after the 12-byte header) against the
/// offloads negotiated (`acked`): the TAP would take a bad one, or build
/// a broken frame from it.
pub fn check_tx_header(hdr: &[u8], frame_len: usize, acked: u64) -> Result<(), String> {
    let [flags, gso_type, h0, h1, s0, s1, c0, c1, o0, o1, ..] = *hdr else {
        return Err("a header shorter than 10 bytes".into());
    };
    let hdr_len = u16::from_le_bytes([h0, h1]) as usize;
    let gso_size = u16::from_le_bytes([s0, s1]);
    let csum_start = u16::from_le_bytes([c0, c1]) as usize;
    let csum_offset = u16::from_le_bytes([o0, o1]) as usize;
    // (flag bits other than NEEDS_CSUM mean nothing going out: the caller
    // clears them, as 5.1.6.2 has a device ignore what it does not know)
    if flags & HDR_F_NEEDS_CSUM != 0 {
        if acked & F_CSUM == 0 {
            return Err("NEEDS_CSUM without CSUM negotiated".into());
        }
        if csum_start + csum_offset + 2 > frame_len {
            return Err(format!(
                "csum_start {csum_start} + csum_offset {csum_offset} past the frame's {frame_len} bytes"
            ));
        }
    }
    let needed = match gso_type {
        GSO_NONE => return Ok(()),
        GSO_TCPV4 => F_HOST_TSO4,
        GSO_TCPV6 => F_HOST_TSO6,
        GSO_UDP_L4 => F_HOST_USO,
        t => return Err(format!("gso_type {t:#x} (TCPV4, TCPV6 or UDP_L4)")),
    };
    if acked & needed == 0 {
        return Err(format!(
            "gso_type {gso_type} without its feature negotiated"
        ));
    }
    if flags & HDR_F_NEEDS_CSUM == 0 {
        return Err("a GSO frame without NEEDS_CSUM".into());
    }
    if gso_size == 0 {
        return Err("a GSO frame with gso_size 0".into());
    }
    // (hdr_len is a hint without HDRLEN: the TAP raises a short one to the
    // checksum's end itself; one past the frame is wrong)
    if hdr_len > frame_len {
        return Err(format!(
            "hdr_len {hdr_len} past the frame's {frame_len} bytes"
        ));
    }
    Ok(())
}

/// How a NIC is set up.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
    /// Received frames a second and bytes a second (token buckets).
    pub rx_pps: Option<u64>,
    pub rx_bw: Option<u64>,
    /// Transmitted frames a second and bytes a second.
    pub tx_pps: Option<u64>,
    pub tx_bw: Option<u64>,
    /// Queue pairs (one TAP queue each); 0 counts as 1.
    pub pairs: u16,
    pub mode: NetMode,
    /// Host CPUs of the queue workers: pair i's on cpus[i % len].
    pub cpus: Vec<usize>,
    /// SCHED_FIFO priority of the queue workers.
    pub rt_priority: Option<u8>,
    pub offloads: Offloads,
    /// Mergeable receive buffers: a frame may span several chains.
    pub mrg_rxbuf: bool,
}

impl NetConfig {
    fn pair_count(&self) -> usize {
        self.pairs.max(1) as usize
    }
}

/// What the device and its workers share.
struct Shared {
    link_up: AtomicBool,
    /// Queue pairs the driver turned on (VQ_PAIRS_SET; 1 without MQ).
    pairs_on: AtomicU16,
    /// VIRTIO_NET_S_ANNOUNCE: the guest is asked to announce itself.
    announce: AtomicBool,
    /// The workers' placements, by pair.
    placements: Mutex<Vec<Option<devices::state::DeviceThread>>>,
    /// Each TAP queue attached to its TAP (TUNSETQUEUE) or not: they are
    /// opened attached, and the kernel keeps the state across the
    /// device's stops.
    attached: Mutex<Vec<bool>>,
    /// The guest-receive offloads on now (feature bits; GUEST_OFFLOADS_SET
    /// changes them).
    guest_offloads: AtomicU64,
    /// A restored guest's MAC still to be announced (the link was down):
    /// announced when it comes up.
    announce_pending: AtomicBool,
}

/// What a worker hands back when it stops: its pair's queues, and the
/// control queue (pair 0's worker serves it).
#[derive(Default)]
struct WorkerEnd {
    data: Vec<ActiveQueue>,
    ctrl: Option<ActiveQueue>,
}

pub struct Net<M> {
    /// One TAP queue per pair.
    taps: Vec<Arc<Tap>>,
    config: NetConfig,
    pub counters: Arc<NetCounters>,
    shared: Arc<Shared>,
    workers: Vec<WorkerThread<WorkerEnd>>,
    /// Pair 0's worker's wake-up (a link that comes up with an announce
    /// pending).
    wake0: Option<EventFd>,
    /// Restored: the guest (GUEST_ANNOUNCE) or the device announces the
    /// MAC when the device runs again.
    announce: bool,
    /// The driver set the device up afresh (a reset, or new): its
    /// negotiated offloads are all on at the next activation; a resume or
    /// a restore keeps what GUEST_OFFLOADS_SET left.
    offloads_fresh: bool,
    _mem: std::marker::PhantomData<M>,
}

impl<M> Net<M> {
    /// A NIC on `taps`, one per queue pair (`config.pairs` of them).
    pub fn new(taps: Vec<Tap>, config: NetConfig) -> Result<Self, String> {
        if taps.len() != config.pair_count() {
            return Err(format!(
                "virtio-net: {} TAP queues for {} queue pairs",
                taps.len(),
                config.pair_count()
            ));
        }
        let queues = taps.len();
        Ok(Net {
            taps: taps.into_iter().map(Arc::new).collect(),
            config,
            counters: Arc::default(),
            shared: Arc::new(Shared {
                link_up: AtomicBool::new(true),
                pairs_on: AtomicU16::new(1),
                announce: AtomicBool::new(false),
                placements: Mutex::new(Vec::new()),
                attached: Mutex::new(vec![true; queues]),
                guest_offloads: AtomicU64::new(0),
                announce_pending: AtomicBool::new(false),
            }),
            workers: Vec::new(),
            wake0: None,
            announce: false,
            offloads_fresh: true,
            _mem: std::marker::PhantomData,
        })
    }

    /// Where each queue worker runs (those running now or last).
    pub fn placements(&self) -> Vec<devices::state::DeviceThread> {
        self.shared
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    fn stop_workers(&mut self) -> Vec<ActiveQueue> {
        for w in &self.workers {
            w.signal();
        }
        let mut data = Vec::new();
        let mut ctrl = None;
        let mut lost = false;
        for w in self.workers.drain(..) {
            match w.join() {
                Some(end) => {
                    data.extend(end.data);
                    ctrl = ctrl.or(end.ctrl);
                }
                None => lost = true,
            }
        }
        self.wake0 = None;
        if lost {
            // a worker that ended badly took its queues: none are handed
            // back, so the transport keeps its own (and asks for a reset)
            // rather than taking the others in the wrong places
            return Vec::new();
        }
        data.extend(ctrl);
        data
    }
}

impl<M> Drop for Net<M> {
    /// The workers stop with the device: they must not outlive the VM's
    /// memory and TAP.
    fn drop(&mut self) {
        let _ = self.stop_workers();
    }
}

/// "52:54:00:12:34:56".
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses "52:54:00:12:34:56".
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("MAC {s:?}: six hex bytes separated by ':'"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("MAC {s:?}: {p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "MAC {s:?}: a multicast address (its first byte is odd)"
        ));
    }
    Ok(mac)
}

/// Counter names per pair (the counters' names are static).
const PAIR_RX_NAMES: [&str; MAX_PAIRS as usize] = [
    "pair0_rx_frames",
    "pair1_rx_frames",
    "pair2_rx_frames",
    "pair3_rx_frames",
    "pair4_rx_frames",
    "pair5_rx_frames",
    "pair6_rx_frames",
    "pair7_rx_frames",
    "pair8_rx_frames",
    "pair9_rx_frames",
    "pair10_rx_frames",
    "pair11_rx_frames",
    "pair12_rx_frames",
    "pair13_rx_frames",
    "pair14_rx_frames",
    "pair15_rx_frames",
];
const PAIR_TX_NAMES: [&str; MAX_PAIRS as usize] = [
    "pair0_tx_frames",
    "pair1_tx_frames",
    "pair2_tx_frames",
    "pair3_tx_frames",
    "pair4_tx_frames",
    "pair5_tx_frames",
    "pair6_tx_frames",
    "pair7_tx_frames",
    "pair8_tx_frames",
    "pair9_tx_frames",
    "pair10_tx_frames",
    "pair11_tx_frames",
    "pair12_tx_frames",
    "pair13_tx_frames",
    "pair14_tx_frames",
    "pair15_tx_frames",
];

impl<M: GuestMemory + Clone + Send + Sync + 'static> VirtioDevice<M> for Net<M> {
    fn device_type(&self) -> u16 {
        1
    }

    fn features(&self) -> u64 {
        let mut f = crate::F_VERSION_1
            | crate::F_RING_EVENT_IDX
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE;
        if self.config.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        if self.config.pair_count() > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        if self.config.mrg_rxbuf {
            f |= F_MRG_RXBUF;
        }
        f | self.config.offloads.features()
    }

    /// Every pair's receive and transmit queue, then the control queue.
    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut sizes = vec![QUEUE_SIZE; 2 * self.config.pair_count()];
        sizes.push(CTRL_QUEUE_SIZE);
        sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = nic_config_space(
            &self.config.mac,
            self.shared.link_up.load(Ordering::Acquire),
            self.config.pair_count() as u16,
            self.config.mtu,
        );
        if self.shared.announce.load(Ordering::Acquire) {
            space[6] |= VIRTIO_NET_S_ANNOUNCE as u8;
        }
        crate::read_config_space(&space, offset, data);
    }

    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
        mut queues: Vec<ActiveQueue>,
        acked: u64,
    ) -> Result<(), String> {
        // (5.1.2 of virtio-net: without MQ, one pair and the control
        // queue right after it)
        check_offload_features(acked)?;
        let mq = acked & 1 << VIRTIO_NET_F_MQ != 0;
        let ctrl_on = acked & 1 << VIRTIO_NET_F_CTRL_VQ != 0;
        let pairs = if mq { self.config.pair_count() } else { 1 };
        // (5.1.6.5.6.1: after a reset, the offloads negotiated are on; a
        // resume keeps what the driver set since)
        if std::mem::take(&mut self.offloads_fresh) {
            self.shared
                .guest_offloads
                .store(acked & GUEST_OFFLOADS, Ordering::Release);
        }
        if queues.len() != 2 * pairs + ctrl_on as usize {
            return Err(format!(
                "virtio-net needs every queue enabled: {} receive and transmit queues{} ({} enabled)",
                2 * pairs,
                if ctrl_on { " and the control queue" } else { "" },
                queues.len()
            ));
        }
        if !mq {
            self.shared.pairs_on.store(1, Ordering::Release);
        }
        let ctrl_queue = if ctrl_on { queues.pop() } else { None };
        let offer = CtrlOffer {
            mq,
            max_pairs: pairs as u16,
            announce: ctrl_on && acked & 1 << VIRTIO_NET_F_GUEST_ANNOUNCE != 0,
            guest_offloads: (ctrl_on && acked & F_CTRL_GUEST_OFFLOADS != 0)
                .then_some(acked & GUEST_OFFLOADS),
        };
        let wakes = (0..pairs)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let wake_clones = wakes
            .iter()
            .map(|w| w.try_clone().map_err(|e| format!("eventfd: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut steering = Some(Steering {
            // every TAP queue: pairs past what this driver set up stay
            // detached
            taps: self.taps.clone(),
            wakes: wake_clones,
            ctrl: ctrl_queue.map(|q| (q, 2 * pairs as u16)),
            offer,
        });
        *self
            .shared
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = vec![None; pairs];
        self.wake0 = wakes.first().and_then(|w| w.try_clone().ok());
        let mut queues = queues.into_iter();
        for (pair, wake) in wakes.into_iter().enumerate() {
            let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
                unreachable!("2 * pairs queues, counted above");
            };
            let (stop, worker_stop) = match crate::worker_stop_pair() {
                Ok(p) => p,
                Err(e) => {
                    let _ = self.stop_workers();
                    return Err(e);
                }
            };
            let mut worker = Worker::new(
                pair,
                mem.clone(),
                self.taps[pair].clone(),
                interrupt.clone(),
                self.counters.clone(),
                self.shared.clone(),
                [rx, tx],
                [worker_stop, wake],
                &self.config,
            );
            worker.acked = acked;
            worker.steering = steering.take();
            if pair == 0 && std::mem::take(&mut self.announce) {
                worker.announce = Some(self.config.mac);
            }
            let name = if pairs > 1 {
                format!("net-{}-q{pair}", self.taps[pair].name)
            } else {
                format!("net-{}", self.taps[pair].name)
            };
            match WorkerThread::spawn(name, seccomp::Role::DeviceWorker, stop, move || {
                worker.run()
            }) {
                Ok(w) => self.workers.push(w),
                Err(e) => {
                    let _ = self.stop_workers();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Vec<ActiveQueue> {
        self.stop_workers()
    }

    fn driver_reset(&mut self) {
        // (5.1.6.5.5: after a reset only the first pair is used)
        self.shared.pairs_on.store(1, Ordering::Release);
        self.shared.announce.store(false, Ordering::Release);
        self.shared.guest_offloads.store(0, Ordering::Release);
        self.offloads_fresh = true;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut v = vec![
            ("rx_frames", l(&c.rx_frames)),
            ("rx_bytes", l(&c.rx_bytes)),
            ("rx_dropped_too_big", l(&c.rx_dropped_too_big)),
            ("tx_frames", l(&c.tx_frames)),
            ("tx_bytes", l(&c.tx_bytes)),
            ("tx_dropped_bad_chain", l(&c.tx_dropped_bad_chain)),
            ("tx_write_errors", l(&c.tx_write_errors)),
            ("rx_notifications", l(&c.notifications[RX])),
            (
                "rx_notifications_suppressed",
                l(&c.notifications_suppressed[RX]),
            ),
            ("tx_notifications", l(&c.notifications[TX])),
            (
                "tx_notifications_suppressed",
                l(&c.notifications_suppressed[TX]),
            ),
            ("bad_queue", l(&c.bad_queue)),
            ("dropped_link_down", l(&c.dropped_link_down)),
            ("rx_throttled", l(&c.rx_throttled)),
            ("tx_throttled", l(&c.tx_throttled)),
            ("rx_dropped_at_stop", l(&c.rx_dropped_at_stop)),
            ("announces", l(&c.announces)),
            ("guest_kicks", l(&c.guest_kicks)),
            ("ctrl_commands", l(&c.ctrl_commands)),
            ("ctrl_refused", l(&c.ctrl_refused)),
            ("queue_steering_errors", l(&c.queue_steering_errors)),
            ("tx_dropped_bad_offload", l(&c.tx_dropped_bad_offload)),
            ("rx_merged", l(&c.rx_merged)),
            ("offload_errors", l(&c.offload_errors)),
            ("tap_errors", l(&c.tap_errors)),
            ("rx_dropped_unfinished", l(&c.rx_dropped_unfinished)),
            ("tx_budget_spent", l(&c.tx_budget_spent)),
            (
                "guest_offloads",
                self.shared.guest_offloads.load(Ordering::Relaxed),
            ),
            (
                "pairs_on",
                self.shared.pairs_on.load(Ordering::Relaxed) as u64,
            ),
            // frames for the guest the TAP dropped, its queue full (the
            // worker held back by a rate limit or a slow guest): the
            // kernel's count, not ours
            ("tap_dropped", tap_dropped(&self.taps[0].name)),
            (
                "link_up",
                self.shared.link_up.load(Ordering::Relaxed) as u64,
            ),
        ];
        if self.config.pair_count() > 1 {
            for p in 0..self.config.pair_count() {
                v.push((PAIR_RX_NAMES[p], l(&c.pair_rx_frames[p])));
                v.push((PAIR_TX_NAMES[p], l(&c.pair_tx_frames[p])));
            }
        }
        v
    }

    fn threads(&self) -> Vec<devices::state::DeviceThread> {
        self.placements()
    }

    fn control(&mut self, action: &str) -> Result<bool, String> {
        let up = match action {
            "link-up" => true,
            "link-down" => false,
            other => {
                return Err(format!(
                    "virtio-net takes link-up or link-down, not {other:?}"
                ))
            }
        };
        let changed = self.shared.link_up.swap(up, Ordering::AcqRel) != up;
        if up && self.shared.announce_pending.load(Ordering::Acquire) {
            if let Some(w) = &self.wake0 {
                let _ = w.write(1);
            }
        }
        Ok(changed)
    }

    /// The link, MAC and MTU (9 bytes, [`nic_state`]) and, with more than
    /// one pair, the pairs the guest turned on.
    fn state(&self) -> Vec<u8> {
        let offered = self.config.offloads.features();
        nic_state_with_pairs(
            self.shared.link_up.load(Ordering::Acquire),
            &self.config.mac,
            self.config.mtu,
            self.config.pair_count() as u16,
            self.shared.pairs_on.load(Ordering::Acquire),
            (offered != 0).then(|| self.shared.guest_offloads.load(Ordering::Acquire)),
        )
    }

    fn set_state(&mut self, state: &[u8]) -> Result<(), String> {
        let (link_up, pairs_on, offloads) = check_nic_state_with_pairs(
            state,
            &self.config.mac,
            self.config.mtu,
            self.config.pair_count() as u16,
            self.config.offloads.features(),
        )?;
        self.shared.link_up.store(link_up, Ordering::Release);
        self.shared.pairs_on.store(pairs_on, Ordering::Release);
        if let Some(o) = offloads {
            // what the guest had on travels; no fresh set at activation
            self.shared.guest_offloads.store(o, Ordering::Release);
            self.offloads_fresh = false;
        }
        // the guest is somewhere new (a restore, a migration's
        // destination): the network learns where its MAC now is
        self.announce = true;
        Ok(())
    }
}

/// Frames the kernel dropped on their way into TAP `name` (its queues
/// full), from its statistics (0 when they cannot be read).
fn tap_dropped(name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/tx_dropped"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The RARP QEMU sends for a guest that cannot announce itself (no
/// GUEST_ANNOUNCE), behind an empty virtio-net header: from `mac` to the
/// broadcast address, "reverse request" for `mac`, so every switch on the
/// way learns the guest's new port.
pub fn rarp(mac: &[u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0x80, 0x35]); // ETH_P_RARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, op 3
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(VNET_HDR_LEN + 60, 0);
    f
}

/// A NIC's configuration space, whatever backs it: mac[6], status u16,
/// max_virtqueue_pairs u16, mtu u16 (1500 when unset).
pub fn nic_config_space(mac: &[u8; 6], link_up: bool, pairs: u16, mtu: Option<u16>) -> [u8; 12] {
    let mut space = [0u8; 12];
    space[..6].copy_from_slice(mac);
    let status = if link_up {
        VIRTIO_NET_S_LINK_UP as u16
    } else {
        0
    };
    space[6..8].copy_from_slice(&status.to_le_bytes());
    space[8..10].copy_from_slice(&pairs.to_le_bytes());
    space[10..12].copy_from_slice(&mtu.unwrap_or(1500).to_le_bytes());
    space
}

/// A NIC's own state in a stream, whatever backs it (TAP or vhost-user,
/// so a guest moves from one to the other): link, MAC, MTU (0: unset).
pub fn nic_state(link_up: bool, mac: &[u8; 6], mtu: Option<u16>) -> Vec<u8> {
    let mut s = vec![link_up as u8];
    s.extend_from_slice(mac);
    s.extend_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    s
}

/// [`nic_state`], and with more than one pair (`pairs`) the pairs the
/// guest turned on (11 bytes), and with offloads offered the
/// guest-receive offloads on (19 bytes): a 1-pair NIC without offloads
/// keeps the 9-byte state, so a guest moves between TAP and vhost-user
/// NICs.
pub fn nic_state_with_pairs(
    link_up: bool,
    mac: &[u8; 6],
    mtu: Option<u16>,
    pairs: u16,
    pairs_on: u16,
    guest_offloads: Option<u64>,
) -> Vec<u8> {
    let mut s = nic_state(link_up, mac, mtu);
    if pairs > 1 || guest_offloads.is_some() {
        s.extend_from_slice(&pairs_on.to_le_bytes());
    }
    if let Some(o) = guest_offloads {
        s.extend_from_slice(&o.to_le_bytes());
    }
    s
}

/// Checks a state [`nic_state_with_pairs`] wrote against this NIC of
/// `pairs` pairs offering the guest-receive offloads `offered` (feature
/// bits); returns (link up, pairs on, the guest-receive offloads on, if
/// the state says).
pub fn check_nic_state_with_pairs(
    state: &[u8],
    own_mac: &[u8; 6],
    own_mtu: Option<u16>,
    pairs: u16,
    offered: u64,
) -> Result<(bool, u16, Option<u64>), String> {
    let (nic, on, offloads) = match state.len() {
        11 => (&state[..9], u16::from_le_bytes([state[9], state[10]]), None),
        19 => (
            &state[..9],
            u16::from_le_bytes([state[9], state[10]]),
            Some(u64::from_le_bytes(
                state[11..19].try_into().expect("8 bytes"),
            )),
        ),
        _ => (state, 1, None),
    };
    let link_up = check_nic_state(nic, own_mac, own_mtu)?;
    if let Some(o) = offloads {
        if o & !(offered & GUEST_OFFLOADS) != 0 {
            return Err(format!(
                "the guest had receive offloads {o:#x} on, this NIC offers {:#x} (offload=)",
                offered & GUEST_OFFLOADS
            ));
        }
    }
    if on == 0 || on > pairs.max(1) {
        return Err(format!(
            "the guest had {on} queue pairs on, this NIC has {} (queues=)",
            pairs.max(1)
        ));
    }
    Ok((link_up, on, offloads))
}

/// Checks a saved NIC state against this NIC (the guest knows its MAC and
/// MTU: they must not change under it); returns the saved link state.
pub fn check_nic_state(
    state: &[u8],
    own_mac: &[u8; 6],
    own_mtu: Option<u16>,
) -> Result<bool, String> {
    let [link @ (0 | 1), mac @ .., m0, m1] = state else {
        return Err(format!(
            "virtio-net state of {} bytes (9 expected)",
            state.len()
        ));
    };
    let mac: [u8; 6] = mac
        .try_into()
        .map_err(|_| format!("virtio-net state of {} bytes (9 expected)", state.len()))?;
    let mtu = u16::from_le_bytes([*m0, *m1]);
    let hex = |m: &[u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    if mac != *own_mac {
        return Err(format!(
            "the guest's NIC had MAC {}, this one has {}: give it mac={}",
            hex(&mac),
            hex(own_mac),
            hex(&mac)
        ));
    }
    if mtu != own_mtu.unwrap_or(0) {
        return Err(format!(
            "the guest's NIC had MTU {}, this one {}: give it the same mtu=",
            if mtu == 0 {
                "unset".to_string()
            } else {
                mtu.to_string()
            },
            own_mtu.map_or("unset".to_string(), |m| m.to_string())
        ));
    }
    Ok(*link == 1)
}

/// Where the worker's frames come from and go: the TAP. A seam for the
/// fuzz target (`crate::fuzzing::net`), which puts a datagram socket pair
/// in the TAP's place: opening a TAP needs CAP_NET_ADMIN, and frames reach
/// a TAP's read side only through the host's network stack, so a fuzzer
/// could neither run unprivileged nor choose the frames the guest gets.
pub(crate) trait FramePort: AsRawFd + Send + Sync + 'static {
    fn port_name(&self) -> &str;
    /// One frame (header first) into `buf`; Ok(None) when none is waiting.
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    /// One frame (header first).
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<()>;
    /// Attaches or detaches this queue of a multi-queue port.
    fn set_queue_attached(&self, attached: bool) -> Result<(), String> {
        let _ = attached;
        Ok(())
    }
    /// The offloads the guest takes (TUN_F_* flags).
    fn set_offloads(&self, flags: u32) -> Result<(), String> {
        let _ = flags;
        Ok(())
    }
}

impl FramePort for Tap {
    fn port_name(&self) -> &str {
        &self.name
    }
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        Tap::write_frame(self, frame)
    }
    fn set_queue_attached(&self, attached: bool) -> Result<(), String> {
        if !self.multi_queue {
            return Ok(());
        }
        Tap::set_queue_attached(self, attached).map_err(|e| e.to_string())
    }
    fn set_offloads(&self, flags: u32) -> Result<(), String> {
        Tap::set_offloads(self, flags).map_err(|e| e.to_string())
    }
}

/// What became of a frame offered to the receive queue.
enum Delivery {
    Done,
    /// Too few buffers posted: the frame waits for more.
    NoBuffer,
    /// A broken chain was given back: the frame waits for the next.
    Retry,
    Dropped,
}

/// Pair 0's worker also keeps the TAP's queue steering and the control
/// queue: which TAP queues are attached, and the other workers' wake-ups.
struct Steering<P> {
    taps: Vec<Arc<P>>,
    /// Each pair's worker's wake-up (a pair went on or off).
    wakes: Vec<EventFd>,
    /// The control queue and its index.
    ctrl: Option<(ActiveQueue, u16)>,
    offer: CtrlOffer,
}

struct Worker<M, P = Tap> {
    /// The queue pair this worker serves.
    pair: usize,
    mem: M,
    shared: Arc<Shared>,
    tap: Arc<P>,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<NetCounters>,
    queues: Vec<(Queue, EventFd)>,
    stop: EventFd,
    /// Written when this worker's pair goes on or off.
    wake: EventFd,
    /// Pair 0's: the TAP queues' steering and the control queue.
    steering: Option<Steering<P>>,
    /// The length of a frame read from the TAP into `rx_buf` that found
    /// no posted chain yet.
    pending: Option<usize>,
    /// One frame each way, kept across frames (no allocation per frame).
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// No chain posted: the TAP is not read until the driver posts one.
    rx_blocked: bool,
    /// The device's RARP rounds still to send after a restore: the MAC and
    /// how many.
    rarp_rounds: Option<([u8; 6], u32)>,
    /// The rate limits each way, and whether one holds its way back now
    /// (until the timer fires).
    rx_limit: RateLimiter,
    tx_limit: RateLimiter,
    rx_throttled: bool,
    tx_throttled: bool,
    timer: Option<TimerFd>,
    /// Restored: announce this MAC (GUEST_ANNOUNCE, or a RARP on the TAP)
    /// once running.
    announce: Option<[u8; 6]>,
    mode: NetMode,
    /// Poll mode: the available index each queue's avail_event was last
    /// set behind (kicks suppressed up to there).
    kicks_held_at: [Option<u16>; 2],
    /// Where to run: a CPU, a SCHED_FIFO priority.
    cpu: Option<usize>,
    rt_priority: Option<u8>,
    /// The features the driver accepted.
    acked: u64,
}

const EV_TAP: u64 = 0;
const EV_RX: u64 = 1;
const EV_TX: u64 = 2;
const EV_STOP: u64 = 3;
const EV_TIMER: u64 = 4;
const EV_WAKE: u64 = 5;
const EV_CTRL: u64 = 6;

impl<M: GuestMemory + Clone + Send + Sync + 'static, P: FramePort> Worker<M, P> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        pair: usize,
        mem: M,
        tap: Arc<P>,
        interrupt: Arc<dyn Interrupt>,
        counters: Arc<NetCounters>,
        shared: Arc<Shared>,
        [rx, tx]: [ActiveQueue; 2],
        [stop, wake]: [EventFd; 2],
        config: &NetConfig,
    ) -> Self {
        Worker {
            pair,
            mem,
            shared,
            tap,
            interrupt,
            counters,
            queues: vec![(rx.queue, rx.kick), (tx.queue, tx.kick)],
            stop,
            wake,
            steering: None,
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            rx_blocked: false,
            rarp_rounds: None,
            rx_limit: RateLimiter::new(config.rx_pps, config.rx_bw),
            tx_limit: RateLimiter::new(config.tx_pps, config.tx_bw),
            rx_throttled: false,
            tx_throttled: false,
            timer: None,
            announce: None,
            mode: config.mode,
            kicks_held_at: [None; 2],
            cpu: (!config.cpus.is_empty()).then(|| config.cpus[pair % config.cpus.len()]),
            rt_priority: config.rt_priority,
            acked: 0,
        }
    }

    /// This worker's pair is one the driver turned on.
    fn active(&self) -> bool {
        self.pair < self.shared.pairs_on.load(Ordering::Acquire) as usize
    }

    /// This worker's TAP queue is attached (a detached one polls as an
    /// error and reads nothing).
    fn attached(&self) -> bool {
        self.shared
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(self.pair)
            .copied()
            .unwrap_or(false)
    }

    /// The queue index the driver knows queue `q` (RX, TX) of this pair by.
    fn queue_index(&self, q: usize) -> u16 {
        (2 * self.pair + q) as u16
    }

    /// Pins this thread and makes it SCHED_FIFO as asked, then reads back
    /// where it runs (the run report shows it).
    fn place(&self) {
        let mut settings = Vec::new();
        let mut record = |name: &str, r: Result<String, String>| {
            if let Err(why) = &r {
                tracing::warn!(
                    "net {} pair {}: {name}: {why}",
                    self.tap.port_name(),
                    self.pair
                );
            }
            settings.push(devices::state::ThreadSetting {
                name: name.to_string(),
                applied: r.is_ok(),
                detail: r.unwrap_or_else(|e| e),
            });
        };
        if let Some(cpu) = self.cpu {
            record(
                "cpu",
                rt::pin_current_thread(&[cpu])
                    .map(|()| format!("pinned to CPU {cpu}"))
                    .map_err(|e| e.to_string()),
            );
        }
        if let Some(p) = self.rt_priority {
            record(
                "rt-priority",
                rt::set_current_thread_fifo(p as i32)
                    .map(|()| format!("SCHED_FIFO {p}"))
                    .map_err(|e| e.to_string()),
            );
        }
        let here = rt::current_thread_sched();
        let placed = devices::state::DeviceThread {
            thread: std::thread::current().name().unwrap_or("?").to_string(),
            tid: rt::current_tid(),
            cpus: here.as_ref().map(|h| h.cpus.clone()).unwrap_or_default(),
            policy: here
                .as_ref()
                .map(|h| h.policy.clone())
                .unwrap_or_else(|e| format!("unknown ({e})")),
            priority: here.as_ref().map(|h| h.priority).unwrap_or(0),
            settings,
        };
        let mut all = self
            .shared
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = all.get_mut(self.pair) {
            *slot = Some(placed);
        }
    }

    fn run(mut self) -> WorkerEnd {
        self.place();
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("net {}: epoll: {e}; the device stops", self.tap.port_name());
                return self.into_queues();
            }
        };
        let add = |fd: i32, data: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
        };
        self.timer = TimerFd::new().ok();
        let poll = self.mode == NetMode::Poll;
        let mut ok = add(self.queues[RX].1.as_raw_fd(), EV_RX).is_ok()
            && add(self.queues[TX].1.as_raw_fd(), EV_TX).is_ok()
            && add(self.stop.as_raw_fd(), EV_STOP).is_ok()
            && add(self.wake.as_raw_fd(), EV_WAKE).is_ok()
            && self
                .timer
                .as_ref()
                .is_some_and(|t| add(t.as_raw_fd(), EV_TIMER).is_ok());
        if let Some((c, _)) = self.steering.as_ref().and_then(|s| s.ctrl.as_ref()) {
            ok &= add(c.kick.as_raw_fd(), EV_CTRL).is_ok();
        }
        if !ok {
            tracing::error!("net {}: epoll registration failed", self.tap.port_name());
            return self.into_queues();
        }
        self.steer();
        if let Some(mac) = self.announce.take() {
            self.announce(mac);
        }
        // (EPOLLERR on the TAP queue: detached, or the TAP deleted; not
        // watched again until the next wake-up)
        let mut tap_failed = false;
        // buffers or frames the driver posted while the device was stopped
        // (a kick consumed before a pause, a restored queue)
        if self.active() {
            self.transmit();
            self.receive();
        }
        self.serve_ctrl();
        // (the TAP is watched only in event mode, while frames can be
        // taken: level-triggered, it would wake this thread in a loop)
        let mut tap_watched = false;
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            if !poll {
                let want = !self.rx_blocked && !tap_failed && self.active() && self.attached();
                if want != tap_watched {
                    let op = if want {
                        ControlOperation::Add
                    } else {
                        ControlOperation::Delete
                    };
                    let _ = epoll.ctl(
                        op,
                        self.tap.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, EV_TAP),
                    );
                    tap_watched = want;
                }
            }
            let n = match epoll.wait(if poll { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("net {}: epoll_wait: {e}", self.tap.port_name());
                    return self.into_queues();
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    EV_STOP => return self.into_queues(),
                    EV_TX => {
                        // (a pair turned off still completes what was
                        // posted: its frames fail on the detached queue,
                        // counted, and the driver gets its buffers back)
                        self.count_kicks(TX);
                        self.transmit();
                    }
                    EV_RX => {
                        self.count_kicks(RX);
                        self.rx_blocked = false;
                        if self.active() {
                            self.receive();
                        }
                    }
                    EV_TAP
                        if ev
                            .event_set()
                            .intersects(EventSet::ERROR | EventSet::HANG_UP) =>
                    {
                        if !tap_failed {
                            self.counters.tap_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        tap_failed = true;
                    }
                    EV_TAP if self.active() => self.receive(),
                    EV_WAKE => {
                        let _ = self.wake.read();
                        self.rx_blocked = false;
                        tap_failed = false;
                        if let Some(mac) = self.announce.take() {
                            self.announce(mac);
                        }
                        self.transmit();
                        if self.active() {
                            self.receive();
                        }
                    }
                    EV_CTRL => {
                        if let Some((c, _)) = self.steering.as_ref().and_then(|s| s.ctrl.as_ref()) {
                            let _ = c.kick.read();
                        }
                        self.serve_ctrl();
                    }
                    EV_TIMER => {
                        if let Some(t) = self.timer.as_mut() {
                            let _ = t.wait();
                        }
                        self.tx_throttled = false;
                        if self.rx_throttled {
                            self.rx_throttled = false;
                            self.rx_blocked = false;
                        }
                        self.rarp_round();
                        if self.active() {
                            self.transmit();
                            self.receive();
                        }
                    }
                    _ => {}
                }
            }
            if poll && self.active() {
                // a PMD's loop: the queues and the TAP, over and over, the
                // other events looked at every POLL_PASSES passes
                for _ in 0..POLL_PASSES {
                    self.transmit();
                    self.receive();
                    self.hold_kicks();
                    std::hint::spin_loop();
                }
            } else if poll {
                // an idle pair's poller waits for its pair to come on (what
                // woke it is left for the next look)
                let _ = epoll.wait(10, &mut events[..1]);
            }
        }
    }

    /// Adds the guest's notifications on queue `q` to the count (the
    /// eventfd says how many since the last read).
    fn count_kicks(&self, q: usize) {
        if let Ok(n) = self.queues[q].1.read() {
            self.counters.guest_kicks.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Poll mode: asks the driver not to notify this pair's queues. With
    /// EVENT_IDX, avail_event goes one behind the next chain to take, so
    /// no new available index the driver writes crosses it (virtio 1.2,
    /// 2.7.10); without, the used ring's NO_NOTIFY flag.
    fn hold_kicks(&mut self) {
        for q in [RX, TX] {
            let queue = &mut self.queues[q].0;
            let next = queue.next_avail();
            if self.kicks_held_at[q] == Some(next) {
                continue;
            }
            let held = if queue.event_idx_enabled() {
                let at = queue
                    .used_ring()
                    .checked_add(4 + 8 * u64::from(queue.size()));
                at.is_some_and(|a| {
                    self.mem
                        .write_obj(next.wrapping_sub(1).to_le(), GuestAddress(a))
                        .is_ok()
                })
            } else {
                queue.disable_notification(&self.mem).is_ok()
            };
            if held {
                self.kicks_held_at[q] = Some(next);
            }
        }
    }

    /// Pair 0's worker: the TAP queues of the pairs that are on attached,
    /// the others detached, and their workers told.
    fn steer(&mut self) {
        let on = self.shared.pairs_on.load(Ordering::Acquire) as usize;
        let Some(s) = self.steering.as_mut() else {
            return;
        };
        let mut attached = self
            .shared
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (i, tap) in s.taps.iter().enumerate() {
            let want = i < on;
            if attached.get(i) != Some(&!want) {
                continue;
            }
            match tap.set_queue_attached(want) {
                Ok(()) => attached[i] = want,
                Err(e) => {
                    self.counters
                        .queue_steering_errors
                        .fetch_add(1, Ordering::Relaxed);
                    devices::limited!(warn, "net {}: queue {i}: {e}", tap.port_name());
                }
            }
        }
        // every worker looks again whether its pair is on
        for w in s.wakes.iter().skip(1) {
            let _ = w.write(1);
        }
        drop(attached);
        self.apply_offloads();
    }

    /// Pair 0's worker: the TAP takes the guest-receive offloads on now
    /// (TUNSETOFFLOAD; one call covers every queue of the TAP).
    fn apply_offloads(&self) {
        let on = self.shared.guest_offloads.load(Ordering::Acquire);
        // (a kernel without USO refuses the whole set: then without USO,
        // then none, so the TAP never keeps more than the guest takes)
        let wanted = tun_offloads(on);
        for flags in [
            wanted,
            wanted & !(crate::tap::TUN_F_USO4 | crate::tap::TUN_F_USO6),
            0,
        ] {
            match self.tap.set_offloads(flags) {
                Ok(()) => {
                    if flags != wanted {
                        self.shared
                            .guest_offloads
                            .store(on & !(F_GUEST_USO4 | F_GUEST_USO6), Ordering::Release);
                    }
                    return;
                }
                Err(e) => {
                    self.counters.offload_errors.fetch_add(1, Ordering::Relaxed);
                    devices::limited!(warn, "net {}: {e}", self.tap.port_name());
                }
            }
        }
    }

    /// Pair 0's worker: answers the control queue's commands.
    fn serve_ctrl(&mut self) {
        let Some(mut s) = self.steering.take() else {
            return;
        };
        if let Some((ctrl, index)) = s.ctrl.as_mut() {
            let shared = self.shared.clone();
            let max = s.taps.len() as u16;
            let mut apply = |c: CtrlCommand| match c {
                CtrlCommand::Pairs(n) if n <= max => {
                    shared.pairs_on.store(n, Ordering::Release);
                    true
                }
                CtrlCommand::AnnounceAck => {
                    shared.announce.store(false, Ordering::Release);
                    true
                }
                CtrlCommand::GuestOffloads(bits) => {
                    shared.guest_offloads.store(bits, Ordering::Release);
                    true
                }
                _ => false,
            };
            let served = serve_ctrl_queue(&self.mem, &mut ctrl.queue, &s.offer, &mut apply);
            if let Err(why) = &served.broken {
                self.bad_queue(*index as usize, why);
            }
            for why in &served.refused {
                devices::limited!(warn, "net {}: control queue: {why}", self.tap.port_name());
            }
            self.counters
                .ctrl_commands
                .fetch_add(served.answered as u64, Ordering::Relaxed);
            self.counters
                .ctrl_refused
                .fetch_add(served.refused.len() as u64, Ordering::Relaxed);
            if served.answered > 0 {
                let _ = crate::signal_used(&mut ctrl.queue, &self.mem, &*self.interrupt, *index);
            }
            let pairs_changed = served.pairs.is_some()
                || served
                    .taken
                    .iter()
                    .any(|c| matches!(c, CtrlCommand::GuestOffloads(_)));
            self.steering = Some(s);
            if pairs_changed {
                // (the answer is already in the used ring, but the driver
                // takes no frame on a new pair before it reads it)
                self.steer();
            }
        } else {
            self.steering = Some(s);
        }
    }

    /// A restored guest's MAC: the guest announces itself where it can
    /// (GUEST_ANNOUNCE: the status bit and a configuration interrupt),
    /// else this device sends a RARP for it, as QEMU does.
    fn announce(&mut self, mac: [u8; 6]) {
        if !self.shared.link_up.load(Ordering::Acquire) {
            // once the link is up again
            self.shared.announce_pending.store(true, Ordering::Release);
            self.announce = Some(mac);
            return;
        }
        self.shared.announce_pending.store(false, Ordering::Release);
        let guest_can = self.steering.as_ref().is_some_and(|s| s.offer.announce);
        if guest_can {
            self.shared.announce.store(true, Ordering::Release);
            self.interrupt.config();
            self.counters.announces.fetch_add(1, Ordering::Relaxed);
        } else if self.tap.write_frame(&rarp(&mac)).is_ok() {
            self.counters.announces.fetch_add(1, Ordering::Relaxed);
            // and again, as QEMU's announce rounds do: a switch port that
            // was not forwarding yet (a bridge just given the TAP) gets
            // the next one
            self.rarp_rounds = Some((mac, RARP_ROUNDS));
            self.arm(RARP_FIRST_GAP);
        }
    }

    /// The announce's next RARP round, when the timer fired.
    fn rarp_round(&mut self) {
        let Some((mac, left)) = self.rarp_rounds.take() else {
            return;
        };
        if left == 0 || !self.shared.link_up.load(Ordering::Acquire) {
            return;
        }
        let _ = self.tap.write_frame(&rarp(&mac));
        if left > 1 {
            self.rarp_rounds = Some((mac, left - 1));
            // (50, 150, 350, 750 and 1550 ms after the first: past the
            // second a new bridge port may take to see the TAP's carrier)
            self.arm(RARP_FIRST_GAP * (1 << (RARP_ROUNDS - left + 1)));
        }
    }

    fn into_queues(mut self) -> WorkerEnd {
        if self.pending.is_some() {
            // a frame read but not delivered: lost with the pause
            self.counters
                .rx_dropped_at_stop
                .fetch_add(1, Ordering::Relaxed);
        }
        if self.mode == NetMode::Poll {
            // kicks the guest wrote while polled (none, if held well)
            self.count_kicks(RX);
            self.count_kicks(TX);
        }
        let ctrl = self.steering.take().and_then(|s| s.ctrl).map(|(q, _)| q);
        WorkerEnd {
            data: self
                .queues
                .into_iter()
                .map(|(queue, kick)| ActiveQueue { queue, kick })
                .collect(),
            ctrl,
        }
    }

    /// The timer fires after `wait` (a bucket refilled enough).
    fn arm(&mut self, wait: std::time::Duration) {
        if let Some(t) = self.timer.as_mut() {
            if let Err(e) = t.reset(wait, None) {
                tracing::warn!(
                    "net {}: arming the rate limiter's timer: {e}",
                    self.tap.port_name()
                );
            }
        }
    }

    fn notify(&mut self, q: usize) {
        let index = self.queue_index(q);
        match crate::signal_used(&mut self.queues[q].0, &self.mem, &*self.interrupt, index) {
            Ok(crate::Signal::Sent) => {
                self.counters.notifications[q].fetch_add(1, Ordering::Relaxed);
            }
            Ok(crate::Signal::Suppressed) => {
                self.counters.notifications_suppressed[q].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.bad_queue(index as usize, &e),
        }
    }

    fn bad_queue(&self, q: usize, why: &str) {
        if self.counters.bad_queue.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "net {}: queue {q}: {why} (logged once, counted)",
                self.tap.port_name()
            );
        }
    }

    /// The next chain of queue `q`: in poll mode without turning the
    /// driver's notifications back on.
    fn pop<'a>(
        &mut self,
        q: usize,
        mem: &'a M,
    ) -> crate::Popped<virtio_queue::DescriptorChain<&'a M>> {
        if self.mode == NetMode::Poll {
            crate::pop_chain_polled(&mut self.queues[q].0, mem)
        } else {
            crate::pop_chain(&mut self.queues[q].0, mem)
        }
    }

    /// Frames from the TAP into posted receive chains.
    fn receive(&mut self) {
        let mut delivered = false;
        let mut buf = std::mem::take(&mut self.rx_buf);
        // at most RX_BUDGET frames a pass: a host flooding the TAP must not
        // keep this thread from a pause or a reset (the TAP is
        // level-triggered: epoll wakes it again at once)
        for _ in 0..RX_BUDGET {
            if self.pending.is_none() && self.rx_limit.is_limited() {
                if let Err(wait) = self.rx_limit.may_go() {
                    // the TAP is not read until the bucket refills
                    self.counters.rx_throttled.fetch_add(1, Ordering::Relaxed);
                    self.rx_throttled = true;
                    self.rx_blocked = true;
                    self.arm(wait);
                    break;
                }
            }
            let len = match self.pending.take() {
                Some(n) => n,
                None => match self.tap.read_frame(&mut buf) {
                    Ok(Some(n)) if n >= VNET_HDR_LEN => {
                        self.rx_limit.charge((n - VNET_HDR_LEN) as u64);
                        n
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("net {}: reading the TAP: {e}", self.tap.port_name());
                        break;
                    }
                },
            };
            if !self.shared.link_up.load(Ordering::Acquire) {
                self.counters
                    .dropped_link_down
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mem = self.mem.clone();
            let frame = &mut buf[..len];
            if !finished_enough(frame, self.shared.guest_offloads.load(Ordering::Acquire)) {
                // the TAP still had offloads the guest has turned off (a
                // reset, GUEST_OFFLOADS_SET not yet applied): the frame
                // cannot be finished here
                self.counters
                    .rx_dropped_unfinished
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if self.acked & F_GUEST_CSUM == 0 {
                // no receive offloads negotiated: flags and GSO fields
                // zero (the TAP may set DATA_VALID)
                frame[..10].fill(0);
            }
            match self.deliver(&mem, frame) {
                Delivery::Done => {
                    delivered = true;
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.counters.pair_rx_frames[self.pair].fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .rx_bytes
                        .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                Delivery::NoBuffer => {
                    self.pending = Some(len);
                    self.rx_blocked = true;
                    break;
                }
                Delivery::Retry => {
                    delivered = true;
                    self.pending = Some(len);
                }
                Delivery::Dropped => delivered = true,
            }
        }
        self.rx_buf = buf;
        if delivered {
            self.notify(RX);
        }
    }

    /// Puts `frame` (header first) into the receive queue's next chain, or
    /// with MRG_RXBUF into as many chains as it takes (num_buffers says
    /// how many). Chains taken while too few are posted go back to the
    /// ring untouched.
    fn deliver(&mut self, mem: &M, frame: &mut [u8]) -> Delivery {
        let rx: usize = self.queue_index(RX).into();
        let mrg = self.acked & F_MRG_RXBUF != 0;
        let start = self.queues[RX].0.next_avail();
        let mut chains: Vec<(u16, Vec<virtio_queue::desc::split::Descriptor>)> = Vec::new();
        let mut room = 0usize;
        while room < frame.len() {
            let chain = match self.pop(RX, mem) {
                crate::Popped::Chain(c) => c,
                empty_or_broken => {
                    if let crate::Popped::Broken(why) = empty_or_broken {
                        self.bad_queue(rx, &why);
                    }
                    self.queues[RX].0.set_next_avail(start);
                    return Delivery::NoBuffer;
                }
            };
            let head = chain.head_index();
            let Some(descs) = whole_chain(chain) else {
                // a chain that does not end (a loop, longer than the queue,
                // an index past the table): given back unused, the frame
                // kept for the next chain
                self.bad_queue(
                    rx,
                    "a receive chain that does not end (a loop, or longer than the queue)",
                );
                self.give_back_unused(&chains, head);
                return Delivery::Retry;
            };
            if descs.iter().any(|d| !d.is_write_only()) {
                self.bad_queue(rx, "a receive chain holds a device-readable descriptor");
                self.give_back_unused(&chains, head);
                return Delivery::Dropped;
            }
            let this = descs
                .iter()
                .fold(0usize, |r, d| r.saturating_add(d.len() as usize));
            if chains.is_empty() && mrg && this < VNET_HDR_LEN {
                self.bad_queue(rx, "a mergeable receive buffer shorter than the header");
                self.give_back_unused(&chains, head);
                return Delivery::Dropped;
            }
            room = room.saturating_add(this);
            chains.push((head, descs));
            if !mrg && room < frame.len() {
                // the frame is dropped; the chain is given back used empty
                // (the driver reposts it)
                self.counters
                    .rx_dropped_too_big
                    .fetch_add(1, Ordering::Relaxed);
                let (head, _) = chains.pop().expect("one chain");
                self.give_back_unused(&chains, head);
                return Delivery::Dropped;
            }
        }
        frame[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        let mut at = 0usize;
        let mut failed = false;
        for (head, descs) in &chains {
            let mut written = 0usize;
            for d in descs {
                if at == frame.len() || failed {
                    break;
                }
                let n = (d.len() as usize).min(frame.len() - at);
                if mem.write_slice(&frame[at..at + n], d.addr()).is_err() {
                    // the rest of the frame goes nowhere: what was written
                    // is said, the chains after it go back empty
                    self.bad_queue(rx, "a receive buffer outside guest memory");
                    failed = true;
                    break;
                }
                written += n;
                at += n;
            }
            self.give_back(RX, *head, if failed { 0 } else { written as u32 });
        }
        if failed {
            return Delivery::Dropped;
        }
        if chains.len() > 1 {
            self.counters.rx_merged.fetch_add(1, Ordering::Relaxed);
        }
        Delivery::Done
    }

    /// Gives the chains of `taken` and `head` back used and empty.
    fn give_back_unused(
        &mut self,
        taken: &[(u16, Vec<virtio_queue::desc::split::Descriptor>)],
        head: u16,
    ) {
        for &(h, _) in taken {
            self.give_back(RX, h, 0);
        }
        self.give_back(RX, head, 0);
    }

    /// Puts chain `head` of queue `q` in its used ring, `len` bytes written.
    fn give_back(&mut self, q: usize, head: u16, len: u32) {
        if let Err(e) = self.queues[q].0.add_used(&self.mem, head, len) {
            self.bad_queue(self.queue_index(q).into(), &format!("{e:?}"));
        }
    }

    /// Chains from the transmit queue to the TAP.
    fn transmit(&mut self) {
        let mem = self.mem.clone();
        let mut done = false;
        let mut budget = TX_BUDGET;
        while !self.tx_throttled {
            if budget == 0 {
                // a driver refilling as fast as this thread sends must not
                // keep it from its other events: the rest in the next pass
                self.counters
                    .tx_budget_spent
                    .fetch_add(1, Ordering::Relaxed);
                let _ = self.wake.write(1);
                break;
            }
            budget -= 1;
            if self.tx_limit.is_limited() {
                if let Err(wait) = self.tx_limit.may_go() {
                    // the chains wait in the ring until the bucket refills
                    self.counters.tx_throttled.fetch_add(1, Ordering::Relaxed);
                    self.tx_throttled = true;
                    self.arm(wait);
                    break;
                }
            }
            let chain = match self.pop(TX, &mem) {
                crate::Popped::Chain(c) => c,
                crate::Popped::Empty => break,
                crate::Popped::Broken(why) => {
                    self.bad_queue(self.queue_index(TX).into(), &why);
                    break;
                }
            };
            let head = chain.head_index();
            let mut frame = std::mem::take(&mut self.tx_buf);
            frame.clear();
            let descs = whole_chain(chain);
            let mut ok = descs.is_some();
            if !ok {
                self.bad_queue(
                    self.queue_index(TX).into(),
                    "a transmit chain that does not end (a loop, or longer than the queue)",
                );
            }
            for d in descs.into_iter().flatten() {
                let end = frame.len().checked_add(d.len() as usize);
                match end {
                    Some(end) if !d.is_write_only() && end <= MAX_FRAME => {
                        let at = frame.len();
                        frame.resize(end, 0);
                        if mem.read_slice(&mut frame[at..], d.addr()).is_err() {
                            ok = false;
                            break;
                        }
                    }
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            let mut bad_offload = false;
            if ok && frame.len() >= VNET_HDR_LEN {
                if self.acked & (F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_USO) != 0 {
                    // the header goes to the TAP as the guest wrote it,
                    // once checked (num_buffers is the receive side's)
                    frame[0] &= HDR_F_NEEDS_CSUM;
                    if let Err(why) =
                        check_tx_header(&frame[..10], frame.len() - VNET_HDR_LEN, self.acked)
                    {
                        bad_offload = true;
                        if self
                            .counters
                            .tx_dropped_bad_offload
                            .fetch_add(1, Ordering::Relaxed)
                            == 0
                        {
                            tracing::warn!(
                                "net {}: a transmitted frame's header: {why} (dropped; logged once, counted)",
                                self.tap.port_name()
                            );
                        }
                    }
                    frame[10..12].fill(0);
                } else {
                    // no offloads negotiated: the host gets a plain frame
                    frame[..10].fill(0);
                }
            }
            if bad_offload {
                // (counted above)
            } else if !ok || frame.len() < VNET_HDR_LEN {
                self.counters
                    .tx_dropped_bad_chain
                    .fetch_add(1, Ordering::Relaxed);
            } else if !self.shared.link_up.load(Ordering::Acquire) {
                self.counters
                    .dropped_link_down
                    .fetch_add(1, Ordering::Relaxed);
            } else if self.tap.write_frame(&frame).is_err() {
                self.counters
                    .tx_write_errors
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                self.tx_limit.charge((frame.len() - VNET_HDR_LEN) as u64);
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters.pair_tx_frames[self.pair].fetch_add(1, Ordering::Relaxed);
                self.counters
                    .tx_bytes
                    .fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            }
            self.tx_buf = frame;
            self.give_back(TX, head, 0);
            done = true;
        }
        if done {
            self.notify(TX);
        }
    }
}

/// Runs the worker's transmit and receive passes over fuzzed queues with
/// `port` in the TAP's place (see [`FramePort`]), until nothing moves;
/// returns (frames received, frames transmitted).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_run<M: GuestMemory + Clone + Send + Sync + 'static, P: FramePort>(
    mem: M,
    [rx, tx]: [Queue; 2],
    port: Arc<P>,
    link_up: bool,
    config: &NetConfig,
    acked: u64,
) -> (u64, u64) {
    let (interrupt, _, _) = crate::fuzzing::quiet();
    let counters = Arc::new(NetCounters::default());
    let q = |queue| ActiveQueue {
        queue,
        kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    };
    let mut w = Worker::new(
        0,
        mem,
        port,
        interrupt,
        counters.clone(),
        test_shared(link_up),
        [q(rx), q(tx)],
        [
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ],
        config,
    );
    w.acked = acked;
    for _ in 0..4 {
        w.transmit();
        w.receive();
        // as the driver's kick and the rate limiter's timer would
        w.rx_blocked = false;
        w.rx_throttled = false;
        w.tx_throttled = false;
    }
    let _ = w.into_queues();
    (
        counters.rx_frames.load(Ordering::Relaxed),
        counters.tx_frames.load(Ordering::Relaxed),
    )
}

/// A worker's shared state outside a device (the fuzzer's, the tests').
#[cfg(any(test, feature = "fuzzing"))]
fn test_shared(link_up: bool) -> Arc<Shared> {
    Arc::new(Shared {
        link_up: AtomicBool::new(link_up),
        pairs_on: AtomicU16::new(1),
        announce: AtomicBool::new(false),
        placements: Mutex::new(Vec::new()),
        attached: Mutex::new(vec![true]),
        guest_offloads: AtomicU64::new(0),
        announce_pending: AtomicBool::new(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[derive(Default)]
    struct Counted(AtomicU64);

    impl Interrupt for Counted {
        fn queue(&self, _: u16) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn config(&self) {}
    }

    /// The guest is untrusted: a transmit chain with a device-writable
    /// descriptor, one past guest memory, one shorter than the header and
    /// a loop are dropped and counted, each given back used; the good one
    /// goes to the TAP; nothing panics and the queue goes on.
    #[test]
    fn bad_transmit_chains_are_dropped_counted_and_given_back() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let d = |addr: u64, len: u32, flags: u16| {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
        };
        let write = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        vq.add_desc_chains(
            &[
                d(0x10_0000, (VNET_HDR_LEN + 60) as u32, 0),
                d(0x10_1000, 100, write),
                d(0x7fff_0000, 100, 0),
                d(0x10_2000, 4, 0),
            ],
            0,
        )
        .unwrap();
        // a loop: descriptors 4 -> 5 -> 4, NEXT set on both
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        vq.desc_table()
            .store(
                4,
                RawDescriptor::from(SplitDescriptor::new(0x10_3000, 64, next, 5)),
            )
            .unwrap();
        vq.desc_table()
            .store(
                5,
                RawDescriptor::from(SplitDescriptor::new(0x10_4000, 64, next, 4)),
            )
            .unwrap();
        vq.avail().ring().ref_at(4).unwrap().store(u16::to_le(4));
        vq.avail().idx().store(u16::to_le(5));
        let queue: Queue = vq.create_queue().unwrap();
        let name = format!("nfvut{}", std::process::id() % 100_000);
        let tap = Arc::new(Tap::open(&name).expect("a TAP (root and /dev/net/tun)"));
        let counters = Arc::new(NetCounters::default());
        let interrupt = Arc::new(Counted::default());
        let rx: Queue = Queue::new(16).unwrap();
        let mut w = Worker::new(
            0,
            mem.clone(),
            tap,
            interrupt.clone(),
            counters.clone(),
            test_shared(true),
            [
                ActiveQueue {
                    queue: rx,
                    kick: EventFd::new(0).unwrap(),
                },
                ActiveQueue {
                    queue,
                    kick: EventFd::new(0).unwrap(),
                },
            ],
            [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()],
            &NetConfig::default(),
        );
        w.transmit();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(l(&counters.tx_dropped_bad_chain), 4);
        // (the TAP is down: the good frame's write fails, counted, and the
        // queue goes on)
        assert_eq!(l(&counters.tx_frames) + l(&counters.tx_write_errors), 1);
        assert_eq!(vq.used().idx().load(), 5, "every chain given back");
        assert_eq!(
            l(&interrupt.0) + l(&counters.notifications_suppressed[TX]),
            1
        );
    }

    /// A port that is never read or written (deliver and the header checks
    /// need none).
    struct NoPort(std::fs::File);

    impl AsRawFd for NoPort {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.as_raw_fd()
        }
    }

    impl FramePort for NoPort {
        fn port_name(&self) -> &str {
            "none"
        }
        fn read_frame(&self, _: &mut [u8]) -> std::io::Result<Option<usize>> {
            Ok(None)
        }
        fn write_frame(&self, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// MRG_RXBUF: a frame spans as many chains as it needs, num_buffers
    /// says how many, the bytes run on from chain to chain; with too few
    /// chains posted the frame waits and the chains taken go back to the
    /// ring untouched, for the next frame.
    #[test]
    fn a_mergeable_frame_spans_chains_and_too_few_wait() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let write = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let bufs: Vec<RawDescriptor> = (0..4)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(0x10_0000 + i * 0x1000, 1000, write, 0))
            })
            .collect();
        vq.add_desc_chains(&bufs, 0).unwrap();
        let rx: Queue = vq.create_queue().unwrap();
        let counters = Arc::new(NetCounters::default());
        let mut w = Worker::new(
            0,
            mem.clone(),
            Arc::new(NoPort(std::fs::File::open("/dev/null").unwrap())),
            Arc::new(Counted::default()),
            counters.clone(),
            test_shared(true),
            [
                ActiveQueue {
                    queue: rx,
                    kick: EventFd::new(0).unwrap(),
                },
                ActiveQueue {
                    queue: Queue::new(16).unwrap(),
                    kick: EventFd::new(0).unwrap(),
                },
            ],
            [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()],
            &NetConfig::default(),
        );
        w.acked = F_MRG_RXBUF;
        let mut frame: Vec<u8> = (0..VNET_HDR_LEN + 2500).map(|i| i as u8).collect();
        frame[..VNET_HDR_LEN].fill(0);
        assert!(matches!(
            w.deliver(&mem, &mut frame.clone()),
            Delivery::Done
        ));
        assert_eq!(vq.used().idx().load(), 3);
        let lens: Vec<u32> = (0..3)
            .map(|i| vq.used().ring().ref_at(i).unwrap().load().len())
            .collect();
        assert_eq!(lens, [1000, 1000, 512]);
        let mut got = vec![0u8; frame.len()];
        for (i, chunk) in got.chunks_mut(1000).enumerate() {
            mem.read_slice(chunk, GuestAddress(0x10_0000 + i as u64 * 0x1000))
                .unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[VNET_HDR_LEN..], frame[VNET_HDR_LEN..]);
        // one chain left, a frame needing two: it waits, the chain stays
        let mut big = vec![0u8; VNET_HDR_LEN + 1500];
        assert!(matches!(w.deliver(&mem, &mut big), Delivery::NoBuffer));
        assert_eq!(vq.used().idx().load(), 3);
        let mut small = vec![7u8; VNET_HDR_LEN + 100];
        assert!(matches!(w.deliver(&mem, &mut small), Delivery::Done));
        assert_eq!(vq.used().idx().load(), 4);
        assert_eq!(vq.used().ring().ref_at(3).unwrap().load().len(), 112);
        assert_eq!(counters.rx_merged.load(Ordering::Relaxed), 1);
    }

    /// The guest's offload headers: what each negotiated feature allows,
    /// and the bad ones named.
    #[test]
    fn transmit_headers_are_checked_against_the_offloads_negotiated() {
        let hdr = |flags: u8, gso: u8, hdr_len: u16, size: u16, start: u16, off: u16| {
            let mut h = vec![flags, gso];
            for v in [hdr_len, size, start, off] {
                h.extend_from_slice(&v.to_le_bytes());
            }
            h
        };
        let all = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_USO;
        assert!(check_tx_header(&hdr(0, 0, 0, 0, 0, 0), 60, 0).is_ok());
        assert!(check_tx_header(&hdr(1, 0, 0, 0, 34, 16), 60, F_CSUM).is_ok());
        assert!(check_tx_header(&hdr(1, 1, 54, 1448, 34, 16), 9000, all).is_ok());
        // a short hdr_len is a hint the TAP raises, not an error
        assert!(check_tx_header(&hdr(1, 1, 0, 1448, 34, 16), 9000, all).is_ok());
        for (h, len, acked, why) in [
            (hdr(1, 0, 0, 0, 34, 16), 60, 0, "without CSUM"),
            (hdr(1, 0, 0, 0, 50, 16), 60, F_CSUM, "past the frame"),
            (
                hdr(1, 1, 54, 1448, 34, 16),
                9000,
                F_CSUM,
                "without its feature",
            ),
            (hdr(1, 3, 54, 1448, 34, 16), 9000, all, "gso_type 0x3"),
            (hdr(0, 1, 54, 1448, 34, 16), 9000, all, "without NEEDS_CSUM"),
            (hdr(1, 1, 54, 0, 34, 16), 9000, all, "gso_size 0"),
            (hdr(1, 1, 9100, 1448, 34, 16), 9000, all, "hdr_len 9100"),
            (hdr(1, 0x81, 54, 1448, 34, 16), 9000, all, "gso_type 0x81"),
        ] {
            let e = check_tx_header(&h, len, acked).unwrap_err();
            assert!(e.contains(why), "{h:?}: {e}");
        }
        assert_eq!(tun_offloads(F_GUEST_TSO4), 0, "no TSO without GUEST_CSUM");
        assert_eq!(
            tun_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_USO6),
            crate::tap::TUN_F_CSUM | crate::tap::TUN_F_TSO4,
            "tun takes USO for both IP versions or not at all"
        );
        assert_eq!(
            tun_offloads(F_GUEST_CSUM | F_GUEST_USO4 | F_GUEST_USO6),
            crate::tap::TUN_F_CSUM | crate::tap::TUN_F_USO4 | crate::tap::TUN_F_USO6
        );
        // what the TAP hands over, against what the guest has on
        let frame = |flags: u8, gso: u8| {
            let mut f = vec![0u8; 60];
            f[0] = flags;
            f[1] = gso;
            f
        };
        assert!(finished_enough(&frame(0, 0), 0));
        assert!(!finished_enough(&frame(1, 0), 0), "a partial checksum");
        assert!(finished_enough(&frame(1, 0), F_GUEST_CSUM));
        assert!(!finished_enough(&frame(1, 1), F_GUEST_CSUM), "TSO4 off");
        assert!(finished_enough(&frame(1, 1), F_GUEST_CSUM | F_GUEST_TSO4));
        assert!(finished_enough(
            &frame(1, 5),
            F_GUEST_CSUM | F_GUEST_USO4 | F_GUEST_USO6
        ));
        assert!(
            !finished_enough(&frame(1, 9), u64::MAX),
            "an unknown GSO type"
        );
        assert!(check_offload_features(F_HOST_TSO4).is_err());
        assert!(check_offload_features(F_CSUM | F_HOST_TSO4).is_ok());
        assert!(Offloads::parse("tso4").is_err());
        assert_eq!(
            Offloads::parse("csum+tso6").unwrap().features(),
            F_CSUM | F_GUEST_CSUM | F_CTRL_GUEST_OFFLOADS | F_HOST_TSO6 | F_GUEST_TSO6
        );
    }

    #[test]
    fn macs_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:zz",
            "01:00:5e:00:00:01",
            "5:54:00:12:34:56",
        ] {
            let e = parse_mac(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
