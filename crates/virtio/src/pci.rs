//! The modern virtio-pci transport (virtio 1.2, section 4.1.4), modern
//! only: vendor capabilities for the common configuration, notifications,
//! ISR and device configuration in BAR 4 (64-bit memory), the
//! PCI-configuration-access capability, and MSI-X in BAR 1 (one vector per
//! queue and one for configuration changes).
//!
//! The guest is untrusted: a queue is taken only when its size is a power
//! of two no larger than the device's maximum and its rings are aligned
//! and inside guest memory (virtio-queue's checks); features the device
//! did not offer are refused FEATURES_OK; a register access of the wrong
//! width or past a region is ignored (reads return zeros).

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use devices::msix::Msix;
use devices::pci::{BarObserver, ConfigSpace, PciFunction};
use devices::BusDevice;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::{status, ActiveQueue, Interrupt, VirtioDevice};

/// The BAR holding the virtio regions, and its layout.
pub const VIRTIO_BAR: usize = 4;
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
pub const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Queue q is notified at NOTIFY_OFFSET + q * NOTIFY_MULTIPLIER.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// The BAR holding the MSI-X table.
pub const MSIX_BAR: usize = 1;
pub const NO_VECTOR: u16 = 0xffff;
/// PCI device IDs of modern virtio devices: 0x1040 + device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u32 = 1;
const CFG_NOTIFY: u32 = 2;
const CFG_ISR: u32 = 3;
const CFG_DEVICE: u32 = 4;
const CFG_PCI: u32 = 5;

/// Interrupts through MSI-X vectors (each an eventfd the VMM made an irqfd
/// of); while MSI-X is off, vector 0's eventfd is the legacy line.
pub struct VectorInterrupt {
    vectors: Vec<EventFd>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
    msix: Arc<Msix>,
    pub sent: AtomicU64,
}

impl VectorInterrupt {
    fn raise(&self, vector: u16, isr_bit: u8) {
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        let evt = if self.msix.enabled() {
            self.vectors.get(vector as usize)
        } else {
            self.vectors.first()
        };
        if let Some(evt) = evt {
            let _ = evt.write(1);
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Interrupt for VectorInterrupt {
    fn queue(&self, index: u16) {
        let v = self
            .queue_vectors
            .get(index as usize)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.raise(v, 1);
    }

    fn config(&self) {
        self.raise(self.config_vector.load(Ordering::Acquire), 2);
    }

    /// The queue's MSI-X vector's eventfd (the VMM made an irqfd of it):
    /// what `raise` writes, less the ISR bit MSI-X does not use.
    fn queue_eventfd(&self, index: u16) -> Option<EventFd> {
        if !self.msix.enabled() {
            return None;
        }
        let v = self
            .queue_vectors
            .get(index as usize)?
            .load(Ordering::Acquire);
        self.vectors.get(v as usize)?.try_clone().ok()
    }
}

/// The transport's registers and queues.
struct Common {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    enabled: Vec<bool>,
    kicks: Vec<Option<EventFd>>,
    active: bool,
    /// Stopped by a pause (the VM's): its queues wait here, positions kept.
    paused: bool,
}

/// One queue as a saved state holds it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub enabled: bool,
    pub vector: u16,
}

/// A virtio-pci device's state: its configuration space, MSI-X table,
/// transport registers, every queue (addresses and positions) and the
/// device's own bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub config: Vec<u32>,
    pub msix: Vec<[u32; 4]>,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub config_vector: u16,
    pub isr: u8,
    pub queues: Vec<QueueSnapshot>,
    pub device: Vec<u8>,
    /// The device was running (DRIVER_OK, activated) when saved.
    pub running: bool,
}

/// A virtio device on PCI.
pub struct VirtioPci<M> {
    name: String,
    config: ConfigSpace,
    /// The PCI configuration-access capability's offset.
    pci_cfg_cap: u8,
    msix_cap: u8,
    pub msix: Arc<Msix>,
    device: Mutex<Box<dyn VirtioDevice<M>>>,
    features: u64,
    common: Mutex<Common>,
    interrupt: Arc<VectorInterrupt>,
    mem: M,
    bar_observer: std::sync::OnceLock<Arc<dyn BarObserver>>,
    /// Chains or queues refused, and accesses ignored (counted).
    pub refused: AtomicU64,
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn put(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(i).copied().unwrap_or(0);
    }
}

impl<M: GuestMemory + Clone + Send + Sync + 'static> VirtioPci<M> {
    /// `device` on PCI, its virtio BAR at `bar4`, its MSI-X table (BAR 1) at
    /// `bar1`; `vectors`: one eventfd per MSI-X vector (queues + 1).
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        bar1: u64,
        bar4: u64,
        vectors: Vec<EventFd>,
        legacy_pin: u8,
    ) -> Result<Self, String> {
        let sizes = device.queue_max_sizes();
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|e| format!("{name}: queue of {s}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        let id = DEVICE_ID_BASE + device.device_type();
        // class: network controller (others: 0xff "unclassified")
        let class = if device.device_type() == 1 {
            0x02_00_00
        } else {
            0xff_00_00
        };
        let mut config = ConfigSpace::new(0x1af4, id, class, 1);
        config.set_bar(MSIX_BAR, bar1, devices::msix::BAR_SIZE, false, false);
        config.set_bar(VIRTIO_BAR, bar4, VIRTIO_BAR_SIZE, true, false);
        // interrupt pin INTA, on the IOAPIC pin the VMM routes it to
        config.set_register(0x3c, (1 << 8) | legacy_pin as u32);
        let msix = Arc::new(Msix::new(vectors.len() as u16));
        let (body, writable) = msix.capability(MSIX_BAR as u8);
        let msix_cap = config.add_capability(devices::msix::CAP_ID, &body, &writable);
        let cap = |cfg_type: u32, offset: u64, len: u64| -> [u32; 4] {
            [
                (16 << 16) | (cfg_type << 24),
                VIRTIO_BAR as u32,
                offset as u32,
                len as u32,
            ]
        };
        config.add_capability(CAP_VENDOR, &cap(CFG_COMMON, COMMON_OFFSET, COMMON_LEN), &[]);
        let notify_len = sizes.len() as u64 * NOTIFY_MULTIPLIER as u64;
        let n = cap(CFG_NOTIFY, NOTIFY_OFFSET, notify_len);
        config.add_capability(
            CAP_VENDOR,
            &[
                (20 << 16) | (CFG_NOTIFY << 24),
                n[1],
                n[2],
                n[3],
                NOTIFY_MULTIPLIER,
            ],
            &[],
        );
        config.add_capability(CAP_VENDOR, &cap(CFG_ISR, ISR_OFFSET, 1), &[]);
        config.add_capability(CAP_VENDOR, &cap(CFG_DEVICE, DEVICE_OFFSET, DEVICE_LEN), &[]);
        // PCI configuration access: bar, offset, length and the data
        // window are the driver's to write
        let pci_cfg_cap = config.add_capability(
            CAP_VENDOR,
            &[(20 << 16) | (CFG_PCI << 24), 0, 0, 0, 0],
            &[0, 0xff, u32::MAX, u32::MAX, u32::MAX],
        );
        let interrupt = Arc::new(VectorInterrupt {
            vectors,
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: sizes.iter().map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            isr: AtomicU8::new(0),
            msix: msix.clone(),
            sent: AtomicU64::new(0),
        });
        let features = device.features();
        let n = queues.len();
        Ok(VirtioPci {
            name: name.to_string(),
            config,
            pci_cfg_cap,
            msix_cap,
            msix,
            device: Mutex::new(device),
            features,
            common: Mutex::new(Common {
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                status: 0,
                config_generation: 0,
                queue_select: 0,
                queues,
                enabled: vec![false; n],
                kicks: (0..n)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).ok())
                    .collect(),
                active: false,
                paused: false,
            }),
            interrupt,
            mem,
            bar_observer: std::sync::OnceLock::new(),
            refused: AtomicU64::new(0),
        })
    }

    /// Each queue's kick eventfd (the VMM registers them as ioeventfds at
    /// the virtio BAR + NOTIFY_OFFSET + q * NOTIFY_MULTIPLIER).
    pub fn kick_fds(&self) -> Vec<(u16, EventFd)> {
        let c = self.lock();
        c.kicks
            .iter()
            .enumerate()
            .filter_map(|(q, k)| Some((q as u16, k.as_ref()?.try_clone().ok()?)))
            .collect()
    }

    pub fn set_bar_observer(&self, o: Arc<dyn BarObserver>) {
        let _ = self.bar_observer.set(o);
    }

    /// Interrupts sent.
    pub fn interrupts_sent(&self) -> u64 {
        self.interrupt.sent.load(Ordering::Relaxed)
    }

    /// The device's own threads.
    pub fn threads(&self) -> Vec<devices::state::DeviceThread> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .threads()
    }

    /// The device's counters, and the transport's.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut c = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters();
        c.push(("interrupts", self.interrupts_sent()));
        c.push(("refused", self.refused.load(Ordering::Relaxed)));
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Common> {
        self.common.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, why: std::fmt::Arguments) {
        if self.refused.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!("{}: {why} (logged once, counted)", self.name);
        }
    }

    /// Stops the device and puts its queues back here, as it left them.
    fn stop_device(&self, c: &mut Common) {
        let returned = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
        let enabled: Vec<usize> = (0..c.queues.len()).filter(|&i| c.enabled[i]).collect();
        if returned.len() != enabled.len() {
            // the device lost its queues (its thread ended badly): their
            // positions are gone, so going on would repeat or lose work
            self.refuse(format_args!(
                "the device gave back {} of its {} queues; it needs a reset",
                returned.len(),
                enabled.len()
            ));
            c.status |= status::NEEDS_RESET;
        }
        for (i, aq) in enabled.into_iter().zip(returned) {
            c.queues[i] = aq.queue;
            c.kicks[i] = Some(aq.kick);
        }
        c.active = false;
    }

    /// Device reset: the device stops first (nothing touches the old rings
    /// after this returns), then every register goes back.
    fn reset(&self, c: &mut Common) {
        if c.active {
            self.stop_device(c);
        }
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .driver_reset();
        c.paused = false;
        for q in &mut c.queues {
            q.reset();
        }
        c.enabled.iter_mut().for_each(|e| *e = false);
        c.status = 0;
        c.driver_features = 0;
        c.device_feature_select = 0;
        c.driver_feature_select = 0;
        c.queue_select = 0;
        self.interrupt.isr.store(0, Ordering::Release);
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }

    /// The VM pauses: the device stops touching guest memory; its queues'
    /// positions are kept for `resume` (or a saved state).
    pub fn pause(&self) {
        let mut c = self.lock();
        if c.active {
            self.stop_device(&mut c);
            c.paused = true;
        }
    }

    /// The VM resumes: a device stopped by `pause` goes on where it was.
    pub fn resume(&self) {
        let mut c = self.lock();
        if c.paused {
            c.paused = false;
            if let Err(e) = self.activate(&mut c) {
                self.refuse(format_args!("resuming: {e}; the device needs a reset"));
                c.status |= status::NEEDS_RESET;
                self.interrupt.config();
            }
        }
    }

    /// The device's outside writers' dirty log, on or off (migration).
    pub fn dirty_log(&self, on: bool) -> Result<(), String> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dirty_log(on)
    }

    /// The pages the device's outside writers logged since the last call.
    pub fn harvest_dirty(&self, mark: &mut dyn FnMut(u64, u64)) -> u64 {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .harvest_dirty(mark)
    }

    /// A device-specific action; a configuration change is signalled to
    /// the driver (config generation, configuration interrupt).
    pub fn control(&self, action: &str) -> Result<String, String> {
        let changed = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .control(action)?;
        if changed {
            let mut c = self.lock();
            c.config_generation = c.config_generation.wrapping_add(1);
            drop(c);
            self.interrupt.config();
        }
        Ok(format!("{} {action}", self.name))
    }

    /// The transport's and the device's state. The device must be stopped
    /// (paused, or never started): its queue positions are then final.
    pub fn save_state(&self) -> VirtioPciState {
        let c = self.lock();
        let device = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        VirtioPciState {
            config: self.config.registers(),
            msix: self.msix.entries(),
            device_feature_select: c.device_feature_select,
            driver_feature_select: c.driver_feature_select,
            driver_features: c.driver_features,
            status: c.status,
            config_generation: c.config_generation,
            queue_select: c.queue_select,
            config_vector: self.interrupt.config_vector.load(Ordering::Acquire),
            isr: self.interrupt.isr.load(Ordering::Acquire),
            queues: c
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueSnapshot {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                    enabled: c.enabled[i],
                    vector: self.interrupt.queue_vectors[i].load(Ordering::Acquire),
                })
                .collect(),
            device,
            running: c.active || c.paused,
        }
    }

    /// Checks a saved state against this device without taking it.
    pub fn check_state(&self, s: &VirtioPciState) -> Result<(), (&'static str, String, String)> {
        let c = self.lock();
        if s.config.len() != 64 {
            return Err((
                "config",
                format!("{} registers", s.config.len()),
                "a configuration space has 64".into(),
            ));
        }
        if s.msix.len() != self.msix.vectors() as usize {
            return Err((
                "msix",
                format!("{} entries", s.msix.len()),
                format!("this device has {}", self.msix.vectors()),
            ));
        }
        if s.queues.len() != c.queues.len() {
            return Err((
                "queues",
                s.queues.len().to_string(),
                format!("this device has {}", c.queues.len()),
            ));
        }
        if s.driver_features & !self.features != 0 {
            return Err((
                "driver_features",
                format!("{:#x}", s.driver_features),
                format!("this device offers {:#x}", self.features),
            ));
        }
        if s.running && s.status & status::DRIVER_OK == 0 {
            return Err((
                "running",
                "true".into(),
                format!("the device status {:#x} has no DRIVER_OK", s.status),
            ));
        }
        let vector_ok = |v: u16| v == NO_VECTOR || v < self.msix.vectors();
        if !vector_ok(s.config_vector) {
            return Err((
                "config_vector",
                s.config_vector.to_string(),
                "beyond the MSI-X table".into(),
            ));
        }
        for (i, (q, max)) in s
            .queues
            .iter()
            .zip(c.queues.iter().map(|q| q.max_size()))
            .enumerate()
        {
            if q.size > max || (q.size != 0 && !q.size.is_power_of_two()) {
                return Err((
                    "queues.size",
                    format!("queue {i}: {}", q.size),
                    format!("a power of two up to {max}"),
                ));
            }
            if !vector_ok(q.vector) {
                return Err((
                    "queues.vector",
                    format!("queue {i}: {}", q.vector),
                    "beyond the MSI-X table".into(),
                ));
            }
        }
        Ok(())
    }

    /// Takes a checked state: registers, MSI-X table, queues, the device's
    /// own state; a device that was running starts again.
    pub fn restore_state(&self, s: VirtioPciState) -> Result<(), String> {
        // configuration space as the guest's own writes would put it (BARs
        // first, so what backs them moves), then MSI-X's table
        let order = (4..10).chain(1..4).chain(10..s.config.len().min(64));
        let data_window = (self.pci_cfg_cap as usize + 16) / 4;
        for i in order.filter(|&i| i != data_window) {
            if let Some(v) = s.config.get(i) {
                self.config_write((i * 4) as u8, 0, &v.to_le_bytes());
            }
        }
        self.msix.restore_entries(&s.msix)?;
        let mut c = self.lock();
        if c.active {
            self.stop_device(&mut c);
        }
        c.device_feature_select = s.device_feature_select;
        c.driver_feature_select = s.driver_feature_select;
        c.driver_features = s.driver_features;
        c.status = s.status;
        c.config_generation = s.config_generation;
        c.queue_select = s.queue_select;
        self.interrupt
            .config_vector
            .store(s.config_vector, Ordering::Release);
        self.interrupt.isr.store(s.isr, Ordering::Release);
        for (i, q) in s.queues.iter().enumerate() {
            let max = c.queues[i].max_size();
            let state = virtio_queue::QueueState {
                max_size: max,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: if q.size == 0 { max } else { q.size },
                ready: q.ready,
                desc_table: q.desc,
                avail_ring: q.avail,
                used_ring: q.used,
            };
            c.queues[i] = Queue::try_from(state).map_err(|e| format!("queue {i}: {e:?}"))?;
            c.enabled[i] = q.enabled;
            self.interrupt.queue_vectors[i].store(q.vector, Ordering::Release);
        }
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_state(&s.device)?;
        // a device that ran starts again when the VM does (resume), not
        // before: a migration's destination must not touch guest memory or
        // raise interrupts before the hand-over is committed
        c.paused = s.running;
        Ok(())
    }

    fn set_status(&self, c: &mut Common, v: u8) {
        if v == 0 {
            self.reset(c);
            return;
        }
        let mut v = v;
        if v & status::FEATURES_OK != 0 && c.status & status::FEATURES_OK == 0 {
            let unoffered = c.driver_features & !self.features;
            if unoffered != 0 || c.driver_features & crate::F_VERSION_1 == 0 {
                self.refuse(format_args!(
                    "the driver accepted features {:#x} the device did not offer, or not VERSION_1: FEATURES_OK refused",
                    unoffered
                ));
                v &= !status::FEATURES_OK;
            }
        }
        if v & status::DRIVER_OK != 0 && !c.active && v & status::FEATURES_OK != 0 {
            if let Err(e) = self.activate(c) {
                self.refuse(format_args!("activation: {e}; the device needs a reset"));
                v |= status::NEEDS_RESET;
                // (2.1.2: the driver is told by a configuration change)
                self.interrupt.config();
            }
        }
        c.status = v;
    }

    /// Validates the enabled queues and starts the device with them.
    fn activate(&self, c: &mut Common) -> Result<(), String> {
        let event_idx = c.driver_features & crate::F_RING_EVENT_IDX != 0;
        let mut taken = Vec::new();
        for (i, q) in c.queues.iter_mut().enumerate() {
            if !c.enabled[i] {
                continue;
            }
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i}: size {} or its rings (desc {:#x}, avail {:#x}, used {:#x}) are not valid",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                ));
            }
        }
        for (i, q) in c.queues.iter().enumerate() {
            if !c.enabled[i] {
                continue;
            }
            let kick = c.kicks[i]
                .as_ref()
                .and_then(|k| k.try_clone().ok())
                .ok_or_else(|| format!("queue {i}: no kick eventfd"))?;
            let queue = Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e:?}"))?;
            taken.push(ActiveQueue { queue, kick });
        }
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .activate(
                self.mem.clone(),
                self.interrupt.clone(),
                taken,
                c.driver_features,
            )?;
        c.active = true;
        Ok(())
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let c = self.lock();
        let q = c.queues.get(c.queue_select as usize);
        let v: u64 = match (offset, data.len()) {
            (0x00, 4) => c.device_feature_select as u64,
            (0x04, 4) => match c.device_feature_select {
                0 => self.features & 0xffff_ffff,
                1 => self.features >> 32,
                _ => 0,
            },
            (0x08, 4) => c.driver_feature_select as u64,
            (0x0c, 4) => match c.driver_feature_select {
                0 => c.driver_features & 0xffff_ffff,
                1 => c.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => self.interrupt.config_vector.load(Ordering::Acquire) as u64,
            (0x12, 2) => c.queues.len() as u64,
            (0x14, 1) => c.status as u64,
            (0x15, 1) => c.config_generation as u64,
            (0x16, 2) => c.queue_select as u64,
            (0x18, 2) => q.map_or(0, |q| q.size() as u64),
            (0x1a, 2) => self
                .interrupt
                .queue_vectors
                .get(c.queue_select as usize)
                .map_or(NO_VECTOR as u64, |v| v.load(Ordering::Acquire) as u64),
            (0x1c, 2) => c
                .enabled
                .get(c.queue_select as usize)
                .map_or(0, |&e| e as u64),
            (0x1e, 2) => q.map_or(0, |_| c.queue_select as u64),
            (0x20, 8) => q.map_or(0, |q| q.desc_table()),
            (0x28, 8) => q.map_or(0, |q| q.avail_ring()),
            (0x30, 8) => q.map_or(0, |q| q.used_ring()),
            (0x20, 4) => q.map_or(0, |q| q.desc_table() & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc_table() >> 32),
            (0x28, 4) => q.map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail_ring() >> 32),
            (0x30, 4) => q.map_or(0, |q| q.used_ring() & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        put(data, v);
    }

    fn common_write(&self, offset: u64, data: &[u8]) {
        let v = le(data);
        let mut c = self.lock();
        let qs = c.queue_select as usize;
        // queue registers change only before the device runs
        let queue_writable = !c.active && qs < c.queues.len() && !c.enabled[qs];
        match (offset, data.len()) {
            (0x00, 4) => c.device_feature_select = v as u32,
            (0x08, 4) => c.driver_feature_select = v as u32,
            (0x0c, 4) if c.status & status::FEATURES_OK == 0 => match c.driver_feature_select {
                0 => c.driver_features = (c.driver_features & !0xffff_ffff) | v,
                1 => c.driver_features = (c.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            (0x10, 2) => {
                let vec = self.vector_or_none(v as u16);
                self.interrupt.config_vector.store(vec, Ordering::Release);
            }
            (0x14, 1) => self.set_status(&mut c, v as u8),
            (0x16, 2) => c.queue_select = v as u16,
            (0x18, 2) if queue_writable => {
                let max = c.queues[qs].max_size();
                if v == 0 || !(v as u16).is_power_of_two() || v > max as u64 {
                    self.refuse(format_args!(
                        "queue {qs}: size {v} is not a power of two up to {max}: ignored"
                    ));
                } else {
                    c.queues[qs].set_size(v as u16);
                }
            }
            (0x1a, 2) => {
                let vec = self.vector_or_none(v as u16);
                if let Some(q) = self.interrupt.queue_vectors.get(qs) {
                    q.store(vec, Ordering::Release);
                }
            }
            (0x1c, 2) if queue_writable && v == 1 => c.enabled[qs] = true,
            (0x20, 4) if queue_writable => {
                c.queues[qs].set_desc_table_address(Some(v as u32), None)
            }
            (0x24, 4) if queue_writable => {
                c.queues[qs].set_desc_table_address(None, Some(v as u32))
            }
            (0x28, 4) if queue_writable => {
                c.queues[qs].set_avail_ring_address(Some(v as u32), None)
            }
            (0x2c, 4) if queue_writable => {
                c.queues[qs].set_avail_ring_address(None, Some(v as u32))
            }
            (0x30, 4) if queue_writable => c.queues[qs].set_used_ring_address(Some(v as u32), None),
            (0x34, 4) if queue_writable => c.queues[qs].set_used_ring_address(None, Some(v as u32)),
            _ => self.refuse(format_args!(
                "a {}-byte write of {v:#x} at common configuration offset {offset:#x} ignored",
                data.len()
            )),
        }
    }

    /// A vector beyond the table reads back NO_VECTOR.
    fn vector_or_none(&self, v: u16) -> u16 {
        if v < self.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// An access to the virtio BAR at `offset`.
    fn bar_access(&self, offset: u64, read: Option<&mut [u8]>, write: Option<&[u8]>) {
        match (offset, read, write) {
            (o, Some(d), _) if o < COMMON_OFFSET + COMMON_LEN => self.common_read(o, d),
            (o, _, Some(d)) if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o, d),
            (ISR_OFFSET, Some(d), _) => {
                // reading ISR clears it
                put(d, self.interrupt.isr.swap(0, Ordering::AcqRel) as u64)
            }
            (o, Some(d), _) if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => self
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_config(o - DEVICE_OFFSET, d),
            (o, _, Some(d)) if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => self
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_config(o - DEVICE_OFFSET, d),
            (o, _, Some(_)) if o >= NOTIFY_OFFSET => {
                // a notification the ioeventfd did not take (the BAR was
                // being moved): passed on by hand
                let q = (o - NOTIFY_OFFSET) / NOTIFY_MULTIPLIER as u64;
                if let Some(Some(k)) = self.lock().kicks.get(q as usize) {
                    let _ = k.write(1);
                }
            }
            (_, Some(d), _) => d.fill(0),
            _ => {}
        }
    }
}

/// The virtio BAR as the bus sees it.
pub struct VirtioBar<M>(pub Arc<VirtioPci<M>>);

impl<M: GuestMemory + Clone + Send + Sync + 'static> BusDevice for VirtioBar<M> {
    fn name(&self) -> &str {
        &self.0.name
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.bar_access(offset, Some(data), None)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.bar_access(offset, None, Some(data))
    }
}

impl<M: GuestMemory + Clone + Send + Sync + 'static> PciFunction for VirtioPci<M> {
    fn name(&self) -> &str {
        &self.name
    }

    fn config_read(&self, reg: u8) -> u32 {
        let cap = self.pci_cfg_cap;
        if reg == cap + 16 {
            // the configuration-access window: a read through the BAR
            // the capability names
            let (bar, off, len) = self.pci_cfg_target();
            let mut d = [0u8; 4];
            if bar == VIRTIO_BAR as u32 && matches!(len, 1 | 2 | 4) {
                self.bar_access(off as u64, Some(&mut d[..len as usize]), None);
            }
            return u32::from_le_bytes(d);
        }
        self.config.read(reg)
    }

    fn config_write(&self, reg: u8, offset: u8, data: &[u8]) {
        let cap = self.pci_cfg_cap;
        if reg == cap + 16 {
            let (bar, off, len) = self.pci_cfg_target();
            if bar == VIRTIO_BAR as u32 && matches!(len, 1 | 2 | 4) && offset == 0 {
                let n = (len as usize).min(data.len());
                self.bar_access(off as u64, None, Some(&data[..n]));
            }
            return;
        }
        self.config
            .write_observed(reg, offset, data, self.bar_observer.get());
        if reg & !3 == self.msix_cap {
            self.msix
                .control_written((self.config.read(self.msix_cap) >> 16) as u16);
        }
    }
}

impl<M> VirtioPci<M> {
    /// The configuration-access capability's target: BAR, offset, length.
    fn pci_cfg_target(&self) -> (u32, u32, u32) {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read(cap + 4) & 0xff;
        let off = self.config.read(cap + 8);
        let len = self.config.read(cap + 12);
        (bar, off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    struct Dummy {
        activated: Arc<AtomicU64>,
    }

    impl VirtioDevice<GuestMemoryMmap> for Dummy {
        fn device_type(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            crate::F_VERSION_1 | 1 << 5
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![64, 64]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            put(data, offset);
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: Arc<dyn Interrupt>,
            queues: Vec<ActiveQueue>,
            _: u64,
        ) -> Result<(), String> {
            self.activated.store(queues.len() as u64, Ordering::Release);
            Ok(())
        }
        fn reset(&mut self) -> Vec<ActiveQueue> {
            Vec::new()
        }
    }

    fn dev() -> (Arc<VirtioPci<GuestMemoryMmap>>, Arc<AtomicU64>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let activated = Arc::new(AtomicU64::new(0));
        let d = VirtioPci::new(
            "virtio-test",
            Box::new(Dummy {
                activated: activated.clone(),
            }),
            mem,
            0xe000_0000,
            0xe000_4000,
            (0..3).map(|_| EventFd::new(0).unwrap()).collect(),
            5,
        )
        .unwrap();
        (Arc::new(d), activated)
    }

    fn w(d: &VirtioPci<GuestMemoryMmap>, off: u64, v: u64, len: usize) {
        d.bar_access(off, None, Some(&v.to_le_bytes()[..len]));
    }

    fn r(d: &VirtioPci<GuestMemoryMmap>, off: u64, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        d.bar_access(off, Some(&mut b), None);
        le(&b)
    }

    fn set_up_queue(d: &VirtioPci<GuestMemoryMmap>, q: u64, base: u64) {
        w(d, 0x16, q, 2);
        w(d, 0x18, 16, 2);
        w(d, 0x20, base, 4);
        w(d, 0x28, base + 0x1000, 4);
        w(d, 0x30, base + 0x2000, 4);
        w(d, 0x1c, 1, 2);
    }

    #[test]
    fn a_driver_goes_through_the_initialisation_and_the_device_activates() {
        let (d, activated) = dev();
        assert_eq!(d.config_read(0) >> 16, 0x1041);
        w(&d, 0x14, 1 | 2, 1);
        w(&d, 0x00, 1, 4);
        assert_eq!(r(&d, 0x04, 4), 1, "VERSION_1 in the high half");
        w(&d, 0x08, 1, 4);
        w(&d, 0x0c, 1, 4);
        w(&d, 0x08, 0, 4);
        w(&d, 0x0c, 1 << 5, 4);
        w(&d, 0x14, 1 | 2 | 8, 1);
        assert_eq!(r(&d, 0x14, 1) & 8, 8, "FEATURES_OK taken");
        set_up_queue(&d, 0, 0x10000);
        set_up_queue(&d, 1, 0x20000);
        w(&d, 0x1a, 1, 2);
        assert_eq!(r(&d, 0x1a, 2), 1);
        w(&d, 0x1a, 7, 2);
        assert_eq!(
            r(&d, 0x1a, 2),
            NO_VECTOR as u64,
            "a vector beyond the table"
        );
        w(&d, 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(activated.load(Ordering::Acquire), 2);
        // reset reads back 0
        w(&d, 0x14, 0, 1);
        assert_eq!(r(&d, 0x14, 1), 0);
        assert_eq!(r(&d, 0x18, 2), 64, "queue size back to its maximum");
    }

    #[test]
    fn an_unoffered_feature_is_refused_features_ok() {
        let (d, _) = dev();
        w(&d, 0x14, 3, 1);
        w(&d, 0x08, 1, 4);
        w(&d, 0x0c, 1 | 2, 4); // VERSION_1 and an unoffered bit 33
        w(&d, 0x14, 3 | 8, 1);
        assert_eq!(r(&d, 0x14, 1) & 8, 0);
        assert_eq!(d.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bad_queues_are_refused_and_never_activated() {
        let (d, activated) = dev();
        w(&d, 0x14, 3, 1);
        w(&d, 0x08, 1, 4);
        w(&d, 0x0c, 1, 4);
        w(&d, 0x14, 3 | 8, 1);
        w(&d, 0x16, 0, 2);
        w(&d, 0x18, 3, 2); // not a power of two: ignored
        assert_eq!(r(&d, 0x18, 2), 64);
        w(&d, 0x18, 128, 2); // above the maximum: ignored
        assert_eq!(r(&d, 0x18, 2), 64);
        // rings outside guest memory
        w(&d, 0x20, 0xfff0_0000, 4);
        w(&d, 0x1c, 1, 2);
        w(&d, 0x14, 3 | 8 | 4, 1);
        assert_eq!(activated.load(Ordering::Acquire), 0);
        assert_ne!(r(&d, 0x14, 1) & status::NEEDS_RESET as u64, 0);
        // odd accesses are ignored, the device keeps answering
        w(&d, 0x13, 5, 1);
        assert_eq!(r(&d, 0x0fff, 1), 0);
    }

    #[test]
    fn the_configuration_access_capability_reaches_the_bar() {
        let (d, _) = dev();
        let cap = d.pci_cfg_cap;
        d.config_write(cap + 4, 0, &[VIRTIO_BAR as u8]);
        d.config_write(cap + 8, 0, &0x12u32.to_le_bytes()); // num_queues
        d.config_write(cap + 12, 0, &2u32.to_le_bytes());
        assert_eq!(d.config_read(cap + 16) & 0xffff, 2);
    }
}
