//! Emulated devices of nfvisor and the bus that routes guest port and MMIO
//! accesses to them.

pub mod bus;
pub mod debug_exit;
pub mod dma_probe;
pub mod ivshmem;
pub mod ivshmem_proto;
pub mod latency;
pub mod log_limit;
pub mod msix;
pub mod pci;
pub mod serial;
pub mod sink;
pub mod state;
pub mod unix_socket;

pub use bus::{Bus, BusDevice, BusError, MovableId};
pub use debug_exit::{DebugExit, GuestExit};
pub use latency::{Baseline, LatencyPort};
pub use serial::{ConsoleBuffer, SerialConsole};
pub use sink::Sink;
pub use state::{DeviceBlob, DeviceStates, Persist, StateError, Stateful};
