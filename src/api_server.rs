//! The REST API on a UNIX socket: Cloud Hypervisor's (release v53.0's
//! `cloud-hypervisor.yaml`: its routes, methods, bodies and status codes),
//! so Kata Containers and other Cloud Hypervisor clients drive nfvisor as
//! they drive it. `nfvisor run --api-socket PATH` alone starts an empty VMM
//! that waits for `vm.create` and `vm.boot`; with a VM's flags it boots
//! that VM and serves the API for it.
//!
//! Requests on a running VM are the typed requests every frontend uses
//! (`vmm::api::Request`: pause, resume, snapshot, migrate, status); the
//! VMM's own life (create, boot, shutdown, delete, restore, receive) is
//! kept here. Answers are Cloud Hypervisor's: 204 or 200 with JSON, errors
//! as a JSON array of strings (the error and its causes), 404 when no VM
//! was created, 500 for a request the VM's state refuses, 400 for a body
//! that does not parse or a method the route does not take.
//!
//! The socket is 0600 and a peer of another user is refused (SO_PEERCRED);
//! at most `MAX_CONNECTIONS` clients at once; a connection idle for
//! `IDLE` is closed, a request that stalls half-sent for `STALL` answered
//! 408 and closed. The VM never waits on a client.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use vmm::api::Request as VmRequest;
use vmm::vm_handle::{RunState, VmHandle};

use ch_api::config::{ChVmConfig, Console, DiskConfig, NetConfig, TapFrom};
use ch_api::http::{Conn, ReadError};

pub const MAX_CONNECTIONS: usize = 16;
pub const IDLE: Duration = Duration::from_secs(60);
pub const STALL: Duration = Duration::from_secs(5);

/// The routes, as Cloud Hypervisor v53.0's yaml lists them, and
/// nfvisor's own `GET /api/v1/metrics`. docs/openapi.json describes the
/// same set (a test holds them together).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/vmm.ping"),
    ("PUT", "/api/v1/vmm.shutdown"),
    ("GET", "/api/v1/vm.info"),
    ("GET", "/api/v1/vm.counters"),
    ("PUT", "/api/v1/vm.create"),
    ("PUT", "/api/v1/vm.delete"),
    ("PUT", "/api/v1/vm.boot"),
    ("PUT", "/api/v1/vm.pause"),
    ("PUT", "/api/v1/vm.resume"),
    ("PUT", "/api/v1/vm.shutdown"),
    ("PUT", "/api/v1/vm.reboot"),
    ("PUT", "/api/v1/vm.power-button"),
    ("PUT", "/api/v1/vm.resize"),
    ("PUT", "/api/v1/vm.resize-disk"),
    ("PUT", "/api/v1/vm.resize-zone"),
    ("PUT", "/api/v1/vm.add-device"),
    ("PUT", "/api/v1/vm.remove-device"),
    ("PUT", "/api/v1/vm.add-disk"),
    ("PUT", "/api/v1/vm.add-fs"),
    ("PUT", "/api/v1/vm.add-generic-vhost-user"),
    ("PUT", "/api/v1/vm.add-pmem"),
    ("PUT", "/api/v1/vm.add-net"),
    ("PUT", "/api/v1/vm.add-vsock"),
    ("PUT", "/api/v1/vm.add-vdpa"),
    ("PUT", "/api/v1/vm.add-user-device"),
    ("PUT", "/api/v1/vm.snapshot"),
    ("PUT", "/api/v1/vm.coredump"),
    ("PUT", "/api/v1/vm.nmi"),
    ("PUT", "/api/v1/vm.restore"),
    ("PUT", "/api/v1/vm.receive-migration"),
    ("PUT", "/api/v1/vm.send-migration"),
    ("GET", "/api/v1/metrics"),
];

/// Routes whose PUT takes a body.
const WITH_BODY: &[&str] = &[
    "vm.create",
    "vm.resize",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.add-device",
    "vm.remove-device",
    "vm.add-disk",
    "vm.add-fs",
    "vm.add-generic-vhost-user",
    "vm.add-pmem",
    "vm.add-net",
    "vm.add-vsock",
    "vm.add-vdpa",
    "vm.add-user-device",
    "vm.snapshot",
    "vm.coredump",
    "vm.restore",
    "vm.receive-migration",
    "vm.send-migration",
];

/// Routes nfvisor answers with a named error, and why.
const NOT_OFFERED: &[(&str, &str)] = &[
    ("vm.power-button", "nfvisor has no ACPI power button"),
    ("vm.resize", "nfvisor has no vCPU or memory hotplug"),
    (
        "vm.resize-disk",
        "nfvisor does not resize a disk while the VM runs",
    ),
    ("vm.resize-zone", "nfvisor has no memory zones"),
    ("vm.add-device", "nfvisor has no VFIO passthrough"),
    ("vm.add-fs", "nfvisor has no virtio-fs"),
    (
        "vm.add-generic-vhost-user",
        "nfvisor has no generic vhost-user devices",
    ),
    ("vm.add-pmem", "nfvisor has no virtio-pmem"),
    ("vm.add-vdpa", "nfvisor has no vDPA"),
    ("vm.add-user-device", "nfvisor has no vfio-user"),
    ("vm.coredump", "nfvisor writes no guest core dumps"),
    ("vm.nmi", "nfvisor does not inject NMIs on request"),
];

/// An answer that is not a success: its status and the error's chain.
#[derive(Debug)]
pub struct ApiError {
    status: u16,
    chain: Vec<String>,
}

fn err(status: u16, what: &str, why: impl Into<String>) -> ApiError {
    ApiError {
        status,
        chain: vec!["Error from API".into(), what.into(), why.into()],
    }
}

fn not_created(what: &str) -> ApiError {
    err(404, what, "VM is not created")
}

fn wrong_state(what: &str, why: impl Into<String>) -> ApiError {
    err(500, what, why)
}

/// A success: 204, or 200 with a body (and its content type).
enum Ok2 {
    NoContent,
    Json(Value),
    /// 200 with no body (vmm.shutdown, as Cloud Hypervisor answers it).
    Empty,
    Text(String),
}

type Answer = std::result::Result<Ok2, ApiError>;

/// A VM configured by vm.create (or the CLI's flags).
struct Created {
    ch: ChVmConfig,
    /// A VM from `run`'s flags (used instead of `ch`).
    flags: Option<vmm::VmConfig>,
    /// Each NIC's TAP descriptors from vm.add-net, one per queue pair
    /// (none: by name).
    tap_fds: Vec<Vec<OwnedFd>>,
}

/// A booted VM.
struct Booted {
    handle: Arc<VmHandle>,
    /// The run's end (Err: why it failed), once it ended.
    ended: Arc<Mutex<Option<std::result::Result<String, String>>>>,
    thread: Option<JoinHandle<()>>,
}

enum Stage {
    Empty,
    Created(Created),
    Booted(Created, Booted),
    /// A restored or received VM (its configuration is the stream's).
    Restored(Booted),
    /// A migration is being received.
    Receiving,
}

struct Vmm {
    stage: Stage,
    json: bool,
}

impl Booted {
    fn alive(&self) -> bool {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    fn state(&self) -> &'static str {
        if !self.alive() {
            "Shutdown"
        } else if self.handle.state() == RunState::Paused {
            "Paused"
        } else {
            "Running"
        }
    }

    /// Ends the VM and waits for its run to return.
    fn stop(&mut self) {
        if self.alive() {
            self.handle.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `spec` on a thread of its own; returns once its handle exists.
fn start(mut spec: vmm::VmSpec, console: Option<Console>) -> std::result::Result<Booted, String> {
    if let Some(c) = console {
        spec.console = match c {
            Console::Off => vmm::ConsoleSink::None,
            Console::Tty => vmm::ConsoleSink::Stdout,
            Console::File(f) => vmm::ConsoleSink::File(f.into()),
        };
    }
    let (tx, rx) = mpsc::channel();
    spec.on_handle = Some(Box::new(move |h| {
        let _ = tx.send(h);
    }));
    let vm = vmm::Vm::create(spec).map_err(|e| e.to_string())?;
    let ended: Arc<Mutex<Option<std::result::Result<String, String>>>> = Arc::default();
    let ended_here = ended.clone();
    let thread = std::thread::Builder::new()
        .name("vm".into())
        .spawn(move || {
            let end = match vm.run() {
                Ok(report) => {
                    let code = crate::report::exit_code_of(&report.stop);
                    tracing::info!("the VM ended (exit code {code})");
                    Ok(format!("exit code {code}"))
                }
                Err(e) => {
                    tracing::error!("the VM failed: {e}");
                    Err(e.to_string())
                }
            };
            *ended_here.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);
        })
        .map_err(|e| format!("spawning the VM's thread: {e}"))?;
    let handle = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(h) => break h,
            Err(mpsc::RecvTimeoutError::Timeout) if !thread.is_finished() => continue,
            Err(_) => {
                let _ = thread.join();
                let why = ended
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .and_then(|r| r.err())
                    .unwrap_or_else(|| "the VM ended before it ran".into());
                return Err(why);
            }
        }
    };
    Ok(Booted {
        handle,
        ended,
        thread: Some(thread),
    })
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> std::result::Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError {
        status: 400,
        chain: vec!["Failed to deserialize JSON".into(), e.to_string()],
    })
}

/// `file:///dir` or a plain path.
fn file_url(url: &str, field: &str) -> std::result::Result<PathBuf, ApiError> {
    let p = url.strip_prefix("file://").unwrap_or(url);
    if p.is_empty() || !p.starts_with('/') {
        return Err(err(400, field, format!("{url:?}: file:///ABSOLUTE/PATH")));
    }
    Ok(PathBuf::from(p))
}

impl Created {
    /// Boots this configuration.
    fn boot(&self, json: bool) -> std::result::Result<Booted, ApiError> {
        let fail = |e: String| err(500, "The VM could not boot", e);
        let (config, console) = match &self.flags {
            Some(c) => (c.clone(), None),
            None => {
                let nets = self.ch.net.as_deref().unwrap_or_default();
                let mut taps = Vec::new();
                for (n, fds) in nets.iter().zip(&self.tap_fds) {
                    taps.push(if fds.is_empty() {
                        TapFrom::Name(n.tap.clone().unwrap_or_default())
                    } else {
                        // the NIC works on its own duplicates: these stay
                        // here (a reboot takes them again)
                        TapFrom::Fds(fds.iter().map(|f| f.as_raw_fd()).collect())
                    });
                }
                let (c, console) = self.ch.to_vm_config(&taps).map_err(fail)?;
                (c, Some(console))
            }
        };
        let mut spec = vmm::VmSpec::from_config(&config, &crate::config::bundled_image, json)
            .map_err(|e| fail(e.to_string()))?;
        spec.process_start = crate::PROCESS_START.get().copied();
        start(spec, console).map_err(fail)
    }
}

impl Vmm {
    fn booted(&mut self, what: &str) -> std::result::Result<&mut Booted, ApiError> {
        match &mut self.stage {
            Stage::Booted(_, b) | Stage::Restored(b) => Ok(b),
            Stage::Created(_) => Err(wrong_state(what, "VM is not running")),
            Stage::Receiving => Err(wrong_state(what, "a migration is being received")),
            Stage::Empty => Err(not_created(what)),
        }
    }

    /// The booted VM, running (not ended).
    fn running(&mut self, what: &str) -> std::result::Result<Arc<VmHandle>, ApiError> {
        let b = self.booted(what)?;
        if !b.alive() {
            return Err(wrong_state(what, "VM is not running (it shut down)"));
        }
        Ok(b.handle.clone())
    }

    /// Stops a booted VM, keeping its configuration (Created again).
    fn stop_vm(&mut self) {
        self.stage = match std::mem::replace(&mut self.stage, Stage::Empty) {
            Stage::Booted(c, mut b) => {
                b.stop();
                Stage::Created(c)
            }
            Stage::Restored(mut b) => {
                b.stop();
                Stage::Empty
            }
            other => other,
        };
    }

    fn execute(&mut self, what: &str, req: VmRequest) -> Answer {
        let h = self.running(what)?;
        vmm::api::execute(&h, &req, &mut |_| {})
            .map(|_| Ok2::NoContent)
            .map_err(|e| wrong_state(what, e.to_string()))
    }

    fn info(&mut self) -> Answer {
        let (config, state, memory) = match &self.stage {
            Stage::Empty => return Err(not_created("The VM info is not available")),
            Stage::Receiving => {
                return Err(wrong_state(
                    "The VM info is not available",
                    "a migration is being received",
                ))
            }
            Stage::Created(c) => (config_json(c), "Created", memory_size(c)),
            Stage::Booted(c, b) => (config_json(c), b.state(), memory_size(c)),
            Stage::Restored(b) => {
                let s = vmm::api::status(&b.handle);
                (
                    json!({"cpus": {"boot_vcpus": s.vcpus, "max_vcpus": s.vcpus},
                           "memory": {"size": s.memory_mib << 20}}),
                    b.state(),
                    s.memory_mib << 20,
                )
            }
        };
        Ok(Ok2::Json(json!({
            "config": config,
            "state": state,
            "memory_actual_size": memory,
        })))
    }

    fn counters(&mut self) -> Answer {
        let h = self.running("The VM counters are not available")?;
        let s = vmm::api::status(&h);
        Ok(Ok2::Json(
            serde_json::to_value(s.devices).unwrap_or_default(),
        ))
    }

    fn create(&mut self, body: &[u8]) -> Answer {
        let what = "The VM could not be created";
        if !matches!(self.stage, Stage::Empty) {
            return Err(wrong_state(what, "VM is already created"));
        }
        let mut ch: ChVmConfig = parse(body)?;
        // (descriptors come only with vm.add-net; a NIC here needs a name)
        let names: Vec<TapFrom> = ch
            .net
            .iter()
            .flatten()
            .map(|n| TapFrom::Name(n.tap.clone().unwrap_or_default()))
            .collect();
        ch.to_vm_config(&names).map_err(|e| err(500, what, e))?;
        name_devices(&mut ch);
        let n = names.len();
        self.stage = Stage::Created(Created {
            ch,
            flags: None,
            tap_fds: (0..n).map(|_| Vec::new()).collect(),
        });
        Ok(Ok2::NoContent)
    }

    fn boot(&mut self) -> Answer {
        let what = "The VM could not boot";
        let created = match std::mem::replace(&mut self.stage, Stage::Empty) {
            Stage::Created(c) => c,
            Stage::Booted(c, b) if !b.alive() => c,
            other => {
                let why = match &other {
                    Stage::Empty => {
                        self.stage = other;
                        return Err(err(404, what, "VM config is missing"));
                    }
                    Stage::Receiving => "a migration is being received",
                    _ => "VM is already booted",
                };
                self.stage = other;
                return Err(wrong_state(what, why));
            }
        };
        match created.boot(self.json) {
            Ok(b) => {
                self.stage = Stage::Booted(created, b);
                Ok(Ok2::NoContent)
            }
            Err(e) => {
                self.stage = Stage::Created(created);
                Err(e)
            }
        }
    }

    fn add_disk(&mut self, body: &[u8]) -> Answer {
        let what = "The disk could not be added";
        let mut d: DiskConfig = parse(body)?;
        let c = self.created_for_add(what)?;
        ch_api::config::disk_spec(&d).map_err(|e| err(500, what, e))?;
        let disks = c.ch.disks.get_or_insert_with(Vec::new);
        d.id.get_or_insert_with(|| format!("_disk{}", disks.len()));
        disks.push(d);
        Ok(Ok2::NoContent)
    }

    fn add_vsock(&mut self, body: &[u8]) -> Answer {
        let what = "The vsock device could not be added";
        let v: Value = parse(body)?;
        let c = self.created_for_add(what)?;
        if c.ch.vsock.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(err(
                500,
                what,
                "the VM has a vsock device already (one only)",
            ));
        }
        let probe = ChVmConfig {
            vsock: Some(v.clone()),
            payload: c.ch.payload.clone(),
            ..Default::default()
        };
        probe.to_vm_config(&[]).map_err(|e| err(500, what, e))?;
        c.ch.vsock = Some(v);
        Ok(Ok2::NoContent)
    }

    fn add_net(&mut self, body: &[u8], mut fds: Vec<OwnedFd>) -> Answer {
        let what = "The network device could not be added";
        let mut n: NetConfig = parse(body)?;
        let c = self.created_for_add(what)?;
        match (fds.len(), &n.tap) {
            (0, Some(_)) => {}
            // a vhost-user NIC: its backend's socket, no TAP
            (0, None) if n.vhost_user || n.vhost_socket.is_some() => {}
            (0, None) => {
                return Err(err(
                    500,
                    what,
                    "no TAP: send its descriptors with the request (SCM_RIGHTS, one per queue pair) or name it (tap)",
                ))
            }
            (k, _) if k > virtio::net_ctrl::MAX_PAIRS as usize => {
                return Err(err(
                    500,
                    what,
                    format!(
                        "{k} descriptors: one per queue pair, at most {}",
                        virtio::net_ctrl::MAX_PAIRS
                    ),
                ))
            }
            _ => {
                // TAPs with a virtio-net header, queues of one TAP, as the
                // NIC needs them (checked on duplicates the check closes)
                let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
                virtio::tap::Tap::from_fds(&raw).map_err(|e| err(500, what, e.to_string()))?;
            }
        }
        n.fds = None;
        let taps = [if fds.is_empty() {
            TapFrom::Name(n.tap.clone().unwrap_or_default())
        } else {
            TapFrom::Fds(fds.iter().map(|f| f.as_raw_fd()).collect())
        }];
        let probe = ChVmConfig {
            net: Some(vec![n.clone()]),
            payload: c.ch.payload.clone(),
            ..Default::default()
        };
        probe.to_vm_config(&taps).map_err(|e| err(500, what, e))?;
        let nets = c.ch.net.get_or_insert_with(Vec::new);
        n.id.get_or_insert_with(|| format!("_net{}", nets.len()));
        nets.push(n);
        c.tap_fds.push(std::mem::take(&mut fds));
        Ok(Ok2::NoContent)
    }

    /// The created (not booted) VM a device is added to.
    fn created_for_add(&mut self, what: &str) -> std::result::Result<&mut Created, ApiError> {
        match &mut self.stage {
            Stage::Created(c) if c.flags.is_none() => Ok(c),
            Stage::Created(_) => Err(wrong_state(
                what,
                "this VM was configured by run's flags: add devices there",
            )),
            Stage::Empty => Err(not_created(what)),
            _ => Err(wrong_state(
                what,
                "nfvisor has no PCI hotplug: add devices between vm.create and vm.boot",
            )),
        }
    }

    fn remove_device(&mut self, body: &[u8]) -> Answer {
        #[derive(Deserialize)]
        struct Remove {
            id: String,
        }
        let what = "The device could not be removed";
        let r: Remove = parse(body)?;
        let c = self.created_for_add(what)?;
        if let Some(disks) = &mut c.ch.disks {
            if let Some(i) = disks.iter().position(|d| d.id.as_deref() == Some(&r.id)) {
                disks.remove(i);
                return Ok(Ok2::NoContent);
            }
        }
        if let Some(nets) = &mut c.ch.net {
            if let Some(i) = nets.iter().position(|n| n.id.as_deref() == Some(&r.id)) {
                nets.remove(i);
                c.tap_fds.remove(i);
                return Ok(Ok2::NoContent);
            }
        }
        Err(err(404, what, format!("no device {:?}", r.id)))
    }

    /// vm.snapshot's request and the VM it saves.
    fn snapshot(
        &mut self,
        body: &[u8],
    ) -> std::result::Result<(Arc<VmHandle>, VmRequest), ApiError> {
        #[derive(Deserialize)]
        struct Snap {
            destination_url: String,
        }
        let s: Snap = parse(body)?;
        let to = file_url(&s.destination_url, "destination_url")?;
        let h = self.running("The VM could not be snapshotted")?;
        Ok((h, VmRequest::Snapshot { to }))
    }

    /// A migration is in flight from this VM.
    fn migrating(&mut self) -> bool {
        match &self.stage {
            Stage::Booted(_, b) | Stage::Restored(b) => {
                b.alive() && vmm::api::status(&b.handle).migration.is_some()
            }
            _ => false,
        }
    }

    /// vm.send-migration's request and the VM it moves.
    fn send_migration(
        &mut self,
        body: &[u8],
    ) -> std::result::Result<(Arc<VmHandle>, VmRequest), ApiError> {
        #[derive(Deserialize)]
        struct Send {
            destination_url: String,
            #[serde(default)]
            downtime_ms: Option<f64>,
            #[serde(default)]
            timeout_s: Option<f64>,
            #[serde(default)]
            timeout_strategy: Option<String>,
            #[serde(default)]
            connections: Option<u32>,
            #[serde(default)]
            local: bool,
            #[serde(default)]
            tls_dir: Option<String>,
            #[serde(default)]
            memory_mode: Option<String>,
        }
        let what = "The VM could not be migrated";
        let s: Send = parse(body)?;
        if s.local {
            return Err(err(
                500,
                what,
                "local (fd-passing) migration is not in nfvisor",
            ));
        }
        refuse_tls_postcopy(what, &s.tls_dir, &s.memory_mode)?;
        let on_timeout = match s.timeout_strategy.as_deref() {
            None | Some("Cancel") => vmm::api::OnTimeout::Abort,
            Some("Ignore") => vmm::api::OnTimeout::Force,
            Some(o) => {
                return Err(err(
                    400,
                    what,
                    format!("timeout_strategy {o:?}: Cancel or Ignore"),
                ))
            }
        };
        let mut req: vmm::api::MigrateRequest =
            serde_json::from_value(json!({"to": s.destination_url}))
                .map_err(|e| err(400, what, e.to_string()))?;
        req.downtime_ms = s.downtime_ms.unwrap_or(req.downtime_ms);
        req.timeout_s = s.timeout_s.unwrap_or(req.timeout_s);
        req.on_timeout = on_timeout;
        req.connections = s.connections.unwrap_or(1);
        // Cloud Hypervisor's migration has no token: a tcp: URL given to
        // the 0600 API socket is the operator's explicit choice
        req.insecure = true;
        let h = self.running(what)?;
        Ok((h, VmRequest::Migrate(req)))
    }
}

/// A migration asked to be encrypted or post-copy is refused (never
/// silently sent in the clear, or pre-copy).
fn refuse_tls_postcopy(
    what: &str,
    tls_dir: &Option<String>,
    memory_mode: &Option<String>,
) -> std::result::Result<(), ApiError> {
    if tls_dir.is_some() {
        return Err(err(
            500,
            what,
            "tls_dir: nfvisor's migration has no TLS (it authenticates with a token on the CLI)",
        ));
    }
    if memory_mode.as_deref().is_some_and(|m| m != "Precopy") {
        return Err(err(500, what, "memory_mode: Precopy only"));
    }
    Ok(())
}

/// null or an empty list.
fn neutral_json(v: &Value) -> bool {
    v.is_null() || v.as_array().is_some_and(|a| a.is_empty())
}

/// Gives every device an id (Cloud Hypervisor's `_disk0`, `_net0`, ...).
fn name_devices(ch: &mut ChVmConfig) {
    for (i, d) in ch.disks.iter_mut().flatten().enumerate() {
        d.id.get_or_insert_with(|| format!("_disk{i}"));
    }
    for (i, n) in ch.net.iter_mut().flatten().enumerate() {
        n.id.get_or_insert_with(|| format!("_net{i}"));
    }
}

/// The guest's memory, bytes.
fn memory_size(c: &Created) -> u64 {
    match &c.flags {
        Some(f) => f
            .memory
            .as_ref()
            .and_then(|m| m.bytes().ok())
            .unwrap_or(64 << 20),
        None => c.ch.memory.size,
    }
}

fn config_json(c: &Created) -> Value {
    match &c.flags {
        Some(f) => json!({
            "cpus": {"boot_vcpus": f.vcpus.unwrap_or(1), "max_vcpus": f.vcpus.unwrap_or(1)},
            "memory": {"size": memory_size(c)},
            "payload": {"kernel": f.kernel.as_ref().map(|k| k.display().to_string())
                .or_else(|| f.guest.as_ref().map(|g| format!("bundled:{g}")))},
        }),
        None => serde_json::to_value(&c.ch).unwrap_or_default(),
    }
}

/// The server: shared state and the process's end.
struct Server {
    vmm: Mutex<Vmm>,
    connections: AtomicUsize,
    /// vmm.shutdown was answered: the process ends (told once the answer
    /// is written).
    quit: Mutex<Option<mpsc::Sender<()>>>,
    quitting: std::sync::atomic::AtomicBool,
}

impl Server {
    fn handle(&self, req: ch_api::http::Request) -> (u16, Option<(Vec<u8>, &'static str)>) {
        let answer = self.route(req);
        match answer {
            Ok(Ok2::NoContent) => (204, None),
            Ok(Ok2::Empty) => (200, Some((Vec::new(), "application/json"))),
            Ok(Ok2::Json(v)) => (200, Some((v.to_string().into_bytes(), "application/json"))),
            Ok(Ok2::Text(t)) => (200, Some((t.into_bytes(), "text/plain; version=0.0.4"))),
            Err(e) => (
                e.status,
                Some((
                    serde_json::to_vec(&e.chain).unwrap_or_default(),
                    "application/json",
                )),
            ),
        }
    }

    fn route(&self, req: ch_api::http::Request) -> Answer {
        let Some(&(method, path)) = ROUTES.iter().find(|(_, p)| *p == req.path) else {
            return Err(ApiError {
                status: 404,
                chain: vec!["Not Found".into()],
            });
        };
        let bad = || ApiError {
            status: 400,
            chain: vec!["Bad Request".into()],
        };
        if req.method != method {
            return Err(bad());
        }
        let name = path.trim_start_matches("/api/v1/");
        if method == "PUT" {
            let wants = WITH_BODY.contains(&name);
            if wants && req.body.is_empty() || !wants && !req.body.is_empty() {
                return Err(bad());
            }
        }
        if let Some((_, why)) = NOT_OFFERED.iter().find(|(n, _)| *n == name) {
            return Err(err(500, &format!("{name} is not available"), *why));
        }
        if name == "vmm.ping" {
            // answered without the VMM's state: a long operation (a boot,
            // a snapshot) must not make a client think the VMM is gone
            return Ok(Ok2::Json(json!({
                "build_version": concat!("nfvisor-", env!("CARGO_PKG_VERSION")),
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "features": ["kvm", "io_uring"],
            })));
        }
        let mut vmm = self.vmm.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(
            name,
            "vmm.shutdown" | "vm.shutdown" | "vm.reboot" | "vm.delete"
        ) && vmm.migrating()
        {
            return Err(wrong_state(
                &format!("{name} is refused"),
                "a migration is in flight: wait for its end",
            ));
        }
        match name {
            "vmm.shutdown" => {
                vmm.stop_vm();
                self.quitting.store(true, Ordering::Release);
                Ok(Ok2::Empty)
            }
            "vm.info" => vmm.info(),
            "vm.counters" => vmm.counters(),
            "vm.create" => vmm.create(&req.body),
            "vm.boot" => vmm.boot(),
            "vm.pause" => vmm.execute("The VM could not be paused", VmRequest::Pause),
            "vm.resume" => {
                let h = vmm.running("The VM could not be resumed")?;
                if h.state() != RunState::Paused {
                    return Err(wrong_state(
                        "The VM could not be resumed",
                        "VM is not paused",
                    ));
                }
                vmm.execute("The VM could not be resumed", VmRequest::Resume)
            }
            "vm.shutdown" => {
                vmm.booted("The VM could not be shut down")?;
                vmm.stop_vm();
                Ok(Ok2::NoContent)
            }
            "vm.reboot" => {
                vmm.running("The VM could not be rebooted")?;
                if let Stage::Restored(_) = vmm.stage {
                    return Err(wrong_state(
                        "The VM could not be rebooted",
                        "a restored VM has no configuration here to boot again",
                    ));
                }
                vmm.stop_vm();
                vmm.boot()
            }
            "vm.delete" => {
                if matches!(vmm.stage, Stage::Receiving) {
                    return Err(wrong_state(
                        "The VM could not be deleted",
                        "a migration is being received",
                    ));
                }
                vmm.stop_vm();
                vmm.stage = Stage::Empty;
                Ok(Ok2::NoContent)
            }
            "vm.add-disk" => vmm.add_disk(&req.body),
            "vm.add-vsock" => vmm.add_vsock(&req.body),
            "vm.add-net" => vmm.add_net(&req.body, req.fds),
            "vm.remove-device" => vmm.remove_device(&req.body),
            "vm.snapshot" => {
                // (written with the state unlocked: other clients are
                // answered meanwhile)
                let (h, snap) = vmm.snapshot(&req.body)?;
                drop(vmm);
                vmm::api::execute(&h, &snap, &mut |_| {})
                    .map(|_| Ok2::NoContent)
                    .map_err(|e| wrong_state("The VM could not be snapshotted", e.to_string()))
            }
            "vm.send-migration" => {
                // (a migration takes a while: other clients are answered
                // meanwhile, the VM's state says "migrating")
                let (h, m) = vmm.send_migration(&req.body)?;
                drop(vmm);
                vmm::api::execute(&h, &m, &mut |_| {})
                    .map_err(|e| wrong_state("The VM could not be migrated", e.to_string()))?;
                // the guest runs on at the destination: this VM ends
                let mut vmm = self.vmm.lock().unwrap_or_else(|e| e.into_inner());
                if let Stage::Booted(_, b) | Stage::Restored(b) = &mut vmm.stage {
                    if let Some(t) = b.thread.take() {
                        let _ = t.join();
                    }
                }
                Ok(Ok2::NoContent)
            }
            "vm.restore" => {
                drop(vmm);
                self.restore(&req.body)
            }
            "vm.receive-migration" => {
                drop(vmm);
                self.receive(&req.body)
            }
            "metrics" => {
                let h = vmm.running("The metrics are not available")?;
                Ok(Ok2::Text(vmm::metrics::render(&h)))
            }
            _ => Err(bad()),
        }
    }

    /// vm.restore: a snapshot into an empty VMM.
    fn restore(&self, body: &[u8]) -> Answer {
        #[derive(Deserialize)]
        struct Restore {
            source_url: String,
            #[serde(default)]
            prefault: bool,
            #[serde(default)]
            resume: Option<bool>,
            #[serde(default)]
            memory_restore_mode: Option<String>,
            #[serde(default)]
            net_fds: Option<Value>,
        }
        let what = "The VM could not be restored";
        let r: Restore = parse(body)?;
        if r.memory_restore_mode
            .as_deref()
            .is_some_and(|m| m != "Copy")
        {
            return Err(err(500, what, "memory_restore_mode: Copy only"));
        }
        if r.net_fds.as_ref().is_some_and(|v| !neutral_json(v)) {
            return Err(err(
                500,
                what,
                "net_fds: a restored NIC takes this host's TAP by `nfvisor restore --net`",
            ));
        }
        let dir = file_url(&r.source_url, "source_url")?;
        let mut vmm = self.vmm.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(vmm.stage, Stage::Empty) {
            return Err(wrong_state(what, "VM is already created"));
        }
        let (source, cfg) = vmm::snapshot::RestoreSource::open(&vmm::snapshot::stream_path(&dir))
            .map_err(|e| err(500, what, e.to_string()))?;
        let mut here = vmm::VmConfig::default();
        here.rt.prefault = r.prefault.then_some(true);
        let spec = crate::restored_spec(source, cfg, here, vmm.json, None)
            .map_err(|e| err(500, what, format!("{e:#}")))?;
        // (the console as `nfvisor restore` has it: on stdout)
        let b = start(spec, Some(Console::Tty)).map_err(|e| err(500, what, e))?;
        // Cloud Hypervisor leaves a restored VM paused unless told to
        // resume it; nfvisor restores it running, so it pauses it at once
        if !r.resume.unwrap_or(false) {
            let _ = vmm::api::execute(&b.handle, &VmRequest::Pause, &mut |_| {});
        }
        vmm.stage = Stage::Restored(b);
        Ok(Ok2::NoContent)
    }

    /// vm.receive-migration: waits for the migration, then runs the guest.
    fn receive(&self, body: &[u8]) -> Answer {
        #[derive(Deserialize)]
        struct Receive {
            receiver_url: String,
            #[serde(default)]
            tls_dir: Option<String>,
            #[serde(default)]
            memory_mode: Option<String>,
        }
        let what = "The migration could not be received";
        let r: Receive = parse(body)?;
        refuse_tls_postcopy(what, &r.tls_dir, &r.memory_mode)?;
        vmm::migrate::Endpoint::parse(&r.receiver_url)
            .map_err(|e| err(400, what, format!("receiver_url {e}")))?;
        let json = {
            let mut vmm = self.vmm.lock().unwrap_or_else(|e| e.into_inner());
            if !matches!(vmm.stage, Stage::Empty) {
                return Err(wrong_state(what, "VM is already created"));
            }
            vmm.stage = Stage::Receiving;
            vmm.json
        };
        let (tx, rx) = mpsc::channel();
        let io_timeout = Duration::from_secs_f64(vmm::migrate::DEFAULT_IO_TIMEOUT_S);
        let result = vmm::receive::receive(
            &r.receiver_url,
            None,
            io_timeout,
            |source, cfg, on_prepared| {
                let mut spec = crate::restored_spec(
                    source,
                    cfg,
                    vmm::VmConfig::default(),
                    json,
                    Some(on_prepared),
                )
                .map_err(|e| vmm::Error::Config(format!("{e:#}")))?;
                spec.console = vmm::ConsoleSink::Stdout;
                let tx = tx.clone();
                spec.on_handle = Some(Box::new(move |h| {
                    let _ = tx.send(h);
                }));
                vmm::Vm::create(spec)
            },
        );
        let mut vmm = self.vmm.lock().unwrap_or_else(|e| e.into_inner());
        let incoming = match result {
            Ok(i) => i,
            Err(e) => {
                vmm.stage = Stage::Empty;
                return Err(err(500, what, e.to_string()));
            }
        };
        let ended: Arc<Mutex<Option<std::result::Result<String, String>>>> = Arc::default();
        let ended_here = ended.clone();
        let vm = incoming.vm;
        let thread = std::thread::spawn(move || {
            let end = vm
                .run()
                .map(|_| "ended".to_string())
                .map_err(|e| e.to_string());
            *ended_here.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(handle) => {
                vmm.stage = Stage::Restored(Booted {
                    handle,
                    ended,
                    thread: Some(thread),
                });
                Ok(Ok2::NoContent)
            }
            Err(_) => {
                let _ = thread.join();
                vmm.stage = Stage::Empty;
                let why = ended
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .and_then(|r| r.err())
                    .unwrap_or_else(|| "the received VM did not start".into());
                Err(err(500, what, why))
            }
        }
    }
}

fn serve_connection(server: Arc<Server>, stream: UnixStream) {
    let mut conn = Conn::new(stream);
    loop {
        match conn.read_request(IDLE, STALL) {
            Ok(req) => {
                let (status, body) = server.handle(req);
                let sent = match &body {
                    Some((b, ctype)) => conn.respond_typed(status, Some(b), ctype),
                    None => conn.respond_typed(status, None, ""),
                };
                if server.quitting.load(Ordering::Acquire) {
                    if let Some(q) = server.quit.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        let _ = q.send(());
                    }
                    return;
                }
                if sent.is_err() {
                    return;
                }
            }
            Err(ReadError::Closed) | Err(ReadError::Idle) => return,
            Err(ReadError::Io(e)) => {
                tracing::debug!("API connection: {e}");
                return;
            }
            Err(ReadError::Stalled) => {
                let body = serde_json::to_vec(&[
                    "Request Timeout",
                    &format!("the request was not complete within {STALL:?}"),
                ])
                .unwrap_or_default();
                let _ = conn.respond_typed(408, Some(&body), "application/json");
                return;
            }
            Err(ReadError::Bad(why)) => {
                let body = serde_json::to_vec(&["Bad Request", &why]).unwrap_or_default();
                let _ = conn.respond_typed(400, Some(&body), "application/json");
                return;
            }
        }
    }
}

/// Binds the API socket (0600), refusing a path another live server holds
/// or anything that is not a socket.
fn bind(path: &Path) -> Result<UnixListener> {
    devices::unix_socket::bind_private(path)
        .with_context(|| format!("--api-socket {}", path.display()))
}

/// Serves the API on `path` until vmm.shutdown (or, with a VM from the
/// flags, until that VM ends and vmm.shutdown comes); `flags`: a VM to
/// boot now.
pub fn serve(path: &Path, flags: Option<vmm::VmConfig>, json: bool) -> Result<u8> {
    let listener = bind(path)?;
    let (quit_tx, quit_rx) = mpsc::channel();
    let mut vmm = Vmm {
        stage: Stage::Empty,
        json,
    };
    if let Some(f) = flags {
        let c = Created {
            ch: ChVmConfig::default(),
            flags: Some(f),
            tap_fds: Vec::new(),
        };
        let b = c
            .boot(json)
            .map_err(|e| anyhow::anyhow!("{}", e.chain.join(": ")))?;
        vmm.stage = Stage::Booted(c, b);
    }
    let server = Arc::new(Server {
        vmm: Mutex::new(vmm),
        connections: AtomicUsize::new(0),
        quit: Mutex::new(Some(quit_tx)),
        quitting: Default::default(),
    });
    tracing::info!(
        "API on {} (Cloud Hypervisor's routes under /api/v1)",
        path.display()
    );
    let accept_server = server.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let me = unsafe_geteuid();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if !devices::unix_socket::peer_allowed(&stream) {
                    let other = vmm::control::peer_uid(&stream);
                    tracing::warn!("API: a client of uid {other:?} refused (not {me})");
                    continue;
                }
                let server = accept_server.clone();
                if server.connections.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    server.connections.fetch_sub(1, Ordering::AcqRel);
                    let mut c = Conn::new(stream);
                    let body = serde_json::to_vec(&[
                        "Service Unavailable",
                        &format!("at most {MAX_CONNECTIONS} clients at once"),
                    ])
                    .unwrap_or_default();
                    let _ = c.respond_typed(503, Some(&body), "application/json");
                    continue;
                }
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        serve_connection(server.clone(), stream);
                        server.connections.fetch_sub(1, Ordering::AcqRel);
                    });
            }
        })
        .context("spawning the API thread")?;
    let _ = quit_rx.recv();
    let _ = std::fs::remove_file(path);
    Ok(0)
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
