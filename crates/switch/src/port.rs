//! A switch port: a vhost-user backend (server or client socket), or a
//! TAP to reach the host's stack. Each vhost-user port has a protocol
//! thread of its own; the PMDs poll its rings.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{ShutdownHandle, VhostUserBackendMut, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::SwitchError;

/// Guest memory as a port maps it: with a dirty bitmap the frontend can
/// hand over (LOG_SHMFD) while it migrates.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap<crate::dirty_log::DirtyLog>>;
pub(crate) type Vring = VringRwLock<Mem>;

const QUEUE_SIZE: usize = 1024;
/// The crate's epoll event our listener gets (past the queues and the
/// crate's own exit event).
const GRAB_EVENT: u16 = 3;
/// VHOST_F_LOG_ALL: the frontend may ask for dirty logging.
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// What a port is.
#[derive(Debug, Clone, PartialEq)]
pub enum PortKind {
    /// A socket at `<socket-dir>/<name>.sock` the frontend connects to.
    Server,
    /// The switch connects to a frontend listening at this path, and
    /// again whenever it returns (OVS's dpdkvhostuserclient).
    Client(PathBuf),
    /// A TAP device of this name: frames to and from the host's stack.
    Tap(String),
}

/// One port as asked.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    pub name: String,
    pub kind: PortKind,
}

/// Checks a port name: 1 to 32 letters, digits, '-' or '_'.
pub fn check_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "port name {name:?}: 1 to 32 letters, digits, '-' or '_'"
        )),
    }
}

/// Parses one `NAME`, `NAME=client:PATH` or `NAME=tap:DEVICE`.
pub fn parse_port(item: &str) -> Result<PortSpec, String> {
    let (name, kind) = match item.split_once('=') {
        Some((n, c)) => {
            let kind = match c.split_once(':') {
                Some(("client", path)) if !path.is_empty() => PortKind::Client(PathBuf::from(path)),
                Some(("tap", dev)) if !dev.is_empty() && dev.len() < 16 => {
                    PortKind::Tap(dev.to_string())
                }
                _ => {
                    return Err(format!(
                        "{item:?}: NAME, NAME=client:PATH or NAME=tap:DEVICE (up to 15 characters)"
                    ))
                }
            };
            (n, kind)
        }
        None => (item, PortKind::Server),
    };
    check_port_name(name)?;
    Ok(PortSpec {
        name: name.to_string(),
        kind,
    })
}

/// A port's counters. Frames "rx" are those the port's frontend sent (the
/// switch received them), "tx" those the switch put in its receive ring.
#[derive(Debug, Default)]
pub struct PortCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames for this port dropped: no receive buffer posted (or the
    /// port not connected).
    pub drop_no_buffer: AtomicU64,
    /// Frames for this port dropped: its buffer too small or malformed.
    pub drop_bad_buffer: AtomicU64,
    /// Frames from this port dropped: a malformed chain.
    pub drop_bad_chain: AtomicU64,
    /// Frames from this port dropped: larger than the largest frame.
    pub drop_too_big: AtomicU64,
    /// Frames from this port flooded (unknown or group destination).
    pub flooded: AtomicU64,
    /// Frames from this port whose source the MAC table did not learn (the
    /// port's share of it full).
    pub learn_refused: AtomicU64,
    /// Link-local control frames from this port, not forwarded.
    pub drop_link_local: AtomicU64,
    /// Times a frontend connected.
    pub connects: AtomicU64,
    /// Times the switch cut this port's frontend off (bad descriptors).
    pub cut_off: AtomicU64,
}

impl PortCounters {
    /// The counters, by name.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("rx_frames", l(&self.rx_frames)),
            ("rx_bytes", l(&self.rx_bytes)),
            ("tx_frames", l(&self.tx_frames)),
            ("tx_bytes", l(&self.tx_bytes)),
            ("drop_no_buffer", l(&self.drop_no_buffer)),
            ("drop_bad_buffer", l(&self.drop_bad_buffer)),
            ("drop_bad_chain", l(&self.drop_bad_chain)),
            ("drop_too_big", l(&self.drop_too_big)),
            ("flooded", l(&self.flooded)),
            ("learn_refused", l(&self.learn_refused)),
            ("drop_link_local", l(&self.drop_link_local)),
            ("connects", l(&self.connects)),
            ("cut_off", l(&self.cut_off)),
        ]
    }
}

/// A port's state, shared by its protocol thread, the PMDs and the
/// control requests.
pub struct Port {
    pub name: String,
    pub kind: PortKind,
    /// The socket (server or client ports).
    pub socket: Option<PathBuf>,
    /// The PMD that polls this port's transmit side.
    pub pmd: usize,
    pub(crate) mem: Mem,
    /// The port's vrings while a frontend is connected (the PMDs' view).
    vrings: Mutex<Option<Vec<Vring>>>,
    /// Moves whenever `vrings` changes: the PMDs take them again.
    pub(crate) generation: AtomicU64,
    /// The TAP (TAP ports).
    pub(crate) tap: Option<virtio::tap::Tap>,
    /// The live connection, to cut it (removal, bad descriptors).
    shutdown: Mutex<Option<ShutdownHandle>>,
    /// Set when the port is removed: its thread ends.
    removed: AtomicBool,
    /// Set once a cut-off was logged (logged once per port).
    pub(crate) cut_logged: AtomicBool,
    /// A frontend is connected (from its connection's start to its end).
    connected: AtomicBool,
    pub counters: PortCounters,
}

impl Port {
    /// Makes a port (binding a server port's socket now, so a bad path
    /// is said at once) and starts its protocol thread.
    pub(crate) fn start(
        spec: &PortSpec,
        socket_dir: &std::path::Path,
        pmd: usize,
        stop: Arc<AtomicBool>,
    ) -> Result<Arc<Port>, SwitchError> {
        let err = |why: String| SwitchError::Port(spec.name.clone(), why);
        let (socket, tap) = match &spec.kind {
            PortKind::Server => (Some(socket_dir.join(format!("{}.sock", spec.name))), None),
            PortKind::Client(p) => (Some(p.clone()), None),
            PortKind::Tap(t) => {
                let tap = virtio::tap::Tap::open(t).map_err(|e| err(e.to_string()))?;
                // SAFETY: fcntl(2) on the TAP descriptor this port owns.
                let fl = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
                // SAFETY: as above; only O_NONBLOCK is added.
                if fl < 0
                    || unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) }
                        < 0
                {
                    return Err(err(format!("TAP {t}: {}", std::io::Error::last_os_error())));
                }
                (None, Some(tap))
            }
        };
        let port = Arc::new(Port {
            name: spec.name.clone(),
            kind: spec.kind.clone(),
            socket,
            pmd,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            vrings: Mutex::new(None),
            generation: AtomicU64::new(0),
            tap,
            shutdown: Mutex::new(None),
            removed: AtomicBool::new(false),
            cut_logged: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            counters: PortCounters::default(),
        });
        let listener = match &port.kind {
            PortKind::Server => {
                let path = port.socket.as_ref().expect("a server port has a socket");
                Some(vhost::vhost_user::Listener::from(
                    devices::unix_socket::bind_private(path)
                        .map_err(|e| err(format!("{}: {e}", path.display())))?,
                ))
            }
            _ => None,
        };
        if port.tap.is_none() {
            let p = port.clone();
            std::thread::Builder::new()
                .name(format!("switch {}", port.name))
                .spawn(move || protocol_thread(p, listener, stop))
                .map_err(|e| err(format!("its thread: {e}")))?;
        }
        Ok(port)
    }

    /// Whether a frontend is connected (a TAP port always is).
    pub fn connected(&self) -> bool {
        self.tap.is_some() || self.connected.load(Ordering::Acquire)
    }

    pub(crate) fn rings(&self) -> Option<Vec<Vring>> {
        self.vrings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Cuts the frontend's connection (it may connect again).
    pub(crate) fn cut(&self) {
        if let Some(h) = &*self.shutdown.lock().unwrap_or_else(|e| e.into_inner()) {
            h.shutdown();
        }
    }

    /// Ends the port: its connection cut, its thread ended, its socket
    /// removed.
    pub(crate) fn remove(&self) {
        self.removed.store(true, Ordering::Release);
        self.cut();
        if let (PortKind::Server, Some(path)) = (&self.kind, &self.socket) {
            // a server port's thread may wait in accept(): a connection of
            // our own wakes it to see the port is gone
            let _ = std::os::unix::net::UnixStream::connect(path);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The vhost-user device a port is: virtio-net, one queue pair, no
/// offloads, dirty logging for a migrating frontend.
struct PortBackend {
    port: Arc<Port>,
    /// The PMD's hand-over event (read once it fired).
    grab: EventFd,
}

impl VhostUserBackendMut for PortBackend {
    type Bitmap = crate::dirty_log::DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
            | VHOST_F_LOG_ALL
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// LOG_SHMFD: the frontend hands over a dirty log while it migrates,
    /// and every write the switch makes into its memory (frames, used
    /// entries) marks the page. (SEND_RARP is not offered: the `vhost`
    /// crate has no handler for it; the guest's own announce moves its
    /// address in the table.)
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD
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

    /// The daemon has put the frontend's new memory table in the atomic
    /// the port shares. Each region's file must hold what it maps: a
    /// frontend handing a file shorter than its region would have the
    /// PMD's first touch past its end raise SIGBUS and end the switch with
    /// every port on it. A table that fails is taken back and the
    /// frontend cut off. (A file shrunk later, or a hugetlbfs file whose
    /// pool runs dry, still could: that check is the kernel's, not ours.)
    fn update_memory(&mut self, mem: Mem) -> std::io::Result<()> {
        use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
        let table = mem.memory();
        for region in table.iter() {
            let Some(fo) = std::ops::Deref::deref(region).file_offset() else {
                continue;
            };
            let have = fo.file().metadata()?.len();
            let need = fo.start().checked_add(region.len());
            if need.is_none_or(|need| have < need) {
                if let Ok(m) = self.port.mem.lock() {
                    m.replace(GuestMemoryMmap::new());
                }
                self.port.cut();
                tracing::warn!(
                    "port {}: a memory region of {} bytes at offset {} of a file of {have} bytes: \
                     its frontend is cut off",
                    self.port.name,
                    region.len(),
                    fo.start()
                );
                return Err(std::io::Error::other("a memory region past its file's end"));
            }
        }
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

/// A port's protocol thread: one daemon per frontend connection (a server
/// port listens again, a client port connects again, every 200 ms, when
/// the frontend goes), its vrings handed to the PMD while it lasts.
fn protocol_thread(
    port: Arc<Port>,
    mut listener: Option<vhost::vhost_user::Listener>,
    stop: Arc<AtomicBool>,
) {
    if let Err(e) = seccomp::enter(seccomp::Role::SwitchPort) {
        tracing::error!("port {}: {e}: it serves no frontend", port.name);
        return;
    }
    let gone = || stop.load(Ordering::Acquire) || port.removed.load(Ordering::Acquire);
    while !gone() {
        if let Err(e) = one_connection(&port, listener.as_mut(), &gone) {
            tracing::debug!("port {}: {e}", port.name);
        }
        *port.shutdown.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *port.vrings.lock().unwrap_or_else(|e| e.into_inner()) = None;
        port.generation.fetch_add(1, Ordering::AcqRel);
        // the frontend's memory goes with it (its hugepages are freed
        // only when no one maps them any more)
        if let Ok(m) = port.mem.lock() {
            m.replace(GuestMemoryMmap::new());
        }
        if matches!(port.kind, PortKind::Client(_)) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One frontend's connection, from its first message to its end: a fresh
/// daemon (fresh vrings) each time.
fn one_connection(
    port: &Arc<Port>,
    listener: Option<&mut vhost::vhost_user::Listener>,
    gone: &dyn Fn() -> bool,
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
            let path = port.socket.as_ref().ok_or("no socket")?;
            let path = path.to_str().ok_or("a socket path that is not UTF-8")?;
            daemon
                .start_client(path)
                .map_err(|e| format!("connecting to {path}: {e:?}"))?;
        }
        Some(l) => {
            daemon.start(l).map_err(|e| format!("{e:?}"))?;
        }
    }
    *port.shutdown.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
    if gone() {
        // (the connection that woke a removed port's accept)
        daemon.request_shutdown();
    } else {
        port.counters.connects.fetch_add(1, Ordering::Relaxed);
        port.connected.store(true, Ordering::Release);
    }
    // (until the frontend goes, or the switch cuts it)
    let ended = daemon.wait().map_err(|e| format!("{e:?}"));
    port.connected.store(false, Ordering::Release);
    // the daemon's vring threads end with it
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    ended
}
