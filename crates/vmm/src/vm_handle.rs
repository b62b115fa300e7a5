//! A running VM's handle, shared by its main thread, its vCPU threads and
//! every control frontend: pause and resume (every vCPU parked outside
//! KVM_RUN, acknowledged), snapshot, status, device controls; what a
//! migration in flight has reached.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmm_sys_util::signal::SIGRTMIN;

use crate::memory::GuestRam;
use crate::snapshot::{self, SnapshotConfig, SnapshotReport, VcpuState};
use crate::{Error, Result};

/// A migration that did not complete.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

/// A completed migration's figures, as this end knows them.
#[derive(Debug, Clone, Default)]
pub struct LastMigration {
    /// "source" or "destination".
    pub role: &'static str,
    pub downtime_ms: f64,
    /// (the source's figures; a destination does not know them)
    pub total_ms: Option<f64>,
    pub bytes: Option<u64>,
    pub rounds: Option<u32>,
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
    /// Every device, by id.
    pub(crate) devices: Arc<crate::device_manager::Devices>,
    /// The disks' images, whose locks a migration hands over.
    pub(crate) disks: Vec<Arc<virtio::disk::DiskImage>>,
    /// The locks went with a hand-over whose outcome is unknown: an
    /// operator's resume takes them back.
    pub(crate) disk_locks_released: AtomicBool,
    pub(crate) config: SnapshotConfig,
    /// The kernel as reports name it ("bundled:NAME" or its path).
    pub(crate) kernel_name: String,
    pub(crate) state: Mutex<RunState>,
    pub(crate) started: Instant,
    /// Set when the guest has moved to another host.
    pub(crate) migrated: Mutex<Option<String>>,
    /// The last migration that failed: where to, why, and whether it left
    /// the guest paused for the operator (its outcome unknown).
    pub(crate) failed_migration: Mutex<Option<FailedMigration>>,
    /// Dirty rings (empty: the per-slot dirty bitmap is used).
    pub(crate) rings: Arc<crate::dirty_ring::DirtyRings>,
    /// Without rings: how the dirty bitmap is protected.
    pub(crate) dirty_manual: crate::dirty_log::ManualProtect,
    /// Each vCPU's exit counts, live.
    pub(crate) live_exits: Vec<Arc<crate::exits::LiveExits>>,
    /// Each vCPU's KVM statistics (exits handled in the kernel too), once
    /// its thread has opened them.
    pub(crate) kvm_stats: Vec<std::sync::OnceLock<Arc<crate::kvm_stats::KvmStats>>>,
    /// The last migration that completed, to or from here: its figures
    /// (metrics).
    pub(crate) last_migration: Mutex<Option<LastMigration>>,
    /// Each vCPU thread's TID, once they run (their CPU times: metrics).
    pub(crate) vcpu_tids: std::sync::OnceLock<Vec<i32>>,
    /// The migration in flight: its destination and last progress.
    pub(crate) migration: Mutex<Option<(String, Option<migration::report::Progress>)>>,
}

impl VmHandle {
    /// Lets the disks' locks go (a migration's source, before GO: the
    /// destination takes them as it starts the guest), their data synced
    /// first (a destination on another host reads it from shared storage).
    pub(crate) fn release_disk_locks(&self) {
        for d in &self.disks {
            if let Err(e) = d.file.sync_data() {
                tracing::warn!("{}: fdatasync before the hand-over: {e}", d.path.display());
            }
            d.unlock();
        }
        self.disk_locks_released
            .store(!self.disks.is_empty(), Ordering::Release);
    }

    /// Takes the disks' locks back (GO could not be sent: the guest runs
    /// on here).
    pub(crate) fn retake_disk_locks(&self) {
        self.disk_locks_released.store(false, Ordering::Release);
        for d in &self.disks {
            if let Err(e) = d.lock() {
                tracing::warn!("{e}; the guest runs on without the image's lock");
            }
        }
    }

    fn kick_all(&self) {
        for &pt in self
            .pthreads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: the VM empties this list (under this lock) before it
            // joins the vCPU threads, so every thread named here is alive;
            // SIGRTMIN has a no-op handler and only makes KVM_RUN return.
            unsafe { libc::pthread_kill(pt, SIGRTMIN()) };
        }
    }

    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a migration's last progress (status shows it).
    pub(crate) fn note_progress(&self, p: &migration::report::Progress) {
        if let Some(m) = self
            .migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            m.1 = Some(p.clone());
        }
    }

    /// A migration to `to` has ended: with `error`, it is remembered as the
    /// last failed one (and whether it left the guest paused).
    pub(crate) fn end_migration(&self, to: &str, error: Option<&Error>) {
        if let Some(e) = error {
            *self
                .failed_migration
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(FailedMigration {
                to: to.to_string(),
                error: e.to_string(),
                left_paused: self.state() == RunState::Paused,
            });
        }
        *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Refuses what must not run beside a migration in flight.
    pub(crate) fn refuse_while_migrating(&self, what: &str) -> Result<()> {
        match &*self.migration.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((to, _)) => Err(Error::Busy(format!(
                "{what}: a migration to {to} is in flight; wait for its outcome"
            ))),
            None => Ok(()),
        }
    }

    /// Marks a migration to `to` in flight, unless one already is.
    pub(crate) fn begin_migration(&self, to: &str) -> Result<()> {
        let mut m = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((other, _)) = &*m {
            return Err(Error::Busy(format!(
                "migrate: a migration to {other} is in flight; wait for its outcome"
            )));
        }
        *m = Some((to.to_string(), None));
        Ok(())
    }

    /// Parks every vCPU outside KVM_RUN; returns how long that took.
    pub fn pause(&self) -> Result<Duration> {
        if self.disk_locks_released.load(Ordering::Acquire) {
            self.retake_disk_locks();
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == RunState::Paused {
            return Ok(Duration::ZERO);
        }
        let t0 = Instant::now();
        let acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        while acks.try_recv().is_ok() {}
        self.pause.store(true, Ordering::Release);
        let mut parked: Vec<u32> = Vec::new();
        while parked.len() < self.cmds.len() {
            if self.stop.load(Ordering::Acquire) {
                return Err(Error::Config("the VM has ended".into()));
            }
            self.kick_all();
            match acks.recv_timeout(Duration::from_millis(1)) {
                Ok(id) => parked.push(id),
                Err(_) if t0.elapsed() > Duration::from_secs(5) => {
                    let stuck = (0..self.cmds.len() as u32)
                        .find(|id| !parked.contains(id))
                        .unwrap_or(0);
                    self.undo_partial_pause(&acks, parked);
                    return Err(Error::Vcpu {
                        id: stuck,
                        why: "did not pause within 5 s; the VM runs on".into(),
                    });
                }
                Err(_) => {}
            }
        }
        // the devices' own threads stop too: what they wrote is then in
        // memory (and in the dirty set) before any state is read
        self.devices.pause();
        *state = RunState::Paused;
        Ok(t0.elapsed())
    }

    /// A pause that failed leaves no vCPU parked and says running (its
    /// state never changed): the flag goes down, the parked vCPUs resume,
    /// and one that parked as the flag went down is resumed too.
    fn undo_partial_pause(&self, acks: &std::sync::mpsc::Receiver<u32>, mut parked: Vec<u32>) {
        self.pause.store(false, Ordering::Release);
        let until = Instant::now() + Duration::from_millis(20);
        while let Ok(id) = acks.recv_timeout(until.saturating_duration_since(Instant::now())) {
            parked.push(id);
        }
        for id in parked {
            if let Some(c) = self.cmds.get(id as usize) {
                let _ = c.send(VcpuCmd::Resume);
            }
        }
    }

    /// A device that cannot be saved or migrated (ivshmem in doorbell
    /// mode) refuses both, with its reason.
    pub(crate) fn refuse_unmovable(&self) -> Result<()> {
        match self.devices.unmovable() {
            Some(why) => Err(Error::Config(why)),
            None => Ok(()),
        }
    }

    /// A device-specific action (ivshmem's window map/unmap); `id` None:
    /// the VM's one device of `kind`.
    pub fn device_control(&self, kind: &str, id: Option<&str>, action: &str) -> Result<String> {
        let id = match id {
            Some(id) => id.to_string(),
            None => match self.devices.of_kind(kind).as_slice() {
                [one] => one.clone(),
                [] => return Err(Error::Config(format!("this VM has no {kind} device"))),
                many => {
                    return Err(Error::Config(format!(
                        "this VM has {} {kind} devices ({}): name one",
                        many.len(),
                        many.join(", ")
                    )))
                }
            },
        };
        self.devices.control(&id, action)
    }

    /// Notes a completed migration's figures.
    pub fn note_migration(&self, m: LastMigration) {
        *self
            .last_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(m);
    }

    /// Ends the VM (the REST API's vm.shutdown): every vCPU leaves, the
    /// VM's run returns.
    pub fn shutdown(&self) {
        self.stop_all();
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
        if *state == RunState::Paused {
            self.devices.resume();
        }
        self.pause.store(false, Ordering::Release);
        for c in &self.cmds {
            let _ = c.send(VcpuCmd::Resume);
        }
        *state = RunState::Running;
    }

    /// Every vCPU's state (each thread reads its own) and the devices'; the
    /// VM must be paused.
    pub(crate) fn save_state(&self) -> Result<(Vec<VcpuState>, snapshot::MachineState)> {
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
    ) -> Result<(Vec<VcpuState>, snapshot::MachineState)> {
        let machine = snapshot::MachineState {
            vm: snapshot::save_vm_state(&self.vm)?,
            devices: self.devices.save(),
        };
        let states = saving
            .into_iter()
            .enumerate()
            .map(|(id, rx)| rx.recv().map_err(|_| vcpu_gone(id))?)
            .collect::<Result<Vec<_>>>()?;
        Ok((states, machine))
    }

    /// Pauses, saves everything to `dir`, and resumes if it was running.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotReport> {
        self.refuse_unmovable()?;
        let was_running = self.state() == RunState::Running;
        let t0 = Instant::now();
        self.pause()?;
        let result = (|| {
            let (states, machine) = self.save_state()?;
            snapshot::write(dir, &self.config, &self.mem, &states, &machine)
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
