//! The VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table,
//! so this keeps KVM's x86 defaults (GSIs 0-15 on the PIC and the IOAPIC,
//! 16-23 on the IOAPIC) and adds the routes devices ask for (MSI-X vectors,
//! a legacy pin reached from a GSI of its own). irqfds follow their GSI's
//! route when it changes, so re-routing never touches the irqfd.

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::{Error, Result};

/// The first GSI past the IOAPIC's pins, for device routes.
pub const FIRST_DEVICE_GSI: u32 = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// An IOAPIC pin.
    Ioapic(u32),
    /// A message-signalled interrupt.
    Msi { address: u64, data: u32 },
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn entry(gsi: u32, route: Route) -> kvm_irq_routing_entry {
    match route {
        Route::Ioapic(pin) => irqchip(gsi, KVM_IRQCHIP_IOAPIC, pin),
        Route::Msi { address, data } => {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            e
        }
    }
}

/// The routes added to KVM's defaults, by GSI.
#[derive(Default)]
pub struct GsiRoutes {
    extra: Mutex<BTreeMap<u32, Route>>,
}

impl GsiRoutes {
    /// Routes `gsi` (at or past FIRST_DEVICE_GSI) to `route`, or removes
    /// its route (`None`), and installs the table.
    pub fn set(&self, vm: &VmFd, gsi: u32, route: Option<Route>) -> Result<()> {
        if gsi < FIRST_DEVICE_GSI {
            return Err(Error::Kvm(format!(
                "GSI {gsi} is one of KVM's default routes; device routes start at {FIRST_DEVICE_GSI}"
            )));
        }
        let mut extra = self.extra.lock().unwrap_or_else(|e| e.into_inner());
        let before = extra.clone();
        match route {
            Some(r) => extra.insert(gsi, r),
            None => extra.remove(&gsi),
        };
        let mut table = Vec::new();
        for gsi in 0..FIRST_DEVICE_GSI {
            if gsi < 16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                table.push(irqchip(gsi, chip, gsi % 8));
            }
            table.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        table.extend(extra.iter().map(|(gsi, r)| entry(*gsi, *r)));
        let routing = KvmIrqRouting::from_entries(&table)
            .map_err(|e| Error::Kvm(format!("building the GSI routing table: {e:?}")))?;
        vm.set_gsi_routing(&routing).map_err(|e| {
            *extra = before; // the kernel kept the old table
            Error::Kvm(format!("KVM_SET_GSI_ROUTING (GSI {gsi} to {route:?}): {e}"))
        })
    }
}
