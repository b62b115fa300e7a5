//! MSI-X as the PCI specification defines it: a capability in configuration
//! space (MSI-X enable, function mask, table size and location), a table of
//! (address, data, vector control) entries in a BAR, and a pending-bit array.
//!
//! The device model only decides, per vector, where an interrupt should go
//! now (the legacy INTx pin while MSI-X is off, a message when it is on and
//! the vector unmasked, nowhere while masked) and tells a [`MsiRouter`] when
//! that changes; the VMM turns it into KVM GSI routes and irqfds, so the
//! interrupts themselves never pass through here.
//!
//! Pending bits: a masked vector's irqfd is detached, so a doorbell that
//! arrives while masked stays counted in its eventfd, and KVM delivers it
//! when the irqfd is attached again on unmask. The PBA therefore reads zero.

use std::sync::{Arc, Mutex, OnceLock};

use crate::BusDevice;

pub const CAP_ID: u8 = 0x11;
/// The table sits at the start of its BAR, the PBA in the second half
/// (QEMU's layout for a BAR of its own).
pub const TABLE_OFFSET: u64 = 0;
pub const PBA_OFFSET: u64 = 0x800;
pub const BAR_SIZE: u64 = 0x1000;
/// Most vectors one table holds in this layout (16 bytes each below the PBA).
pub const MAX_VECTORS: u16 = (PBA_OFFSET / 16) as u16;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// Where a vector's interrupt goes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorRoute {
    /// MSI-X is off: the device's legacy interrupt pin.
    Intx,
    /// MSI-X is on and the vector unmasked: this message.
    Msi { address: u64, data: u32 },
    /// Masked (the entry or the whole function): held until unmasked.
    Masked,
}

/// Applies route changes (the VMM: GSI routes and irqfds).
pub trait MsiRouter: Send + Sync {
    fn route(&self, vector: u16, route: VectorRoute);
}

struct State {
    /// Per vector: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    enabled: bool,
    function_mask: bool,
    /// What the router was last told, per vector.
    told: Vec<Option<VectorRoute>>,
}

pub struct Msix {
    state: Mutex<State>,
    router: OnceLock<Arc<dyn MsiRouter>>,
}

impl Msix {
    /// A table of `vectors` entries, all masked, MSI-X off (the reset state).
    pub fn new(vectors: u16) -> Msix {
        let vectors = vectors.clamp(1, MAX_VECTORS) as usize;
        Msix {
            state: Mutex::new(State {
                table: vec![[0, 0, 0, ENTRY_MASKED]; vectors],
                enabled: false,
                function_mask: false,
                told: vec![None; vectors],
            }),
            router: OnceLock::new(),
        }
    }

    pub fn vectors(&self) -> u16 {
        self.lock().table.len() as u16
    }

    /// Whether the guest has turned MSI-X on.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// The capability's registers after the ID byte's dword, for
    /// `ConfigSpace::add_capability`: (body, writable bits). Only the enable
    /// and function-mask bits of Message Control are writable.
    pub fn capability(&self, bar: u8) -> ([u32; 3], [u32; 3]) {
        let size = (self.vectors() - 1) as u32;
        (
            [
                size << 16,
                TABLE_OFFSET as u32 | bar as u32,
                PBA_OFFSET as u32 | bar as u32,
            ],
            [
                ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) as u32) << 16,
                0,
                0,
            ],
        )
    }

    /// Connects the router and tells it every vector's route.
    pub fn set_router(&self, router: Arc<dyn MsiRouter>) {
        let _ = self.router.set(router);
        let mut st = self.lock();
        self.update(&mut st);
    }

    /// The guest wrote Message Control.
    pub fn control_written(&self, control: u16) {
        let mut st = self.lock();
        st.enabled = control & CONTROL_ENABLE != 0;
        st.function_mask = control & CONTROL_FUNCTION_MASK != 0;
        self.update(&mut st);
    }

    /// The table's entries (address low, high, data, vector control), for
    /// a snapshot.
    pub fn entries(&self) -> Vec<[u32; 4]> {
        self.lock().table.clone()
    }

    /// Puts saved entries back, as the guest's own writes would, and
    /// re-routes every vector. Refused when the count differs.
    pub fn restore_entries(&self, entries: &[[u32; 4]]) -> Result<(), String> {
        let mut st = self.lock();
        if entries.len() != st.table.len() {
            return Err(format!(
                "{} MSI-X entries saved for a table of {}",
                entries.len(),
                st.table.len()
            ));
        }
        st.table.copy_from_slice(entries);
        self.update(&mut st);
        Ok(())
    }

    /// Every vector's current route.
    pub fn routes(&self) -> Vec<VectorRoute> {
        let st = self.lock();
        (0..st.table.len())
            .map(|v| Self::route_of(&st, v))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route_of(st: &State, v: usize) -> VectorRoute {
        let [lo, hi, data, control] = st.table[v];
        if !st.enabled {
            VectorRoute::Intx
        } else if st.function_mask || control & ENTRY_MASKED != 0 {
            VectorRoute::Masked
        } else {
            VectorRoute::Msi {
                address: (hi as u64) << 32 | lo as u64,
                data,
            }
        }
    }

    fn update(&self, st: &mut State) {
        let Some(router) = self.router.get() else {
            return;
        };
        for v in 0..st.table.len() {
            let route = Self::route_of(st, v);
            if st.told[v] != Some(route) {
                st.told[v] = Some(route);
                router.route(v as u16, route);
            }
        }
    }
}

impl BusDevice for Msix {
    fn name(&self) -> &str {
        "ivshmem-msix"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= PBA_OFFSET {
            return; // see the module comment: pending state lives in the eventfds
        }
        let st = self.lock();
        for (k, b) in data.iter_mut().enumerate() {
            let at = offset as usize + k;
            if let Some(entry) = st.table.get(at / 16) {
                *b = entry[(at % 16) / 4].to_le_bytes()[at % 4];
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= PBA_OFFSET {
            return; // read-only
        }
        let mut st = self.lock();
        for (k, b) in data.iter().enumerate() {
            let at = offset as usize + k;
            if let Some(entry) = st.table.get_mut(at / 16) {
                let word = &mut entry[(at % 16) / 4];
                let mut bytes = word.to_le_bytes();
                bytes[at % 4] = *b;
                *word = u32::from_le_bytes(bytes);
            }
        }
        self.update(&mut st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log(Mutex<Vec<(u16, VectorRoute)>>);
    impl MsiRouter for Log {
        fn route(&self, vector: u16, route: VectorRoute) {
            self.0.lock().unwrap().push((vector, route));
        }
    }

    #[test]
    fn routes_follow_enable_masks_and_table_writes() {
        let m = Msix::new(2);
        let log = Arc::new(Log::default());
        m.set_router(log.clone());
        assert_eq!(
            *log.0.lock().unwrap(),
            vec![(0, VectorRoute::Intx), (1, VectorRoute::Intx)]
        );
        log.0.lock().unwrap().clear();
        m.control_written(CONTROL_ENABLE);
        assert_eq!(
            m.routes(),
            vec![VectorRoute::Masked; 2],
            "entries reset masked"
        );
        // vector 1: address, data, then unmask (one 8-byte and two 4-byte writes)
        m.write(16, &0xfee0_1000u64.to_le_bytes());
        m.write(24, &0x42u32.to_le_bytes());
        m.write(28, &0u32.to_le_bytes());
        let msi = VectorRoute::Msi {
            address: 0xfee0_1000,
            data: 0x42,
        };
        assert_eq!(m.routes(), vec![VectorRoute::Masked, msi]);
        let mut back = [0u8; 4];
        m.read(24, &mut back);
        assert_eq!(u32::from_le_bytes(back), 0x42);
        m.control_written(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(m.routes()[1], VectorRoute::Masked);
        m.control_written(CONTROL_ENABLE);
        m.control_written(0);
        assert_eq!(
            *log.0.lock().unwrap(),
            vec![
                (0, VectorRoute::Masked),
                (1, VectorRoute::Masked),
                (1, msi),
                (1, VectorRoute::Masked),
                (1, msi),
                (0, VectorRoute::Intx),
                (1, VectorRoute::Intx),
            ],
            "the router hears each change once"
        );
        // the PBA reads zero and ignores writes; out-of-table bytes too
        m.write(PBA_OFFSET, &[0xff; 4]);
        m.read(PBA_OFFSET, &mut back);
        assert_eq!(back, [0; 4]);
        m.write(0x7f0, &[0xff; 4]);
        m.read(0x7f0, &mut back);
        assert_eq!(back, [0; 4]);
    }
}
