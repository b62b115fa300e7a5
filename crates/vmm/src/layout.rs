//! Where things live in guest physical memory.

/// Boot GDT (both protocols).
pub const BOOT_GDT: u64 = 0x500;
/// Empty boot IDT.
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MEMMAP: u64 = 0x6100;
pub const PVH_MODLIST: u64 = 0x6800;
/// Linux zero page (boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack of the 64-bit Linux boot.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables of the 64-bit Linux boot (PML4, PDPT, PD).
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
/// End of conventional memory below 1 MiB (EBDA above).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first, where a guest scanning 0xe0000-0xfffff finds it).
pub const ACPI_START: u64 = 0xe0000;
pub const HIGH_MEMORY: u64 = 0x100000;

/// PCI ECAM for bus 0 (1 MiB), announced by the MCFG table.
pub const ECAM_ADDR: u64 = 0xe800_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS and identity-map pages, just below the IOAPIC.
pub const KVM_TSS: usize = 0xfffb_d000;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// Where `exit-bench` sends its PIO and MMIO round trips.
pub const BENCH_PORT: u64 = 0x9f0; // free on QEMU machines too (0x510 is fw_cfg)
pub const BENCH_MMIO: u64 = 0xd000_0000;
/// latency-probe's block port (block number at +0, running max at +4,
/// preemption threshold at +8).
pub const LATENCY_PORT: u64 = 0x9f8;
/// The DMA probe (devices::dma_probe): guest-requested writes by the VMM.
pub const DMA_PROBE_PORT: u64 = 0x9e8;
/// Where PCI BARs go (the device manager hands them out, each aligned to
/// its size): memory windows, then register BARs and MSI-X tables. The
/// benchmark page (BENCH_MMIO) lies between the two.
pub const PCI_LARGE_BARS: (u64, u64) = (0xc000_0000, 0xd000_0000);
pub const PCI_SMALL_BARS: (u64, u64) = (0xe000_0000, 0xe800_0000);
