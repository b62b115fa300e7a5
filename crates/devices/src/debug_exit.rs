//! The debug-exit port (QEMU's `isa-debug-exit` at 0xf4): a guest write of
//! status S ends the VM and `nfvisor run` exits with S.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::BusDevice;

/// Shared between the device and the vCPU loops: has the guest asked to end?
#[derive(Default, Debug)]
pub struct GuestExit {
    requested: AtomicBool,
    status: AtomicU32,
}

impl GuestExit {
    pub fn request(&self, status: u32) {
        self.status.store(status, Ordering::Relaxed);
        self.requested.store(true, Ordering::Release);
    }

    /// The status the guest wrote, if it has.
    pub fn status(&self) -> Option<u32> {
        self.requested
            .load(Ordering::Acquire)
            .then(|| self.status.load(Ordering::Relaxed))
    }
}

/// The debug-exit port's state: the status the guest wrote, if it did
/// (a VM saved between that write and its end ends the same way restored).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DebugExitState {
    pub status: Option<u32>,
}

pub struct DebugExit {
    exit: Arc<GuestExit>,
}

impl DebugExit {
    pub fn new(exit: Arc<GuestExit>) -> Self {
        Self { exit }
    }
}

impl crate::Persist for DebugExit {
    const KIND: &'static str = "isa-debug-exit";
    const VERSION: u16 = 1;
    type State = DebugExitState;

    fn save(&self) -> DebugExitState {
        DebugExitState {
            status: self.exit.status(),
        }
    }

    fn validate(_: &DebugExitState) -> Result<(), crate::state::BadField> {
        Ok(())
    }

    fn restore(&self, s: DebugExitState) -> Result<(), String> {
        if let Some(status) = s.status {
            self.exit.request(status);
        }
        Ok(())
    }
}

impl BusDevice for DebugExit {
    fn name(&self) -> &str {
        "debug-exit"
    }

    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        self.exit.request(u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_records_the_status() {
        let exit = Arc::new(GuestExit::default());
        let dev = DebugExit::new(exit.clone());
        assert_eq!(exit.status(), None);
        dev.write(0, &[7, 0, 0, 0]);
        assert_eq!(exit.status(), Some(7));
        dev.write(0, &[3]);
        assert_eq!(exit.status(), Some(3));
    }

    #[test]
    fn its_state_round_trips() {
        let dev = DebugExit::new(Arc::new(GuestExit::default()));
        dev.write(0, &[9]);
        let fresh_exit = Arc::new(GuestExit::default());
        crate::state::suite::check(&dev, &DebugExit::new(fresh_exit.clone()));
        assert_eq!(fresh_exit.status(), Some(9));
    }
}
