//! ACPI tables: RSDP, XSDT, MADT (the vCPUs and the IOAPIC) and MCFG (PCI
//! ECAM for bus 0).

use crate::memory::GuestRam;
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{ACPI_START, ECAM_ADDR, IOAPIC_ADDR, LAPIC_ADDR};
use crate::{Error, Result};

const OEM_ID: [u8; 6] = *b"NFVSR ";
const OEM_TABLE: [u8; 8] = *b"NFVISOR ";

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Writes the tables for `vcpus` processors; returns the RSDP address.
pub fn write_tables(mem: &GuestRam, vcpus: u32) -> Result<u64> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt = bytes(&madt);
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE, 1);
    mcfg.add_ecam(ECAM_ADDR, 0, 0, 0);
    let mcfg = bytes(&mcfg);

    let rsdp_addr = ACPI_START;
    let xsdt_addr = rsdp_addr + 0x40;
    let madt_addr = xsdt_addr + 0x40;
    let mcfg_addr = (madt_addr + madt.len() as u64).next_multiple_of(16);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = bytes(&xsdt);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    assert!(xsdt.len() <= 0x40 && rsdp.len() <= 0x40);

    for (addr, data) in [
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
    ] {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| Error::Boot(format!("writing ACPI tables at {addr:#x}: {e}")))?;
    }
    Ok(rsdp_addr)
}
