//! nfvisor switch: an L2 learning switch whose ports are vhost-user
//! backends (a VM's virtio-net, DPDK's virtio-user), forwarded by a
//! busy-polling thread (a PMD) pinned to its CPU, as a DPDK switch does.
//!
//! The vhost-user protocol of each port is the rust-vmm
//! `vhost-user-backend` crate's (its daemon, its vrings). Its epoll model
//! wakes a thread per kick, which is what a polling switch must not wait
//! for: the PMD here takes each port's vrings once (a listener of our own
//! on the crate's epoll hands them over from its `handle_event`) and polls
//! them itself, in bursts of up to [`BURST`] frames a port.
//!
//! A frame is read from the source port's transmit ring into the PMD's
//! buffer and written into each destination's receive ring: two copies
//! (the issue asks for one; a copy straight from ring to ring is the next
//! step). Frames to an unknown or group address are flooded; the MAC
//! table learns source addresses and ages them.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Frames taken from one port before the PMD looks at the next.
pub const BURST: usize = 32;
/// The virtio-net header every frame carries (VERSION_1).
const HDR: usize = 12;
/// The largest frame taken (no segmentation offloads are offered).
const MAX_FRAME: usize = 9216 + 18;
const QUEUE_SIZE: usize = 1024;
/// The crate's epoll event our listener gets (past the queues and the
/// crate's own exit event).
const GRAB_EVENT: u16 = 3;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringRwLock<Mem>;

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("--ports {0:?}: {1}")]
    Ports(String, String),
    #[error("--socket-dir {0}: {1}")]
    SocketDir(PathBuf, String),
    #[error("port {0}: {1}")]
    Port(String, String),
    #[error("--cpus: {0}")]
    Cpus(String),
}

/// One port as asked: served at `<socket-dir>/<name>.sock`, or (client)
/// connecting to a frontend that listens at `client`.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    pub name: String,
    pub client: Option<PathBuf>,
}

/// Parses `a,b,c=client:/run/x.sock`.
pub fn parse_ports(list: &str) -> Result<Vec<PortSpec>, SwitchError> {
    let bad = |why: String| SwitchError::Ports(list.to_string(), why);
    let mut ports: Vec<PortSpec> = Vec::new();
    for item in list.split(',') {
        let (name, client) = match item.split_once('=') {
            Some((n, c)) => {
                let path = c
                    .strip_prefix("client:")
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| bad(format!("{item:?}: NAME or NAME=client:PATH")))?;
                (n, Some(PathBuf::from(path)))
            }
            None => (item, None),
        };
        let ok = !name.is_empty()
            && name.len() <= 32
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(bad(format!(
                "port name {name:?}: 1 to 32 letters, digits, '-' or '_'"
            )));
        }
        if ports.iter().any(|p| p.name == name) {
            return Err(bad(format!("port {name:?} twice")));
        }
        ports.push(PortSpec {
            name: name.to_string(),
            client,
        });
    }
    if ports.len() < 2 {
        return Err(bad("a switch needs two ports at least".into()));
    }
    Ok(ports)
}

/// A port's counters.
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Frames the frontend sent (taken from its transmit ring).
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames put in the frontend's receive ring.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames for this port dropped: no receive buffer posted.
    pub drop_no_buffer: AtomicU64,
    /// Frames from this port dropped: a malformed chain, or larger than
    /// the largest frame.
    pub drop_bad_chain: AtomicU64,
    pub drop_too_big: AtomicU64,
    /// Frames from this port flooded (unknown or group destination).
    pub flooded: AtomicU64,
    /// Times a frontend connected.
    pub connects: AtomicU64,
}

/// A port's state, shared by its protocol thread and the PMD.
pub struct Port {
    pub name: String,
    pub socket: PathBuf,
    client: bool,
    mem: Mem,
    /// The port's vrings while a frontend is connected (the PMD's view).
    vrings: Mutex<Option<Vec<Vring>>>,
    /// Moves whenever `vrings` changes: the PMD takes them again.
    generation: AtomicU64,
    pub counters: PortCounters,
}

impl Port {
    fn rings(&self) -> Option<Vec<Vring>> {
        self.vrings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The vhost-user device a port is: virtio-net, one queue pair, no
/// offloads.
struct PortBackend {
    port: Arc<Port>,
    /// The PMD's hand-over event (read once it fired).
    grab: EventFd,
}

impl VhostUserBackendMut for PortBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
            | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
    }

    /// (EVENT_IDX is not offered: nothing to set)
    fn set_event_idx(&mut self, _enabled: bool) {}

    /// Each vring thread's exit event (without one the crate cannot stop
    /// its threads, and the daemon's end would wait for them for ever).
    fn exit_event(
        &self,
        _thread_index: usize,
    ) -> Option<(
        vmm_sys_util::event::EventConsumer,
        vmm_sys_util::event::EventNotifier,
    )> {
        vmm_sys_util::event::new_event_consumer_and_notifier(
            vmm_sys_util::event::EventFlag::NONBLOCK | vmm_sys_util::event::EventFlag::CLOEXEC,
        )
        .ok()
    }

    fn update_memory(
        &mut self,
        _mem: vm_memory::GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ) -> std::io::Result<()> {
        // (the daemon updates the atomic the port holds a clone of)
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if device_event == GRAB_EVENT {
            let _ = self.grab.read();
            *self.port.vrings.lock().unwrap_or_else(|e| e.into_inner()) = Some(vrings.to_vec());
            self.port.generation.fetch_add(1, Ordering::AcqRel);
        }
        // kicks: the PMD polls; nothing to do here
        Ok(())
    }
}

/// The MAC table: where each source address was last seen, and when.
#[derive(Default)]
pub struct Fdb {
    entries: HashMap<[u8; 6], (usize, Instant)>,
}

impl Fdb {
    fn learn(&mut self, mac: [u8; 6], port: usize, now: Instant) {
        if mac[0] & 1 == 0 {
            self.entries.insert(mac, (port, now));
        }
    }

    fn lookup(&self, mac: &[u8; 6], now: Instant, ageing: Duration) -> Option<usize> {
        self.entries
            .get(mac)
            .filter(|(_, seen)| now.duration_since(*seen) < ageing)
            .map(|(p, _)| *p)
    }

    /// (MAC, port index, seconds since seen), oldest entries past `ageing`
    /// dropped.
    pub fn entries(&mut self, ageing: Duration) -> Vec<([u8; 6], usize, f64)> {
        let now = Instant::now();
        self.entries
            .retain(|_, (_, seen)| now.duration_since(*seen) < ageing);
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(m, (p, seen))| (*m, *p, now.duration_since(*seen).as_secs_f64()))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }
}

/// How the switch is set up.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    pub socket_dir: PathBuf,
    pub ports: Vec<PortSpec>,
    /// The PMD's CPU, and its SCHED_FIFO priority.
    pub cpu: Option<usize>,
    pub rt_priority: Option<u8>,
    pub ageing: Duration,
}

/// A running switch.
pub struct Switch {
    pub ports: Vec<Arc<Port>>,
    pub fdb: Arc<Mutex<Fdb>>,
    stop: Arc<AtomicBool>,
    pmd: Option<std::thread::JoinHandle<()>>,
    /// Where the PMD runs (read back), and each setting's outcome.
    pub placement: Arc<Mutex<Option<PmdPlacement>>>,
    pub ageing: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PmdPlacement {
    pub tid: i32,
    pub cpus: Vec<usize>,
    pub policy: String,
    pub priority: i32,
    pub settings: Vec<(String, Result<String, String>)>,
}

impl Switch {
    /// Checks the configuration, then serves every port and starts the PMD.
    pub fn start(config: SwitchConfig) -> Result<Switch, SwitchError> {
        let dir = &config.socket_dir;
        if !dir.is_dir() {
            return Err(SwitchError::SocketDir(
                dir.clone(),
                "not a directory (create it first)".into(),
            ));
        }
        if let Some(cpu) = config.cpu {
            rt::check_cpus_exist(&[cpu]).map_err(|e| SwitchError::Cpus(e.to_string()))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = Vec::new();
        for spec in &config.ports {
            let socket = spec
                .client
                .clone()
                .unwrap_or_else(|| dir.join(format!("{}.sock", spec.name)));
            let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let port = Arc::new(Port {
                name: spec.name.clone(),
                socket,
                client: spec.client.is_some(),
                mem,
                vrings: Mutex::new(None),
                generation: AtomicU64::new(0),
                counters: PortCounters::default(),
            });
            serve_port(port.clone(), stop.clone())?;
            ports.push(port);
        }
        let fdb = Arc::new(Mutex::new(Fdb::default()));
        let placement = Arc::new(Mutex::new(None));
        let pmd = {
            let (ports, fdb, stop, placement) =
                (ports.clone(), fdb.clone(), stop.clone(), placement.clone());
            let (cpu, prio, ageing) = (config.cpu, config.rt_priority, config.ageing);
            std::thread::Builder::new()
                .name("switch-pmd".into())
                .spawn(move || {
                    *placement.lock().unwrap_or_else(|e| e.into_inner()) = Some(place(cpu, prio));
                    pmd(&ports, &fdb, &stop, ageing)
                })
                .map_err(|e| SwitchError::Cpus(format!("starting the PMD: {e}")))?
        };
        Ok(Switch {
            ports,
            fdb,
            stop,
            pmd: Some(pmd),
            placement,
            ageing: config.ageing,
        })
    }

    /// Stops the PMD and the ports.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(p) = self.pmd.take() {
            let _ = p.join();
        }
        for p in &self.ports {
            if !p.client {
                let _ = std::fs::remove_file(&p.socket);
            }
        }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pins the calling thread and makes it SCHED_FIFO as asked; reads back.
fn place(cpu: Option<usize>, prio: Option<u8>) -> PmdPlacement {
    let mut settings = Vec::new();
    if let Some(c) = cpu {
        settings.push((
            "cpu".to_string(),
            rt::pin_current_thread(&[c])
                .map(|()| format!("pinned to CPU {c}"))
                .map_err(|e| e.to_string()),
        ));
    }
    if let Some(p) = prio {
        settings.push((
            "rt-priority".to_string(),
            rt::set_current_thread_fifo(p as i32)
                .map(|()| format!("SCHED_FIFO {p}"))
                .map_err(|e| e.to_string()),
        ));
    }
    let here = rt::current_thread_sched().ok();
    PmdPlacement {
        tid: rt::current_tid(),
        cpus: here.as_ref().map(|h| h.cpus.clone()).unwrap_or_default(),
        policy: here.as_ref().map(|h| h.policy.clone()).unwrap_or_default(),
        priority: here.map(|h| h.priority).unwrap_or(0),
        settings,
    }
}

/// A port's protocol thread: one daemon per frontend connection (a server
/// port listens again, a client port connects again, every 200 ms, when
/// the frontend goes), its vrings handed to the PMD while it lasts.
fn serve_port(port: Arc<Port>, stop: Arc<AtomicBool>) -> Result<(), SwitchError> {
    // a server port's socket: 0600, replacing only a dead socket (never a
    // file or a link), bound before the thread so a bad path is said now
    let mut listener = match port.client {
        true => None,
        false => Some(vhost::vhost_user::Listener::from(
            devices::unix_socket::bind_private(&port.socket).map_err(|e| {
                SwitchError::Port(port.name.clone(), format!("{}: {e}", port.socket.display()))
            })?,
        )),
    };
    let name = format!("switch {}", port.name);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = one_connection(&port, listener.as_mut()) {
                    tracing::debug!("port {}: {e}", port.name);
                }
                *port.vrings.lock().unwrap_or_else(|e| e.into_inner()) = None;
                port.generation.fetch_add(1, Ordering::AcqRel);
                // the frontend's memory goes with it (its hugepages are
                // freed only when no one maps them any more)
                if let Ok(m) = port.mem.lock() {
                    m.replace(GuestMemoryMmap::new());
                }
                if port.client {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
        .map_err(|e| SwitchError::Port(String::new(), e.to_string()))?;
    Ok(())
}

/// One frontend's connection, from its first message to its end: a fresh
/// daemon (fresh vrings) each time.
fn one_connection(
    port: &Arc<Port>,
    listener: Option<&mut vhost::vhost_user::Listener>,
) -> Result<(), String> {
    // the PMD's own listener on the crate's epoll: fired once, it hands
    // the vrings over (their state follows the frontend's messages)
    let grab = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let backend = Arc::new(std::sync::RwLock::new(PortBackend {
        port: port.clone(),
        grab: grab.try_clone().map_err(|e| e.to_string())?,
    }));
    let mut daemon = VhostUserDaemon::new(port.name.clone(), backend, port.mem.clone())
        .map_err(|e| format!("{e:?}"))?;
    for h in daemon.get_epoll_handlers() {
        h.register_listener(grab.as_raw_fd(), EventSet::IN, GRAB_EVENT as u64)
            .map_err(|e| e.to_string())?;
    }
    grab.write(1).map_err(|e| e.to_string())?;
    match listener {
        None => {
            let path = port
                .socket
                .to_str()
                .ok_or("a socket path that is not UTF-8")?;
            daemon
                .start_client(path)
                .map_err(|e| format!("connecting to {path}: {e:?}"))?;
        }
        Some(l) => {
            daemon.start(l).map_err(|e| format!("{e:?}"))?;
        }
    }
    port.counters.connects.fetch_add(1, Ordering::Relaxed);
    // (until the frontend goes)
    let ended = daemon.wait().map_err(|e| format!("{e:?}"));
    // the daemon's vring threads end with it
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    ended
}

/// The PMD: every port's transmit ring, in bursts, over and over.
fn pmd(ports: &[Arc<Port>], fdb: &Mutex<Fdb>, stop: &AtomicBool, ageing: Duration) {
    let mut buf = vec![0u8; HDR + MAX_FRAME];
    let mut rings: Vec<Option<Vec<Vring>>> = vec![None; ports.len()];
    let mut seen = vec![u64::MAX; ports.len()];
    // the receive rings a burst put frames in: told once, after the burst
    let mut delivered = vec![false; ports.len()];
    while !stop.load(Ordering::Acquire) {
        // the vrings change only when a frontend comes or goes
        for ((r, p), g) in rings.iter_mut().zip(ports).zip(seen.iter_mut()) {
            let now = p.generation.load(Ordering::Acquire);
            if now != *g {
                *g = now;
                *r = p.rings();
            }
        }
        let mut moved = false;
        for (src, port) in ports.iter().enumerate() {
            let Some(vr) = &rings[src] else { continue };
            let mem = port.mem.memory();
            let tx = &vr[1];
            let mut taken = 0;
            while taken < BURST {
                let mut state = tx.get_mut();
                if !state.is_enabled() || !state.get_queue().ready() {
                    break;
                }
                if taken == 0 {
                    // this thread polls: the frontend need not kick (each
                    // kick would wake the crate's epoll thread, which
                    // takes CPU time from the pollers on a shared core)
                    let _ = state.disable_notification();
                }
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                let head = chain.head_index();
                let len = read_chain(chain, &*mem, &mut buf);
                let _ = state.add_used(head, 0);
                drop(state);
                taken += 1;
                let frame = match len {
                    Ok(n) if n >= HDR + 14 => &buf[HDR..n],
                    Ok(_) | Err(ChainError::Bad) => {
                        port.counters.drop_bad_chain.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(ChainError::TooBig) => {
                        port.counters.drop_too_big.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                port.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                port.counters
                    .rx_bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                let now = Instant::now();
                let dst: [u8; 6] = frame[..6].try_into().expect("6 bytes");
                let srcmac: [u8; 6] = frame[6..12].try_into().expect("6 bytes");
                let out = {
                    let mut f = fdb.lock().unwrap_or_else(|e| e.into_inner());
                    f.learn(srcmac, src, now);
                    f.lookup(&dst, now, ageing)
                };
                match out {
                    Some(d) if d == src => {}
                    Some(d) => delivered[d] |= deliver(&ports[d], rings[d].as_deref(), frame),
                    None => {
                        port.counters.flooded.fetch_add(1, Ordering::Relaxed);
                        for (d, p) in ports.iter().enumerate() {
                            if d != src {
                                delivered[d] |= deliver(p, rings[d].as_deref(), frame);
                            }
                        }
                    }
                }
            }
            if taken > 0 {
                moved = true;
                notify(tx);
                // (one notification a burst for each ring that got frames:
                // an eventfd write per frame would cost more than the frame)
                for (d, got) in delivered.iter_mut().enumerate() {
                    if std::mem::take(got) {
                        if let Some(r) = &rings[d] {
                            notify(&r[0]);
                        }
                    }
                }
            }
        }
        if !moved {
            std::hint::spin_loop();
        }
    }
}

enum ChainError {
    Bad,
    TooBig,
}

/// A transmit chain's bytes (header first) into `buf`; its length.
fn read_chain<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &impl vm_memory::GuestMemory,
    buf: &mut [u8],
) -> Result<usize, ChainError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut len = 0usize;
    let mut last_has_next = true;
    for d in chain {
        last_has_next = d.has_next();
        if d.is_write_only() {
            return Err(ChainError::Bad);
        }
        let n = d.len() as usize;
        let end = len
            .checked_add(n)
            .filter(|&e| e <= buf.len())
            .ok_or(ChainError::TooBig)?;
        mem.read_slice(&mut buf[len..end], d.addr())
            .map_err(|_| ChainError::Bad)?;
        len = end;
    }
    if last_has_next {
        // cut short: a loop, or longer than the queue
        return Err(ChainError::Bad);
    }
    Ok(len)
}

/// Puts `frame` (behind a zero virtio-net header) in `port`'s receive
/// ring; whether it used a buffer there (the caller notifies the ring).
fn deliver(port: &Port, rings: Option<&[Vring]>, frame: &[u8]) -> bool {
    let Some(rx) = rings.map(|r| &r[0]) else {
        port.counters.drop_no_buffer.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    let mem = port.mem.memory();
    let mut state = rx.get_mut();
    if !state.is_enabled() || !state.get_queue().ready() {
        port.counters.drop_no_buffer.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
        port.counters.drop_no_buffer.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    let head = chain.head_index();
    let mut hdr = [0u8; HDR];
    hdr[10] = 1; // num_buffers
    let total = HDR + frame.len();
    let mut at = 0usize;
    let mut ok = true;
    for d in chain {
        if at == total {
            break;
        }
        if !d.is_write_only() {
            ok = false;
            break;
        }
        let n = (d.len() as usize).min(total - at);
        // the header's and the frame's bytes that fall in this descriptor
        let mut written = 0;
        while written < n {
            let pos = at + written;
            let (src, room) = if pos < HDR {
                (&hdr[pos..], HDR - pos)
            } else {
                (&frame[pos - HDR..], total - pos)
            };
            let k = room.min(n - written);
            let to = d.addr().checked_add(written as u64);
            if to.is_none_or(|to| mem.write_slice(&src[..k], to).is_err()) {
                ok = false;
                break;
            }
            written += k;
        }
        if !ok {
            break;
        }
        at += n;
    }
    if !ok || at < total {
        // (a frame larger than the buffer, or a bad buffer: dropped, the
        // buffer given back empty)
        let _ = state.add_used(head, 0);
        port.counters.drop_no_buffer.fetch_add(1, Ordering::Relaxed);
    } else {
        let _ = state.add_used(head, total as u32);
        port.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
        port.counters
            .tx_bytes
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
    }
    true
}

/// Signals a ring's used entries where the driver wants to hear of them.
fn notify(vring: &Vring) {
    if vring.needs_notification().unwrap_or(true) {
        let _ = vring.signal_used_queue();
    }
}

/// A port's counters, by name.
pub fn port_counters(p: &Port) -> Vec<(&'static str, u64)> {
    let c = &p.counters;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    vec![
        ("rx_frames", l(&c.rx_frames)),
        ("rx_bytes", l(&c.rx_bytes)),
        ("tx_frames", l(&c.tx_frames)),
        ("tx_bytes", l(&c.tx_bytes)),
        ("drop_no_buffer", l(&c.drop_no_buffer)),
        ("drop_bad_chain", l(&c.drop_bad_chain)),
        ("drop_too_big", l(&c.drop_too_big)),
        ("flooded", l(&c.flooded)),
        ("connects", l(&c.connects)),
    ]
}

/// "52:54:00:12:34:56".
pub fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_parse_and_bad_ones_are_named() {
        let p = parse_ports("vnf1,vnf2,ovs=client:/run/x.sock").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].client, Some(PathBuf::from("/run/x.sock")));
        for (bad, why) in [
            ("a", "two ports at least"),
            ("a,a", "twice"),
            ("a,b/c", "port name"),
            ("a,b=server:/x", "NAME=client:PATH"),
            ("a,", "port name"),
        ] {
            let e = parse_ports(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_fdb_learns_unicast_sources_and_ages_them() {
        let mut f = Fdb::default();
        let t0 = Instant::now();
        f.learn([2, 0, 0, 0, 0, 1], 1, t0);
        f.learn([1, 0, 0x5e, 0, 0, 1], 2, t0);
        assert_eq!(
            f.lookup(&[2, 0, 0, 0, 0, 1], t0, Duration::from_secs(300)),
            Some(1)
        );
        assert_eq!(
            f.lookup(&[1, 0, 0x5e, 0, 0, 1], t0, Duration::from_secs(300)),
            None
        );
        assert_eq!(
            f.lookup(
                &[2, 0, 0, 0, 0, 1],
                t0 + Duration::from_secs(301),
                Duration::from_secs(300)
            ),
            None
        );
    }
}
