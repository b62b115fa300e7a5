//! virtio-net on a TAP: one receive and one transmit queue, served by a
//! worker thread that waits (epoll) on the TAP and the two queues' kick
//! eventfds, so a vCPU never waits on the network. MAC, MTU and STATUS.
//!
//! Receive: a frame read from the TAP goes into the next posted chain
//! (header first, num_buffers = 1); a frame larger than the chain is
//! dropped and counted, never truncated, and the chain stays for the next;
//! with no chain posted the worker stops reading the TAP until the driver
//! posts one. Transmit: a chain shorter than the header, larger than
//! 64 KiB + header or holding device-writable descriptors is dropped and
//! counted; a TAP write error is counted and the queue goes on.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::rate_limiter::RateLimiter;
use crate::tap::{Tap, VNET_HDR_LEN};
use crate::{whole_chain, ActiveQueue, Interrupt, VirtioDevice, WorkerThread};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Frames one receive pass takes before it looks at its other events.
const RX_BUDGET: u32 = 64;
/// The largest frame either way: 64 KiB of frame after the header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65536;

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
    /// RARPs sent for a restored or migrated guest's MAC.
    pub announces: AtomicU64,
}

/// How a NIC is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
    /// Received frames a second and bytes a second (token buckets).
    pub rx_pps: Option<u64>,
    pub rx_bw: Option<u64>,
    /// Transmitted frames a second and bytes a second.
    pub tx_pps: Option<u64>,
    pub tx_bw: Option<u64>,
}

pub struct Net<M> {
    tap: Arc<Tap>,
    config: NetConfig,
    pub counters: Arc<NetCounters>,
    link_up: Arc<AtomicBool>,
    worker: Option<WorkerThread<Vec<ActiveQueue>>>,
    /// Restored: the worker announces the MAC when it starts.
    announce: bool,
    _mem: std::marker::PhantomData<M>,
}

impl<M> Net<M> {
    pub fn new(tap: Tap, config: NetConfig) -> Self {
        Net {
            tap: Arc::new(tap),
            config,
            counters: Arc::default(),
            link_up: Arc::new(AtomicBool::new(true)),
            worker: None,
            announce: false,
            _mem: std::marker::PhantomData,
        }
    }
}

impl<M> Drop for Net<M> {
    /// The worker stops with the device: it must not outlive the VM's
    /// memory and TAP.
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
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

impl<M: GuestMemory + Clone + Send + Sync + 'static> VirtioDevice<M> for Net<M> {
    fn device_type(&self) -> u16 {
        1
    }

    fn features(&self) -> u64 {
        let mut f = crate::F_VERSION_1
            | crate::F_RING_EVENT_IDX
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS;
        if self.config.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = nic_config_space(
            &self.config.mac,
            self.link_up.load(Ordering::Acquire),
            1,
            self.config.mtu,
        );
        crate::read_config_space(&space, offset, data);
    }

    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        _acked: u64,
    ) -> Result<(), String> {
        if queues.len() != 2 {
            return Err(format!(
                "virtio-net needs its receive and transmit queues enabled ({} enabled)",
                queues.len()
            ));
        }
        let (stop, worker_stop) = crate::worker_stop_pair()?;
        let worker = Worker {
            mem,
            link_up: self.link_up.clone(),
            tap: self.tap.clone(),
            interrupt,
            counters: self.counters.clone(),
            queues: queues.into_iter().map(|q| (q.queue, q.kick)).collect(),
            stop: worker_stop,
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            rx_blocked: false,
            rx_limit: RateLimiter::new(self.config.rx_pps, self.config.rx_bw),
            tx_limit: RateLimiter::new(self.config.tx_pps, self.config.tx_bw),
            rx_throttled: false,
            tx_throttled: false,
            timer: None,
            announce: std::mem::take(&mut self.announce).then_some(self.config.mac),
        };
        self.worker = Some(WorkerThread::spawn(
            format!("net-{}", self.tap.name),
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
            .unwrap_or_default()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
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
            ("link_up", self.link_up.load(Ordering::Relaxed) as u64),
        ]
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
        Ok(self.link_up.swap(up, Ordering::AcqRel) != up)
    }

    /// The link (1 byte), the MAC (6) and the MTU (2, 0 for none): what
    /// the driver read from the configuration space, which a destination's
    /// NIC must show it again.
    fn state(&self) -> Vec<u8> {
        nic_state(
            self.link_up.load(Ordering::Acquire),
            &self.config.mac,
            self.config.mtu,
        )
    }

    fn set_state(&mut self, state: &[u8]) -> Result<(), String> {
        let link_up = check_nic_state(state, &self.config.mac, self.config.mtu)?;
        self.link_up.store(link_up, Ordering::Release);
        // the guest is somewhere new (a restore, a migration's
        // destination): the network learns where its MAC now is
        self.announce = true;
        Ok(())
    }
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
}

struct Worker<M, P = Tap> {
    mem: M,
    link_up: Arc<AtomicBool>,
    tap: Arc<P>,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<NetCounters>,
    queues: Vec<(Queue, EventFd)>,
    stop: EventFd,
    /// The length of a frame read from the TAP into `rx_buf` that found
    /// no posted chain yet.
    pending: Option<usize>,
    /// One frame each way, kept across frames (no allocation per frame).
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// No chain posted: the TAP is not read until the driver posts one.
    rx_blocked: bool,
    /// The rate limits each way, and whether one holds its way back now
    /// (until the timer fires).
    rx_limit: RateLimiter,
    tx_limit: RateLimiter,
    rx_throttled: bool,
    tx_throttled: bool,
    timer: Option<TimerFd>,
    /// Restored: announce this MAC (a RARP on the TAP) once running.
    announce: Option<[u8; 6]>,
}

const EV_TAP: u64 = 0;
const EV_RX: u64 = 1;
const EV_TX: u64 = 2;
const EV_STOP: u64 = 3;
const EV_TIMER: u64 = 4;

impl<M: GuestMemory + Clone + Send + Sync + 'static, P: FramePort> Worker<M, P> {
    fn run(mut self) -> Vec<ActiveQueue> {
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
        let ok = add(self.tap.as_raw_fd(), EV_TAP).is_ok()
            && add(self.queues[RX].1.as_raw_fd(), EV_RX).is_ok()
            && add(self.queues[TX].1.as_raw_fd(), EV_TX).is_ok()
            && add(self.stop.as_raw_fd(), EV_STOP).is_ok()
            && self
                .timer
                .as_ref()
                .is_some_and(|t| add(t.as_raw_fd(), EV_TIMER).is_ok());
        if !ok {
            tracing::error!("net {}: epoll registration failed", self.tap.port_name());
            return self.into_queues();
        }
        if let Some(mac) = self.announce.take() {
            if self.link_up.load(Ordering::Acquire) && self.tap.write_frame(&rarp(&mac)).is_ok() {
                self.counters.announces.fetch_add(1, Ordering::Relaxed);
            }
        }
        // buffers or frames the driver posted while the device was stopped
        // (a kick consumed before a pause, a restored queue)
        self.transmit();
        self.receive();
        let mut tap_watched = true;
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
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
                        let _ = self.queues[TX].1.read();
                        self.transmit();
                    }
                    EV_RX => {
                        let _ = self.queues[RX].1.read();
                        self.rx_blocked = false;
                        self.receive();
                    }
                    EV_TAP => self.receive(),
                    EV_TIMER => {
                        if let Some(t) = self.timer.as_mut() {
                            let _ = t.wait();
                        }
                        self.tx_throttled = false;
                        if self.rx_throttled {
                            self.rx_throttled = false;
                            self.rx_blocked = false;
                        }
                        self.transmit();
                        self.receive();
                    }
                    _ => {}
                }
            }
            // stop listening to the TAP while nothing can be received
            // (level-triggered: it would wake this thread in a loop)
            if self.rx_blocked == tap_watched {
                let op = if self.rx_blocked {
                    ControlOperation::Delete
                } else {
                    ControlOperation::Add
                };
                let _ = epoll.ctl(
                    op,
                    self.tap.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, EV_TAP),
                );
                tap_watched = !self.rx_blocked;
            }
        }
    }

    fn into_queues(self) -> Vec<ActiveQueue> {
        if self.pending.is_some() {
            // a frame read but not delivered: lost with the pause
            self.counters
                .rx_dropped_at_stop
                .fetch_add(1, Ordering::Relaxed);
        }
        self.queues
            .into_iter()
            .map(|(queue, kick)| ActiveQueue { queue, kick })
            .collect()
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
        match crate::signal_used(&mut self.queues[q].0, &self.mem, &*self.interrupt, q as u16) {
            Ok(crate::Signal::Sent) => {
                self.counters.notifications[q].fetch_add(1, Ordering::Relaxed);
            }
            Ok(crate::Signal::Suppressed) => {
                self.counters.notifications_suppressed[q].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.bad_queue(q, &e),
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
            if !self.link_up.load(Ordering::Acquire) {
                self.counters
                    .dropped_link_down
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mem = self.mem.clone();
            let chain = match crate::pop_chain(&mut self.queues[RX].0, &mem) {
                crate::Popped::Chain(c) => c,
                empty_or_broken => {
                    self.pending = Some(len);
                    if let crate::Popped::Broken(why) = empty_or_broken {
                        self.bad_queue(RX, &why);
                    }
                    self.rx_blocked = true;
                    break;
                }
            };
            let head = chain.head_index();
            let frame = &mut buf[..len];
            // no offloads negotiated: flags and GSO fields zero (the TAP may
            // set DATA_VALID); num_buffers = 1: one chain per frame (no
            // MRG_RXBUF)
            frame[..10].fill(0);
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            delivered = true;
            let Some(descs) = whole_chain(chain) else {
                // a chain that does not end (a loop, longer than the queue,
                // an index past the table): given back unused, the frame
                // kept for the next chain
                self.bad_queue(
                    RX,
                    "a receive chain that does not end (a loop, or longer than the queue)",
                );
                self.give_back(RX, head, 0);
                self.pending = Some(len);
                continue;
            };
            if descs.iter().any(|d| !d.is_write_only()) {
                self.bad_queue(RX, "a receive chain holds a device-readable descriptor");
                self.give_back(RX, head, 0);
                continue;
            }
            let room = descs
                .iter()
                .fold(0usize, |r, d| r.saturating_add(d.len() as usize));
            if room < len {
                // the frame is dropped; the chain is given back used empty
                // (the driver reposts it)
                self.counters
                    .rx_dropped_too_big
                    .fetch_add(1, Ordering::Relaxed);
                self.give_back(RX, head, 0);
                continue;
            }
            let mut written = 0usize;
            for d in &descs {
                if written == len {
                    break;
                }
                let n = (d.len() as usize).min(len - written);
                if mem
                    .write_slice(&frame[written..written + n], d.addr())
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            if written < len {
                self.bad_queue(RX, "a receive buffer outside guest memory");
                self.give_back(RX, head, 0);
                continue;
            }
            self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            self.counters
                .rx_bytes
                .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            self.give_back(RX, head, written as u32);
        }
        self.rx_buf = buf;
        if delivered {
            self.notify(RX);
        }
    }

    /// Puts chain `head` of queue `q` in its used ring, `len` bytes written.
    fn give_back(&mut self, q: usize, head: u16, len: u32) {
        if let Err(e) = self.queues[q].0.add_used(&self.mem, head, len) {
            self.bad_queue(q, &format!("{e:?}"));
        }
    }

    /// Chains from the transmit queue to the TAP.
    fn transmit(&mut self) {
        let mem = self.mem.clone();
        let mut done = false;
        while !self.tx_throttled {
            if self.tx_limit.is_limited() {
                if let Err(wait) = self.tx_limit.may_go() {
                    // the chains wait in the ring until the bucket refills
                    self.counters.tx_throttled.fetch_add(1, Ordering::Relaxed);
                    self.tx_throttled = true;
                    self.arm(wait);
                    break;
                }
            }
            let chain = match crate::pop_chain(&mut self.queues[TX].0, &mem) {
                crate::Popped::Chain(c) => c,
                crate::Popped::Empty => break,
                crate::Popped::Broken(why) => {
                    self.bad_queue(TX, &why);
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
                    TX,
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
            if ok && frame.len() >= VNET_HDR_LEN {
                // no offloads negotiated: the host gets a plain frame
                frame[..10].fill(0);
            }
            if !ok || frame.len() < VNET_HDR_LEN {
                self.counters
                    .tx_dropped_bad_chain
                    .fetch_add(1, Ordering::Relaxed);
            } else if !self.link_up.load(Ordering::Acquire) {
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
) -> (u64, u64) {
    let (interrupt, _, _) = crate::fuzzing::quiet();
    let counters = Arc::new(NetCounters::default());
    let mut w = Worker {
        mem,
        link_up: Arc::new(AtomicBool::new(link_up)),
        tap: port,
        interrupt,
        counters: counters.clone(),
        queues: vec![
            (rx, EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")),
            (tx, EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")),
        ],
        stop: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        pending: None,
        rx_buf: vec![0; MAX_FRAME],
        tx_buf: Vec::with_capacity(MAX_FRAME),
        rx_blocked: false,
        rx_limit: RateLimiter::new(config.rx_pps, config.rx_bw),
        tx_limit: RateLimiter::new(config.tx_pps, config.tx_bw),
        rx_throttled: false,
        tx_throttled: false,
        timer: None,
        announce: None,
    };
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
        let mut w = Worker {
            mem: mem.clone(),
            link_up: Arc::new(AtomicBool::new(true)),
            tap,
            interrupt: interrupt.clone(),
            counters: counters.clone(),
            queues: vec![
                (rx, EventFd::new(0).unwrap()),
                (queue, EventFd::new(0).unwrap()),
            ],
            stop: EventFd::new(0).unwrap(),
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            rx_blocked: false,
            rx_limit: RateLimiter::default(),
            tx_limit: RateLimiter::default(),
            rx_throttled: false,
            tx_throttled: false,
            timer: None,
            announce: None,
        };
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
