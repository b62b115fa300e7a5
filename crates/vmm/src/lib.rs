//! A VM's life on KVM: guest memory, vCPUs with real-time settings and exit
//! accounting, the in-kernel irqchip and PIT, boot (PVH and bzImage), and the
//! legacy devices on the I/O bus.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod clock;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod dirty_log;
pub mod dirty_ring;
pub mod doorbell;
pub mod exits;
pub mod fault;
pub mod irq_bench;
pub mod irq_routes;
pub mod ivshmem;
pub mod kvm_stats;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod migrate;
pub mod page_walk;
pub mod receive;
pub mod shared_region;
pub mod snapshot;
pub mod vcpu;
pub mod virtio_blk;
pub mod virtio_net;
pub mod virtio_pci;
pub mod virtio_rng;
pub mod virtio_vsock;
pub mod vm;
pub mod vm_handle;
pub mod zero_page;

pub use boot::BootProtocol;
pub use config::VmConfig;
pub use memory::HugePageSize;
pub use vm::{ConsoleSink, RunReport, StopReason, Vm, VmSpec};

/// Errors from building or running a VM. Each names what was at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    /// Not now: something in flight (a migration) forbids it; retry later.
    #[error("{0}")]
    Busy(String),
    #[error("KVM: {0}")]
    Kvm(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("kernel image {path}: {why}")]
    Kernel { path: String, why: String },
    #[error("initrd {path}: {why}")]
    Initrd { path: String, why: String },
    #[error("boot: {0}")]
    Boot(String),
    #[error("real-time setting {0}")]
    Rt(String),
    #[error("device: {0}")]
    Device(String),
    #[error(transparent)]
    DeviceState(#[from] devices::StateError),
    #[error("vCPU {id}: {why}")]
    Vcpu { id: u32, why: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A real-time or platform setting as it was applied at start, or why not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Setting {
    pub name: String,
    pub applied: bool,
    pub detail: String,
}

impl Setting {
    pub fn applied(name: &str, detail: impl Into<String>) -> Self {
        Setting {
            name: name.to_string(),
            applied: true,
            detail: detail.into(),
        }
    }

    /// Records the outcome of applying a setting: `Ok(detail)` as applied,
    /// `Err(why)` through [`Setting::fail`].
    pub fn record(
        settings: &mut Vec<Setting>,
        name: &str,
        outcome: std::result::Result<String, String>,
        best_effort: bool,
    ) -> Result<()> {
        match outcome {
            Ok(detail) => {
                settings.push(Setting::applied(name, detail));
                Ok(())
            }
            Err(why) => Setting::fail(settings, name, why, best_effort),
        }
    }

    /// Records a failure: an error, unless `best_effort`, when it is only
    /// reported and the VM goes on without the setting.
    pub fn fail(
        settings: &mut Vec<Setting>,
        name: &str,
        why: String,
        best_effort: bool,
    ) -> Result<()> {
        if !best_effort {
            return Err(Error::Rt(format!(
                "{name}: {why} (or pass --rt-best-effort to go on without it)"
            )));
        }
        tracing::warn!("{name} not applied: {why}");
        settings.push(Setting {
            name: name.to_string(),
            applied: false,
            detail: why,
        });
        Ok(())
    }
}
