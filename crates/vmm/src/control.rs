//! A running VM's controls: pause and resume (every vCPU parked outside
//! KVM_RUN, acknowledged), snapshot, status; and the control socket that
//! offers them: newline-delimited JSON requests and replies (schema version
//! 1), created 0600, callers checked to be this user (SO_PEERCRED).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use crate::memory::GuestRam;
use vmm_sys_util::signal::SIGRTMIN;

use crate::snapshot::{self, SerialRegs, SnapshotConfig, SnapshotReport, VcpuState};
use crate::{Error, Result};

pub const SCHEMA: u32 = 1;

/// A migration that did not complete.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedMigration {
    pub to: String,
    pub error: String,
    /// The guest was left paused: the operator decides (`resume`).
    pub left_paused: bool,
}

/// A vCPU state being read by its thread.
pub(crate) type PendingSave = std::sync::mpsc::Receiver<Result<VcpuState>>;

fn vcpu_gone(id: usize) -> Error {
    Error::Vcpu {
        id: id as u32,
        why: "its thread has ended".into(),
    }
}

/// What a paused vCPU thread is asked to do.
pub enum VcpuCmd {
    Save(Sender<Result<VcpuState>>),
    Resume,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

/// Shared between the VM's main thread, its vCPU threads and the control socket.
pub struct VmHandle {
    pub(crate) pause: AtomicBool,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) cmds: Vec<Sender<VcpuCmd>>,
    pub(crate) acks: Mutex<Receiver<u32>>,
    pub(crate) pthreads: Mutex<Vec<libc::pthread_t>>,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: GuestRam,
    pub(crate) com1: Arc<devices::SerialConsole>,
    pub(crate) config: SnapshotConfig,
    pub(crate) state: Mutex<RunState>,
    pub(crate) started: Instant,
    /// Set when the guest has moved to another host.
    pub(crate) migrated: Mutex<Option<String>>,
    /// The last migration that failed: where to, why, and whether it left
    /// the guest paused for the operator (its outcome unknown).
    pub(crate) failed_migration: Mutex<Option<FailedMigration>>,
    /// ivshmem in doorbell mode: not carried by a snapshot or a stream.
    pub(crate) ivshmem_doorbells: bool,
    /// The ivshmem device, whose configuration a snapshot carries.
    pub(crate) ivshmem_device: Option<Arc<devices::ivshmem::Ivshmem>>,
    /// Dirty rings (empty: the per-slot dirty bitmap is used).
    pub(crate) rings: Arc<crate::dirty_ring::DirtyRings>,
    /// Without rings: how the dirty bitmap is protected.
    pub(crate) dirty_manual: crate::dirty_log::ManualProtect,
    /// The ivshmem region and its slot, for opening and closing the window.
    pub(crate) ivshmem_window: Option<Arc<crate::shared_region::SharedRegion>>,
    /// Each vCPU's exit counts, live.
    pub(crate) live_exits: Vec<Arc<crate::exits::LiveExits>>,
    /// The migration in flight: its destination and last progress.
    pub(crate) migration: Mutex<Option<(String, Option<crate::migrate::Progress>)>>,
}

pub(crate) fn regs_of(s: &vm_superio::serial::SerialState) -> SerialRegs {
    SerialRegs {
        baud_divisor_low: s.baud_divisor_low,
        baud_divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        in_buffer: s.in_buffer.clone(),
    }
}

/// COM1's registers back into vm-superio's form.
pub fn serial_state(r: &SerialRegs) -> vm_superio::serial::SerialState {
    vm_superio::serial::SerialState {
        baud_divisor_low: r.baud_divisor_low,
        baud_divisor_high: r.baud_divisor_high,
        interrupt_enable: r.interrupt_enable,
        interrupt_identification: r.interrupt_identification,
        line_control: r.line_control,
        line_status: r.line_status,
        modem_control: r.modem_control,
        modem_status: r.modem_status,
        scratch: r.scratch,
        in_buffer: r.in_buffer.clone(),
    }
}

impl VmHandle {
    fn kick_all(&self) {
        for &pt in self
            .pthreads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: the vCPU threads are joined only after the control
            // socket and every caller of this have stopped; SIGRTMIN has a
            // no-op handler and only makes KVM_RUN return.
            unsafe { libc::pthread_kill(pt, SIGRTMIN()) };
        }
    }

    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `status` reports: running, paused, migrating (pre-copy or
    /// stop-and-copy in flight), migrated (handed over, ending here) or
    /// failed (a migration left the guest paused, its outcome unknown,
    /// until the operator resumes it); the last failed migration's reason.
    pub fn status(&self) -> serde_json::Value {
        let migrating = self
            .migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let migrated = self
            .migrated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let failed = self
            .failed_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let state = if migrated.is_some() {
            "migrated"
        } else if migrating.is_some() {
            "migrating"
        } else {
            match self.state() {
                RunState::Running => "running",
                RunState::Paused if failed.as_ref().is_some_and(|f| f.left_paused) => "failed",
                RunState::Paused => "paused",
            }
        };
        let exits: Vec<_> = self
            .live_exits
            .iter()
            .enumerate()
            .map(|(id, l)| {
                let (by_reason, total) = l.read();
                serde_json::json!({ "vcpu": id, "total": total, "by_reason": by_reason })
            })
            .collect();
        let mut v = serde_json::json!({
            "state": state,
            "vcpus": self.cmds.len(),
            "memory_mib": self.config.memory_size >> 20,
            "kernel": self.config.kernel,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "exits": exits,
        });
        if let Some((to, progress)) = migrating {
            v["migration"] = serde_json::json!({ "to": to, "progress": progress });
        }
        if let Some(to) = migrated {
            v["migrated_to"] = serde_json::json!(to);
        }
        if let Some(f) = failed {
            v["last_failed_migration"] = serde_json::json!(f);
        }
        v
    }

    /// Refuses what must not run beside a migration in flight.
    fn refuse_while_migrating(&self, what: &str) -> Result<()> {
        match &*self.migration.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((to, _)) => Err(Error::Config(format!(
                "{what}: a migration to {to} is in flight; wait for its outcome"
            ))),
            None => Ok(()),
        }
    }

    /// Marks a migration to `to` in flight, unless one already is.
    fn begin_migration(&self, to: &str) -> Result<()> {
        let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((other, _)) = &*m {
            return Err(Error::Config(format!(
                "migrate: a migration to {other} is in flight; wait for its outcome"
            )));
        }
        *m = Some((to.to_string(), None));
        Ok(())
    }

    /// Parks every vCPU outside KVM_RUN; returns how long that took.
    pub fn pause(&self) -> Result<Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == RunState::Paused {
            return Ok(Duration::ZERO);
        }
        let t0 = Instant::now();
        let acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        while acks.try_recv().is_ok() {}
        self.pause.store(true, Ordering::Release);
        let mut parked = 0;
        while parked < self.cmds.len() {
            if self.stop.load(Ordering::Acquire) {
                return Err(Error::Config("the VM has ended".into()));
            }
            self.kick_all();
            match acks.recv_timeout(Duration::from_millis(1)) {
                Ok(_) => parked += 1,
                Err(_) if t0.elapsed() > Duration::from_secs(5) => {
                    return Err(Error::Vcpu {
                        id: parked as u32,
                        why: "did not pause within 5 s".into(),
                    })
                }
                Err(_) => {}
            }
        }
        *state = RunState::Paused;
        Ok(t0.elapsed())
    }

    /// ivshmem in doorbell mode cannot move: peer ids belong to the
    /// server connection, so the guest would lose its IVPosition and its
    /// peers' doorbells. Refused, with the reason. (A plain region moves to
    /// a destination attached to the same region; the stream names it.)
    pub(crate) fn refuse_with_ivshmem(&self) -> Result<()> {
        if self.ivshmem_doorbells {
            return Err(Error::Config(
                "this VM's ivshmem is in doorbell mode: its peer id belongs to its connection to the ivshmem server, so it cannot be saved or migrated (plain-mode regions can)".into(),
            ));
        }
        Ok(())
    }

    /// Opens (maps) or closes (unmaps) the ivshmem window while the guest
    /// runs: KVM4NFV's "open the window when needed, close it immediately".
    pub fn ivshmem_window(&self, map: bool) -> Result<&'static str> {
        let region = self
            .ivshmem_window
            .as_ref()
            .ok_or_else(|| Error::Config("this VM has no ivshmem region".into()))?;
        region.set_window(&self.vm, map)?;
        Ok(if map { "mapped" } else { "unmapped" })
    }

    /// Ends the VM here (after a migration): every vCPU leaves.
    pub(crate) fn stop_all(&self) {
        self.stop.store(true, Ordering::Release);
        self.pause.store(false, Ordering::Release);
        for c in &self.cmds {
            let _ = c.send(VcpuCmd::Resume);
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = RunState::Running;
        self.kick_all();
    }

    pub fn resume(&self) {
        // the operator has decided: a failed migration no longer holds it
        if let Some(f) = self
            .failed_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            f.left_paused = false;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.pause.store(false, Ordering::Release);
        for c in &self.cmds {
            let _ = c.send(VcpuCmd::Resume);
        }
        *state = RunState::Running;
    }

    /// Every vCPU's state (each thread reads its own) and the devices'; the
    /// VM must be paused.
    pub(crate) fn save_state(&self) -> Result<(Vec<VcpuState>, snapshot::DeviceState)> {
        let saving = self.request_vcpu_saves()?;
        self.collect_saves(saving)
    }

    /// Asks every (paused) vCPU thread to read its state: they do so at
    /// once and in parallel; `collect_saves` gathers the answers.
    pub(crate) fn request_vcpu_saves(&self) -> Result<Vec<PendingSave>> {
        self.cmds
            .iter()
            .enumerate()
            .map(|(id, c)| {
                let (tx, rx) = std::sync::mpsc::channel();
                c.send(VcpuCmd::Save(tx))
                    .map_err(|_| vcpu_gone(id))
                    .map(|()| rx)
            })
            .collect()
    }

    /// The vCPU states asked for, and the devices' state read meanwhile.
    pub(crate) fn collect_saves(
        &self,
        saving: Vec<PendingSave>,
    ) -> Result<(Vec<VcpuState>, snapshot::DeviceState)> {
        let ivshmem = self
            .ivshmem_device
            .as_ref()
            .map(|d| snapshot::IvshmemState {
                config: d.config_registers(),
                window_open: self.ivshmem_window.as_ref().is_none_or(|r| r.window_open()),
            });
        let devices = snapshot::save_devices(&self.vm, regs_of(&self.com1.state()), ivshmem)?;
        let states = saving
            .into_iter()
            .enumerate()
            .map(|(id, rx)| rx.recv().map_err(|_| vcpu_gone(id))?)
            .collect::<Result<Vec<_>>>()?;
        Ok((states, devices))
    }

    /// Pauses, saves everything to `dir`, and resumes if it was running.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotReport> {
        self.refuse_with_ivshmem()?;
        let was_running = self.state() == RunState::Running;
        let t0 = Instant::now();
        self.pause()?;
        let result = (|| {
            let (states, devices) = self.save_state()?;
            snapshot::write(dir, &self.config, &self.mem, &states, &devices)
        })();
        let paused_ms = t0.elapsed().as_secs_f64() * 1000.0;
        if was_running {
            self.resume();
        }
        let (path, bytes, pages_written, pages_zero) = result?;
        Ok(SnapshotReport {
            path,
            bytes,
            pages_written,
            pages_zero,
            paused_ms,
        })
    }
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn reply(ok: bool, body: serde_json::Value) -> String {
    let mut v = serde_json::json!({ "v": SCHEMA, "ok": ok });
    if let (Some(map), Some(extra)) = (v.as_object_mut(), body.as_object()) {
        map.extend(extra.clone());
    }
    v.to_string()
}

fn handle_request(h: &VmHandle, line: &str, emit: &mut dyn FnMut(String)) -> String {
    let req: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return reply(
                false,
                serde_json::json!({ "error": format!("not a JSON request: {e}") }),
            )
        }
    };
    if req["v"].as_u64() != Some(SCHEMA as u64) {
        return reply(
            false,
            serde_json::json!({ "error": format!("schema version {} is not supported (use {SCHEMA})", req["v"]) }),
        );
    }
    if let Some(cmd @ ("pause" | "resume" | "snapshot")) = req["cmd"].as_str() {
        if let Err(e) = h.refuse_while_migrating(cmd) {
            return reply(false, serde_json::json!({ "error": e.to_string() }));
        }
    }
    match req["cmd"].as_str() {
        Some("status") => reply(true, h.status()),
        Some("pause") => match h.pause() {
            Ok(d) => reply(
                true,
                serde_json::json!({ "state": "paused", "pause_us": d.as_micros() as u64 }),
            ),
            Err(e) => reply(false, serde_json::json!({ "error": e.to_string() })),
        },
        Some("resume") => {
            h.resume();
            reply(true, serde_json::json!({ "state": "running" }))
        }
        Some("snapshot") => match req["to"].as_str() {
            None => reply(
                false,
                serde_json::json!({ "error": "snapshot needs \"to\": a directory" }),
            ),
            Some(dir) => match h.snapshot(Path::new(dir)) {
                Ok(r) => reply(
                    true,
                    serde_json::json!({ "snapshot": r, "state": h.state() }),
                ),
                Err(e) => reply(false, serde_json::json!({ "error": e.to_string() })),
            },
        },
        Some("ivshmem") => match req["window"].as_str() {
            Some(w @ ("map" | "unmap")) => match h.ivshmem_window(w == "map") {
                Ok(state) => reply(true, serde_json::json!({ "window": state })),
                Err(e) => reply(false, serde_json::json!({ "error": e.to_string() })),
            },
            _ => reply(
                false,
                serde_json::json!({ "error": "ivshmem needs \"window\": \"map\" or \"unmap\"" }),
            ),
        },
        Some("migrate") => {
            let Some(to) = req["to"].as_str() else {
                return reply(
                    false,
                    serde_json::json!({ "error": "migrate needs \"to\": unix:PATH or tcp:HOST:PORT" }),
                );
            };
            let token = match req["token_file"].as_str() {
                Some(f) => match crate::migrate::read_token(Path::new(f)) {
                    Ok(t) => Some(t),
                    Err(e) => return reply(false, serde_json::json!({ "error": e.to_string() })),
                },
                None => None,
            };
            let opts = crate::migrate::MigrateOptions {
                token,
                downtime: Duration::from_micros(
                    (req["downtime_ms"].as_f64().unwrap_or(10.0) * 1000.0) as u64,
                ),
                timeout: Duration::from_secs_f64(req["timeout_s"].as_f64().unwrap_or(60.0)),
                force: req["on_timeout"].as_str() == Some("force"),
                bandwidth_limit: req["bandwidth_limit"].as_u64().filter(|&b| b > 0),
                connections: req["connections"].as_u64().unwrap_or(1).clamp(1, 16) as usize,
            };
            if let Err(e) = h.begin_migration(to) {
                return reply(false, serde_json::json!({ "error": e.to_string() }));
            }
            let mut progress = |p: &crate::migrate::Progress| {
                emit(serde_json::json!({ "v": SCHEMA, "progress": p }).to_string());
                if let Some(m) = h
                    .migration
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    m.1 = Some(p.clone());
                }
            };
            let outcome = crate::migrate::migrate(h, to, &opts, &mut progress);
            if let Err(e) = &outcome {
                *h.failed_migration.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(FailedMigration {
                        to: to.to_string(),
                        error: e.to_string(),
                        left_paused: h.state() == RunState::Paused,
                    });
            }
            *h.migration.lock().unwrap_or_else(|e| e.into_inner()) = None;
            match outcome {
                Ok(r) => reply(
                    true,
                    serde_json::json!({ "migration": r, "state": "migrated" }),
                ),
                Err(e) => reply(
                    false,
                    serde_json::json!({ "error": e.to_string(), "state": h.status()["state"] }),
                ),
            }
        }
        Some(other) => reply(
            false,
            serde_json::json!({ "error": format!("unknown command {other:?} (status, pause, resume, snapshot, migrate)") }),
        ),
        None => reply(false, serde_json::json!({ "error": "no \"cmd\"" })),
    }
}

/// Serves the control socket at `path` until the VM stops.
pub fn serve(path: &Path, h: Arc<VmHandle>) -> Result<thread::JoinHandle<()>> {
    let err = |e: std::io::Error| Error::Device(format!("control socket {}: {e}", path.display()));
    if path.exists() {
        // a socket nobody answers on is left over from a VM that died
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Device(format!(
                "control socket {}: another VM is listening there",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // bound under a temporary name, made 0600, then renamed into place: the
    // socket never exists at `path` with wider permissions
    let staging = path.with_file_name(format!(
        ".{}.{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("control"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(err)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&staging, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&staging);
        })
        .map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let owned: PathBuf = path.to_path_buf();
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while !h.stop.load(Ordering::Acquire) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("control socket: {e}");
                        continue;
                    }
                };
                if peer_uid(&stream) != Some(me) {
                    tracing::warn!("control socket: refused a caller that is not uid {me}");
                    let _ = (&stream).write_all(
                        (reply(false, serde_json::json!({"error": "permission denied"})) + "\n")
                            .as_bytes(),
                    );
                    continue;
                }
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut writer = match stream.try_clone() {
                    Ok(w) => w,
                    Err(_) => continue,
                };
                // one thread per caller: a status must answer while a
                // migration blocks another connection
                let h = h.clone();
                let spawned = thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                            if line.trim().is_empty() {
                                continue;
                            }
                            let mut progress_out = writer.try_clone().ok();
                            let mut emit = |l: String| {
                                if let Some(w) = progress_out.as_mut() {
                                    let _ = w.write_all((l + "\n").as_bytes());
                                }
                            };
                            let answer = handle_request(&h, &line, &mut emit);
                            if writer.write_all((answer + "\n").as_bytes()).is_err() {
                                break;
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("control socket: no thread for a caller: {e}");
                }
            }
            let _ = std::fs::remove_file(&owned);
        })
        .map_err(|e| Error::Device(format!("spawning the control thread: {e}")))
}

/// One request to a VM's control socket; the reply as JSON.
pub fn request(
    path: &Path,
    req: serde_json::Value,
) -> std::result::Result<serde_json::Value, String> {
    request_with_progress(path, req, &mut |_| {})
}

/// A request whose reply may be preceded by `{"progress": ...}` lines
/// (migrate): each goes to `progress`; the final reply is returned.
pub fn request_with_progress(
    path: &Path,
    req: serde_json::Value,
    progress: &mut dyn FnMut(&serde_json::Value),
) -> std::result::Result<serde_json::Value, String> {
    let err = |e: &dyn std::fmt::Display| format!("control socket {}: {e}", path.display());
    let mut s = UnixStream::connect(path).map_err(|e| err(&e))?;
    s.write_all((req.to_string() + "\n").as_bytes())
        .map_err(|e| err(&e))?;
    let mut lines = BufReader::new(s);
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).map_err(|e| err(&e))? == 0 {
            return Err(err(&"the VM closed the connection without a reply"));
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| err(&format!("bad reply {line:?}: {e}")))?;
        if v.get("progress").is_some() {
            progress(&v["progress"]);
            continue;
        }
        return Ok(v);
    }
}
