//! virtio-vsock (virtio 1.2, section 5.10) with the host side on UNIX
//! sockets: the "hybrid vsock" of Firecracker and Cloud Hypervisor, which
//! Kata Containers' runtime speaks to reach its agent. There is no
//! /dev/vhost-vsock here: the device and its connections live in a worker
//! thread of the VMM.
//!
//! Host to guest: a host process connects to the device's socket and
//! writes `CONNECT <port>\n`; the guest's listener on that port is asked
//! (REQUEST); on its RESPONSE the host reads `OK <host_port>\n` and the
//! connection is a byte stream; a port nobody listens on closes the host's
//! connection (the guest answered RST). Guest to host: a guest connection
//! to port P is a UNIX connection to `<socket>_<P>`; none there, the guest
//! gets RST.
//!
//! Credit flow control as the specification says: each connection
//! advertises BUF_ALLOC bytes of buffering here, and never holds more; a
//! guest that sends past it is reset (counted); data goes to the guest only
//! within the credit the guest advertised. Every packet is checked: a wrong
//! source or destination CID, a type other than STREAM, a length past
//! MAX_PAYLOAD or the chain: dropped or reset, counted, the VM runs on.
//! After a restore (snapshot or migration) every connection is gone and the
//! guest is sent VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, as Firecracker does.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{whole_chain, ActiveQueue, Interrupt, VirtioDevice, WorkerThread};

const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
const QUEUE_SIZE: u16 = 256;
pub const HDR_LEN: usize = 44;
/// The most one packet carries.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// Buffering here per connection (the credit the guest gets).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for rx buffers, at most.
const MAX_CONTROL: usize = 2 * QUEUE_SIZE as usize;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The longest `CONNECT <port>\n` line taken.
const MAX_CONNECT_LINE: usize = 64;
/// Host ports for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet header, as the wire has it (little-endian).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2"));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[derive(Default)]
pub struct VsockCounters {
    pub connections: AtomicU64,
    pub host_connects: AtomicU64,
    pub guest_connects: AtomicU64,
    pub refused: AtomicU64,
    pub bytes_to_guest: AtomicU64,
    pub bytes_to_host: AtomicU64,
    pub resets: AtomicU64,
    /// Guests that sent past their credit (each connection reset).
    pub credit_overruns: AtomicU64,
    /// Packets dropped: a wrong CID, a short or oversized packet, a bad
    /// chain.
    pub bad_packets: AtomicU64,
    pub transport_resets: AtomicU64,
}

/// The host side's socket: bound when the device is made (a missing
/// directory or a path another VMM serves is refused at start).
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(format!(
                "vsock socket {shown}: the directory {} does not exist",
                dir.display()
            ));
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!(
                "vsock socket {shown}: something that is not a socket is there (not removed)"
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "vsock socket {shown} is in use (another VM serves it)"
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("vsock socket {shown}: removing the stale socket: {e}"))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("vsock socket {shown}: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("vsock socket {shown}: {e}"))?;
    Ok(l)
}

/// One connection, keyed by (host port, guest port).
struct Conn {
    stream: UnixStream,
    /// Host-initiated and not answered yet (the guest's RESPONSE).
    connecting: bool,
    /// Host-initiated: the `CONNECT` line is still being read (no packet
    /// sent yet).
    handshake: Option<Vec<u8>>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes received from the guest and written to the host.
    fwd_cnt: u32,
    /// fwd_cnt as the guest last heard it.
    fwd_cnt_told: u32,
    /// From the guest, not yet written to the host.
    to_host: VecDeque<u8>,
    /// The host's stream may have data (edge-triggered).
    host_readable: bool,
    host_eof: bool,
    /// The guest said it sends no more.
    guest_done_sending: bool,
    /// The guest closed (SHUTDOWN both ways): the connection ends (RST)
    /// once what it sent reached the host.
    closing: bool,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            connecting: false,
            handshake: None,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            to_host: VecDeque::new(),
            host_readable: true,
            host_eof: false,
            guest_done_sending: false,
            closing: false,
        }
    }

    /// Bytes the guest can still take.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn live(&self) -> bool {
        !self.connecting && self.handshake.is_none()
    }
}

/// What a stopped worker hands back: its queues and its connections.
type Stopped = (Vec<ActiveQueue>, Muxer);

/// The connections, kept across pauses (a restore drops them).
#[derive(Default)]
struct Muxer {
    conns: BTreeMap<(u32, u32), Conn>,
    /// epoll tokens of streams: token -> key.
    tokens: BTreeMap<u64, (u32, u32)>,
    next_token: u64,
    next_local_port: u32,
    /// Control packets waiting for an rx buffer.
    control: VecDeque<Header>,
    /// Where the round-robin over connections is.
    rr: Option<(u32, u32)>,
}

pub struct Vsock<M> {
    cid: u64,
    socket: PathBuf,
    listener: Arc<UnixListener>,
    pub counters: Arc<VsockCounters>,
    muxer: Option<Muxer>,
    /// A restore happened: the guest is told its connections are gone.
    reset_pending: bool,
    worker: Option<WorkerThread<Stopped>>,
    _mem: std::marker::PhantomData<M>,
}

impl<M> Vsock<M> {
    /// A device for guest CID `cid` (3 or more) served on `socket`.
    pub fn new(cid: u64, socket: &Path) -> Result<Self, String> {
        if cid < 3 || cid > u32::MAX as u64 {
            return Err(format!(
                "cid {cid}: from 3 to {} (0-2 are reserved: 2 is the host)",
                u32::MAX
            ));
        }
        let listener = bind(socket)?;
        Ok(Vsock {
            cid,
            socket: socket.to_path_buf(),
            listener: Arc::new(listener),
            counters: Arc::default(),
            muxer: Some(Muxer::default()),
            reset_pending: false,
            worker: None,
            _mem: std::marker::PhantomData,
        })
    }

    fn stop_worker(&mut self) -> Vec<ActiveQueue> {
        match self.worker.take().and_then(WorkerThread::stop) {
            Some((queues, muxer)) => {
                self.muxer = Some(muxer);
                queues
            }
            None => Vec::new(),
        }
    }
}

impl<M> Drop for Vsock<M> {
    fn drop(&mut self) {
        self.stop_worker();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl<M: GuestMemory + Clone + Send + Sync + 'static> VirtioDevice<M> for Vsock<M> {
    fn device_type(&self) -> u16 {
        19
    }

    fn features(&self) -> u64 {
        // VIRTIO_VSOCK_F_STREAM (bit 0)
        crate::F_VERSION_1 | crate::F_RING_EVENT_IDX | 1
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    /// guest_cid (u64).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.cid.to_le_bytes();
        crate::read_config_space(&space, offset, data);
    }

    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        _acked: u64,
    ) -> Result<(), String> {
        if queues.len() != 3 {
            return Err(format!(
                "virtio-vsock needs its rx, tx and event queues enabled ({} enabled)",
                queues.len()
            ));
        }
        let (stop, worker_stop) = crate::worker_stop_pair()?;
        let worker = Worker {
            cid: self.cid,
            socket: self.socket.clone(),
            mem,
            interrupt,
            counters: self.counters.clone(),
            queues: queues.into_iter().map(|q| (q.queue, q.kick)).collect(),
            stop: worker_stop,
            listener: self.listener.clone(),
            muxer: self.muxer.take().unwrap_or_default(),
            reset_pending: std::mem::take(&mut self.reset_pending),
            buf: vec![0; MAX_PAYLOAD as usize],
            rx_blocked: false,
            tx_held: false,
            epoll: None,
        };
        self.worker = Some(WorkerThread::spawn(
            "vsock".into(),
            seccomp::Role::DeviceWorker,
            stop,
            move || worker.run(),
        )?);
        Ok(())
    }

    fn reset(&mut self) -> Vec<ActiveQueue> {
        self.stop_worker()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("connections", l(&c.connections)),
            ("host_connects", l(&c.host_connects)),
            ("guest_connects", l(&c.guest_connects)),
            ("refused", l(&c.refused)),
            ("bytes_to_guest", l(&c.bytes_to_guest)),
            ("bytes_to_host", l(&c.bytes_to_host)),
            ("resets", l(&c.resets)),
            ("credit_overruns", l(&c.credit_overruns)),
            ("bad_packets", l(&c.bad_packets)),
            ("transport_resets", l(&c.transport_resets)),
        ]
    }

    /// The guest's CID (8 bytes).
    fn state(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }

    /// A restored device's connections are gone (their host ends are
    /// elsewhere): the guest is told by TRANSPORT_RESET when it runs.
    fn set_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.len() != 8 {
            return Err(format!(
                "virtio-vsock state of {} bytes (8 expected)",
                state.len()
            ));
        }
        self.muxer = Some(Muxer::default());
        self.reset_pending = true;
        Ok(())
    }
}

struct Worker<M> {
    cid: u64,
    socket: PathBuf,
    mem: M,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<VsockCounters>,
    queues: Vec<(Queue, EventFd)>,
    stop: EventFd,
    listener: Arc<UnixListener>,
    muxer: Muxer,
    reset_pending: bool,
    buf: Vec<u8>,
    /// No rx buffer posted: data waits until the guest posts one.
    rx_blocked: bool,
    /// Transmit chains wait: the control queue is full.
    tx_held: bool,
    epoll: Option<Epoll>,
}

const EV_RX: u64 = 0;
const EV_TX: u64 = 1;
const EV_EVT: u64 = 2;
const EV_STOP: u64 = 3;
const EV_LISTEN: u64 = 4;
/// Stream tokens start here.
const EV_STREAM0: u64 = 16;

impl<M: GuestMemory + Clone + Send + Sync + 'static> Worker<M> {
    fn run(mut self) -> (Vec<ActiveQueue>, Muxer) {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("vsock: epoll: {e}; the device stops");
                return self.finish();
            }
        };
        let add = |fd: i32, d: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, d))
        };
        if add(self.queues[RX].1.as_raw_fd(), EV_RX).is_err()
            || add(self.queues[TX].1.as_raw_fd(), EV_TX).is_err()
            || add(self.queues[EVT].1.as_raw_fd(), EV_EVT).is_err()
            || add(self.stop.as_raw_fd(), EV_STOP).is_err()
            || add(self.listener.as_raw_fd(), EV_LISTEN).is_err()
        {
            tracing::error!("vsock: epoll registration failed; the device stops");
            return self.finish();
        }
        // the connections kept across a pause watch their streams again
        let tokens: Vec<(u64, (u32, u32))> =
            self.muxer.tokens.iter().map(|(t, k)| (*t, *k)).collect();
        self.epoll = Some(epoll);
        for (t, k) in tokens {
            if let Some(c) = self.muxer.conns.get(&k) {
                self.watch(c.stream.as_raw_fd(), t, ControlOperation::Add);
            }
        }
        if self.reset_pending {
            self.send_transport_reset();
        }
        self.process_tx();
        self.deliver();
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.as_ref().expect("set").wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll_wait: {e}; the device stops");
                    return self.finish();
                }
            };
            let batch: Vec<EpollEvent> = events[..n].to_vec();
            for ev in batch {
                match ev.data() {
                    EV_STOP => return self.finish(),
                    EV_RX => {
                        let _ = self.queues[RX].1.read();
                        self.rx_blocked = false;
                    }
                    EV_TX => {
                        let _ = self.queues[TX].1.read();
                        self.process_tx();
                    }
                    EV_EVT => {
                        let _ = self.queues[EVT].1.read();
                        if self.reset_pending {
                            self.send_transport_reset();
                        }
                    }
                    EV_LISTEN => self.accept(),
                    t => self.stream_event(t, ev.event_set()),
                }
            }
            self.deliver();
            if self.tx_held && self.muxer.control.len() < MAX_CONTROL {
                self.process_tx();
                self.deliver();
            }
        }
    }

    fn finish(mut self) -> (Vec<ActiveQueue>, Muxer) {
        // (the streams are watched again by the next worker's epoll)
        if let Some(epoll) = self.epoll.take() {
            drop(epoll);
        }
        let queues = self
            .queues
            .drain(..)
            .map(|(queue, kick)| ActiveQueue { queue, kick })
            .collect();
        (queues, std::mem::take(&mut self.muxer))
    }

    fn watch(&self, fd: i32, token: u64, op: ControlOperation) {
        if let Some(e) = &self.epoll {
            let events =
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
            let _ = e.ctl(op, fd, EpollEvent::new(events, token));
        }
    }

    fn notify(&mut self, q: usize) {
        if crate::signal_used(&mut self.queues[q].0, &self.mem, &*self.interrupt, q as u16).is_err()
        {
            self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A packet to the guest about connection `key` (host port, guest
    /// port), with this end's credit.
    fn header(&self, key: (u32, u32), op: u16, flags: u32, len: u32) -> Header {
        let fwd = self.muxer.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: fwd,
        }
    }

    fn queue_control(&mut self, h: Header) {
        if let Some(c) = self.muxer.conns.get_mut(&(h.src_port, h.dst_port)) {
            c.fwd_cnt_told = h.fwd_cnt;
        }
        self.muxer.control.push_back(h);
    }

    /// Ends a connection: its stream closed, the guest told by RST when
    /// `tell`.
    fn close(&mut self, key: (u32, u32), tell: bool) {
        if let Some(c) = self.muxer.conns.remove(&key) {
            if let Some(e) = &self.epoll {
                let _ = e.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.muxer.tokens.retain(|_, k| *k != key);
            let handshake_only = c.handshake.is_some();
            drop(c);
            if tell && !handshake_only {
                let h = self.header(key, OP_RST, 0, 0);
                self.muxer.control.push_back(h);
            }
        }
    }

    fn add_conn(&mut self, key: (u32, u32), conn: Conn) {
        let token = EV_STREAM0 + self.muxer.next_token;
        self.muxer.next_token += 1;
        let fd = conn.stream.as_raw_fd();
        self.muxer.conns.insert(key, conn);
        self.muxer.tokens.insert(token, key);
        self.watch(fd, token, ControlOperation::Add);
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A host process connected to the socket: it is to say `CONNECT`.
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(_) => return,
            };
            if self.muxer.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            // a provisional key until the port is known (host ports of
            // host-initiated connections are unique)
            let local = self.local_port();
            let mut c = Conn::new(stream);
            c.handshake = Some(Vec::new());
            self.add_conn((local, u32::MAX), c);
            self.stream_ready((local, u32::MAX));
        }
    }

    /// A free host port for a host-initiated connection.
    fn local_port(&mut self) -> u32 {
        loop {
            let p = FIRST_LOCAL_PORT.wrapping_add(self.muxer.next_local_port);
            self.muxer.next_local_port = self.muxer.next_local_port.wrapping_add(1) % (1 << 29);
            if !self.muxer.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    fn stream_event(&mut self, token: u64, events: EventSet) {
        let Some(&key) = self.muxer.tokens.get(&token) else {
            return;
        };
        if let Some(c) = self.muxer.conns.get_mut(&key) {
            if events.contains(EventSet::IN) || events.contains(EventSet::READ_HANG_UP) {
                c.host_readable = true;
            }
        }
        self.stream_ready(key);
    }

    /// Moves what can move on connection `key`: the handshake, bytes to the
    /// host.
    fn stream_ready(&mut self, key: (u32, u32)) {
        let Some(c) = self.muxer.conns.get_mut(&key) else {
            return;
        };
        if let Some(line) = &mut c.handshake {
            // read the CONNECT line byte by byte (nothing past it may be
            // taken before the guest accepted)
            let mut b = [0u8; 1];
            loop {
                match c.stream.read(&mut b) {
                    Ok(0) => {
                        self.close(key, false);
                        return;
                    }
                    Ok(_) if b[0] == b'\n' => break,
                    Ok(_) if line.len() < MAX_CONNECT_LINE => line.push(b[0]),
                    Ok(_) => {
                        self.close(key, false);
                        return;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(_) => {
                        self.close(key, false);
                        return;
                    }
                }
            }
            let text = String::from_utf8_lossy(line).to_string();
            let port = text
                .strip_prefix("CONNECT ")
                .and_then(|p| p.trim().parse::<u32>().ok());
            let Some(port) = port else {
                let _ = c.stream.write_all(b"ERROR expected CONNECT <port>\n");
                self.close(key, false);
                return;
            };
            // the connection's real key: (host port, guest port)
            let Some(mut conn) = self.muxer.conns.remove(&key) else {
                return;
            };
            self.muxer.tokens.retain(|_, k| *k != key);
            if let Some(e) = &self.epoll {
                let _ = e.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.counters.connections.fetch_sub(1, Ordering::Relaxed);
            let new_key = (key.0, port);
            conn.handshake = None;
            conn.connecting = true;
            conn.host_readable = false;
            self.add_conn(new_key, conn);
            self.counters.host_connects.fetch_add(1, Ordering::Relaxed);
            let h = self.header(new_key, OP_REQUEST, 0, 0);
            self.queue_control(h);
            return;
        }
        self.flush_to_host(key);
    }

    /// Writes what the guest sent to the host; tells the guest its credit
    /// when half its buffer was taken.
    fn flush_to_host(&mut self, key: (u32, u32)) {
        let Some(c) = self.muxer.conns.get_mut(&key) else {
            return;
        };
        let mut wrote = 0u32;
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    wrote += n as u32;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // the host end went away
                    self.counters.resets.fetch_add(1, Ordering::Relaxed);
                    self.close(key, true);
                    return;
                }
            }
        }
        c.fwd_cnt = c.fwd_cnt.wrapping_add(wrote);
        self.counters
            .bytes_to_host
            .fetch_add(wrote as u64, Ordering::Relaxed);
        let done = c.guest_done_sending && c.to_host.is_empty();
        let closed = c.closing && c.to_host.is_empty();
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 2 && !closed {
            let h = self.header(key, OP_CREDIT_UPDATE, 0, 0);
            self.queue_control(h);
        }
        if closed {
            self.close(key, true);
        } else if done {
            let _ = self.muxer.conns[&key]
                .stream
                .shutdown(std::net::Shutdown::Write);
        }
    }

    /// Packets from the guest; held while the control packets waiting for
    /// the guest's rx buffers are at MAX_CONTROL (a guest that sends and
    /// never receives does not grow this process).
    fn process_tx(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            if self.muxer.control.len() >= MAX_CONTROL {
                self.tx_held = true;
                break;
            }
            self.tx_held = false;
            let chain = match crate::pop_chain(&mut self.queues[TX].0, &mem) {
                crate::Popped::Chain(c) => c,
                crate::Popped::Empty => break,
                crate::Popped::Broken(_) => {
                    self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            let head = chain.head_index();
            if let Some((h, len)) = self.read_packet(chain) {
                self.handle_packet(h, len);
            }
            if self.queues[TX].0.add_used(&mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        if used {
            self.notify(TX);
        }
    }

    /// A packet's header and payload (into `buf`), or None (counted) when
    /// the chain is not one.
    fn read_packet(&mut self, chain: virtio_queue::DescriptorChain<&M>) -> Option<(Header, usize)> {
        let bad = |c: &VsockCounters| {
            c.bad_packets.fetch_add(1, Ordering::Relaxed);
            None
        };
        let Some(descs) = whole_chain(chain) else {
            return bad(&self.counters);
        };
        let mut hdr = [0u8; HDR_LEN];
        let mut got = 0usize;
        let mut payload = 0usize;
        let mut want: Option<usize> = None;
        for d in &descs {
            if d.is_write_only() {
                return bad(&self.counters);
            }
            let mut at = d.addr();
            let mut left = d.len() as usize;
            if got < HDR_LEN {
                let n = left.min(HDR_LEN - got);
                if self.mem.read_slice(&mut hdr[got..got + n], at).is_err() {
                    return bad(&self.counters);
                }
                got += n;
                left -= n;
                at = at.checked_add(n as u64)?;
                if got == HDR_LEN {
                    let h = Header::decode(&hdr);
                    if h.len > MAX_PAYLOAD {
                        return bad(&self.counters);
                    }
                    want = Some(h.len as usize);
                }
            }
            if let Some(w) = want {
                let n = left.min(w - payload);
                if n > 0 {
                    if self
                        .mem
                        .read_slice(&mut self.buf[payload..payload + n], at)
                        .is_err()
                    {
                        return bad(&self.counters);
                    }
                    payload += n;
                }
            }
        }
        match want {
            Some(w) if payload == w => Some((Header::decode(&hdr), w)),
            _ => bad(&self.counters),
        }
    }

    fn handle_packet(&mut self, h: Header, len: usize) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.kind != TYPE_STREAM {
            self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
            if h.op != OP_RST {
                let r = self.header(key, OP_RST, 0, 0);
                self.muxer.control.push_back(r);
            }
            return;
        }
        if let Some(c) = self.muxer.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        let exists = self.muxer.conns.contains_key(&key);
        match h.op {
            OP_REQUEST if !exists => self.guest_connect(key, &h),
            OP_REQUEST => self.close(key, true),
            OP_RESPONSE => {
                let Some(c) = self.muxer.conns.get_mut(&key).filter(|c| c.connecting) else {
                    let r = self.header(key, OP_RST, 0, 0);
                    self.muxer.control.push_back(r);
                    return;
                };
                c.connecting = false;
                c.host_readable = true;
                let _ = c.stream.write_all(format!("OK {}\n", key.0).as_bytes());
            }
            OP_RW if exists => {
                let c = self.muxer.conns.get_mut(&key).expect("exists");
                if !c.live() {
                    self.close(key, true);
                    return;
                }
                if c.to_host.len() + len > BUF_ALLOC as usize {
                    // past the credit this end gave it
                    self.counters
                        .credit_overruns
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters.resets.fetch_add(1, Ordering::Relaxed);
                    self.close(key, true);
                    return;
                }
                c.to_host.extend(&self.buf[..len]);
                self.flush_to_host(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST if exists => {
                let u = self.header(key, OP_CREDIT_UPDATE, 0, 0);
                self.queue_control(u);
            }
            OP_SHUTDOWN if exists => {
                let c = self.muxer.conns.get_mut(&key).expect("exists");
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done_sending = true;
                }
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == (SHUTDOWN_RCV | SHUTDOWN_SEND) {
                    // the guest closed its socket: what it sent goes out
                    // first, then the connection ends (RST finishes its
                    // close)
                    c.closing = true;
                }
                self.flush_to_host(key);
            }
            OP_RST => {
                if exists {
                    self.counters.resets.fetch_add(1, Ordering::Relaxed);
                    let refused = self.muxer.conns.get(&key).is_some_and(|c| c.connecting);
                    if refused {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.close(key, false);
            }
            _ if !exists => {
                let r = self.header(key, OP_RST, 0, 0);
                self.muxer.control.push_back(r);
            }
            _ => {}
        }
    }

    /// The guest connects to host port `key.0`: `<socket>_<port>`.
    fn guest_connect(&mut self, key: (u32, u32), req: &Header) {
        let path = PathBuf::from(format!("{}_{}", self.socket.display(), key.0));
        let stream = if self.muxer.conns.len() >= MAX_CONNECTIONS {
            None
        } else {
            connect_nonblocking(&path)
        };
        let Some(stream) = stream else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            let r = self.header(key, OP_RST, 0, 0);
            self.muxer.control.push_back(r);
            return;
        };
        self.counters.guest_connects.fetch_add(1, Ordering::Relaxed);
        let mut conn = Conn::new(stream);
        // the guest's credit comes with its REQUEST
        conn.peer_buf_alloc = req.buf_alloc;
        conn.peer_fwd_cnt = req.fwd_cnt;
        self.add_conn(key, conn);
        let h = self.header(key, OP_RESPONSE, 0, 0);
        self.queue_control(h);
    }

    /// Writes `parts` into a device-writable chain; the bytes written.
    fn write_chain(
        &self,
        descs: &[virtio_queue::desc::split::Descriptor],
        parts: &[&[u8]],
    ) -> Option<u32> {
        let mut total = 0u32;
        let mut di = 0;
        let mut off = 0u32;
        for part in parts {
            let mut p = *part;
            while !p.is_empty() {
                let d = descs.get(di)?;
                let room = d.len() - off;
                if room == 0 {
                    di += 1;
                    off = 0;
                    continue;
                }
                let n = (room as usize).min(p.len());
                self.mem
                    .write_slice(&p[..n], d.addr().checked_add(off as u64)?)
                    .ok()?;
                off += n as u32;
                total += n as u32;
                p = &p[n..];
            }
        }
        Some(total)
    }

    /// Fills the guest's rx buffers: control packets first, then data
    /// from the host streams within each connection's credit.
    fn deliver(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        while !self.rx_blocked {
            let control = self.muxer.control.front().copied();
            let data_key = if control.is_none() {
                self.next_data_conn()
            } else {
                None
            };
            if control.is_none() && data_key.is_none() {
                break;
            }
            let chain = match crate::pop_chain(&mut self.queues[RX].0, &mem) {
                crate::Popped::Chain(c) => c,
                empty_or_broken => {
                    if let crate::Popped::Broken(_) = empty_or_broken {
                        self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                    }
                    self.rx_blocked = true;
                    break;
                }
            };
            let head = chain.head_index();
            let Some(descs) = whole_chain(chain).filter(|d| d.iter().all(|d| d.is_write_only()))
            else {
                self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                let _ = self.queues[RX].0.add_used(&mem, head, 0);
                used = true;
                continue;
            };
            let room: u64 = descs.iter().map(|d| d.len() as u64).sum();
            if room < HDR_LEN as u64 {
                self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                let _ = self.queues[RX].0.add_used(&mem, head, 0);
                used = true;
                continue;
            }
            if control.is_none() && room == HDR_LEN as u64 {
                // a header-only buffer carries control packets, not data:
                // data waits for a larger one
                self.queues[RX].0.go_to_previous_position();
                self.rx_blocked = true;
                break;
            }
            let written = if let Some(h) = control {
                self.muxer.control.pop_front();
                match self.write_chain(&descs, &[&h.encode()]) {
                    Some(n) => Some(n),
                    None => {
                        // not guest memory: the packet is lost, counted
                        self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                        Some(0)
                    }
                }
            } else {
                let key = data_key.expect("a connection with data");
                match self.read_data(key, (room - HDR_LEN as u64).min(MAX_PAYLOAD as u64) as u32) {
                    Some(h) => {
                        let n = h.len as usize;
                        match self.write_chain(&descs, &[&h.encode(), &self.buf[..n]]) {
                            Some(w) => Some(w),
                            None => {
                                // the bytes read are lost with the buffer:
                                // the connection cannot go on
                                self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                                self.close(key, true);
                                Some(0)
                            }
                        }
                    }
                    None => None,
                }
            };
            match written {
                Some(n) => {
                    let _ = self.queues[RX].0.add_used(&mem, head, n);
                    used = true;
                }
                // nothing to send after all: the buffer goes back
                None => self.queues[RX].0.go_to_previous_position(),
            }
        }
        if used {
            self.notify(RX);
        }
    }

    /// The next connection (round-robin) with host data and credit.
    fn next_data_conn(&self) -> Option<(u32, u32)> {
        let ready = |c: &Conn| c.live() && c.host_readable && !c.host_eof && c.credit() > 0;
        let after = self.muxer.rr;
        let mut first = None;
        for (k, c) in &self.muxer.conns {
            if !ready(c) {
                continue;
            }
            if first.is_none() {
                first = Some(*k);
            }
            if after.is_none_or(|a| *k > a) {
                return Some(*k);
            }
        }
        first
    }

    /// Reads up to `max` bytes of connection `key`'s host stream into
    /// `buf` (within its credit): an RW header, or a SHUTDOWN at the
    /// host's end of stream, or None when nothing was there.
    fn read_data(&mut self, key: (u32, u32), max: u32) -> Option<Header> {
        self.muxer.rr = Some(key);
        let c = self.muxer.conns.get_mut(&key)?;
        let n = max.min(c.credit()) as usize;
        match c.stream.read(&mut self.buf[..n]) {
            Ok(0) => {
                c.host_eof = true;
                // the host sends no more (it may still read)
                Some(self.header(key, OP_SHUTDOWN, SHUTDOWN_SEND, 0))
            }
            Ok(k) => {
                c.tx_cnt = c.tx_cnt.wrapping_add(k as u32);
                self.counters
                    .bytes_to_guest
                    .fetch_add(k as u64, Ordering::Relaxed);
                let h = self.header(key, OP_RW, 0, k as u32);
                if let Some(c) = self.muxer.conns.get_mut(&key) {
                    c.fwd_cnt_told = h.fwd_cnt;
                }
                Some(h)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.host_readable = false;
                None
            }
            Err(_) => {
                self.close(key, true);
                None
            }
        }
    }

    /// Tells the guest every connection is gone.
    fn send_transport_reset(&mut self) {
        let mem = self.mem.clone();
        let Some(chain) = self.queues[EVT].0.pop_descriptor_chain(&mem) else {
            // the driver has not posted an event buffer yet: told when it
            // does (EV_EVT)
            return;
        };
        let head = chain.head_index();
        let written = whole_chain(chain)
            .filter(|d| d.iter().all(|d| d.is_write_only()))
            .and_then(|descs| self.write_chain(&descs, &[&EVENT_TRANSPORT_RESET.to_le_bytes()]))
            .unwrap_or(0);
        let _ = self.queues[EVT].0.add_used(&mem, head, written);
        self.reset_pending = false;
        self.counters
            .transport_resets
            .fetch_add(1, Ordering::Relaxed);
        self.notify(EVT);
    }
}

/// Runs the worker over fuzzed queues: transmit chains handled, receive
/// buffers filled, until nothing moves.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_run<M: GuestMemory + Clone + Send + Sync + 'static>(
    mem: M,
    queues: [Queue; 3],
    listener: Arc<UnixListener>,
) {
    let _one = crate::fuzzing::VSOCK_LOCK
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (interrupt, _, _) = crate::fuzzing::quiet();
    let mut w = Worker {
        cid: 3,
        socket: std::env::temp_dir().join(format!("nfv-fuzz-vsock-{}.sock", std::process::id())),
        mem,
        interrupt,
        counters: Arc::default(),
        queues: queues
            .into_iter()
            .map(|q| (q, EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")))
            .collect(),
        stop: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        listener,
        muxer: Muxer::default(),
        reset_pending: true,
        buf: vec![0; MAX_PAYLOAD as usize],
        rx_blocked: false,
        tx_held: false,
        epoll: Epoll::new().ok(),
    };
    w.send_transport_reset();
    for _ in 0..4 {
        w.process_tx();
        w.deliver();
        w.rx_blocked = false;
    }
    assert!(
        w.muxer.control.len() <= MAX_CONTROL + 2,
        "control packets grew to {}",
        w.muxer.control.len()
    );
}

/// A UNIX connection that never waits: a listener whose backlog is full
/// refuses (the device worker must not block on a host process).
fn connect_nonblocking(path: &Path) -> Option<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un and the length says so.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    // (a UNIX connect completes at once or fails: EAGAIN is a full backlog)
    (r == 0).then_some(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 1 << 30,
            len: 4096,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 77,
        };
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn bad_cids_and_paths_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("nfv-vsock-ut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let e = Vsock::<()>::new(2, &sock).err().unwrap();
        assert!(e.contains("cid 2"), "{e}");
        let e = Vsock::<()>::new(3, &dir.join("missing/v.sock"))
            .err()
            .unwrap();
        assert!(e.contains("does not exist"), "{e}");
        let first = Vsock::<()>::new(3, &sock).unwrap();
        let e = Vsock::<()>::new(4, &sock).err().unwrap();
        assert!(e.contains("in use"), "{e}");
        drop(first);
        assert!(!sock.exists(), "the socket goes with the device");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
