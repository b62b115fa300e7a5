//! Loading a kernel and describing the machine to it: PVH ELF images
//! (XEN_ELFNOTE_PHYS32_ENTRY, hvm_start_info + memory map) and Linux
//! bzImages (64-bit boot protocol: zero page, e820, command line, initrd),
//! both through linux-loader.

use std::io::Cursor;

use crate::memory::GuestRam;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::ram_ranges;
use crate::{Error, Result};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootProtocol {
    /// 32-bit protected-mode entry at the PVH note's address.
    Pvh,
    /// Linux 64-bit boot protocol from a bzImage.
    Linux64,
    /// Not booted: restored from a snapshot.
    Restore,
}

/// What the BSP starts with.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BootEntry {
    pub protocol: BootProtocol,
    pub entry: u64,
    /// start_info (PVH) or zero page (Linux) address.
    pub params: u64,
    pub kernel_end: u64,
}

/// A kernel image to boot, with the name it came by (file path or guest).
pub struct KernelImage<'a> {
    pub name: String,
    pub bytes: &'a [u8],
}

fn kernel_error(image: &KernelImage, why: impl Into<String>) -> Error {
    Error::Kernel {
        path: image.name.clone(),
        why: why.into(),
    }
}

fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.len() > 0x206 && &bytes[0x202..0x206] == b"HdrS"
}

/// The memory map both protocols describe: RAM, the EBDA/BIOS hole, RAM.
fn memory_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
    ];
    for (base, len) in ram_ranges(mem_size) {
        let start = base.0.max(HIGH_MEMORY);
        map.push((start, base.0 + len - start, E820_RAM));
    }
    map
}

fn write_cmdline(mem: &GuestRam, cmdline: &str) -> Result<()> {
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Boot(format!("command line: {e}")))?;
    if !cmdline.is_empty() {
        c.insert_str(cmdline)
            .map_err(|e| Error::Boot(format!("command line {cmdline:?}: {e}")))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE), &c)
        .map_err(|e| Error::Boot(format!("writing the command line: {e}")))
}

/// Places the initrd at the top of low RAM, page aligned; returns (addr, size).
fn load_initrd(
    mem: &GuestRam,
    mem_size: u64,
    initrd: &[u8],
    kernel_end: u64,
    name: &str,
) -> Result<(u64, u64)> {
    let low_end = ram_ranges(mem_size)[0].1;
    let size = initrd.len() as u64;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end);
    let addr = addr.ok_or_else(|| Error::Initrd {
        path: name.to_string(),
        why: format!(
            "{} MiB does not fit in guest RAM above the kernel (ends at {kernel_end:#x}); give the VM more memory",
            size >> 20
        ),
    })?;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(|e| Error::Initrd {
            path: name.to_string(),
            why: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Loads `image` and writes the boot parameters for a machine with
/// `mem_size` bytes of RAM; returns where the BSP starts.
pub fn load(
    mem: &GuestRam,
    mem_size: u64,
    image: &KernelImage,
    cmdline: &str,
    initrd: Option<(&str, &[u8])>,
    rsdp: u64,
) -> Result<BootEntry> {
    if is_elf(image.bytes) {
        let loaded = Elf::load(
            mem,
            None,
            &mut Cursor::new(image.bytes),
            Some(GuestAddress(HIGH_MEMORY)),
        )
        .map_err(|e| kernel_error(image, format!("not a loadable ELF: {e}")))?;
        let entry = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => addr.0,
            _ => {
                return Err(kernel_error(
                    image,
                    "ELF image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); ELF kernels boot through PVH only",
                ))
            }
        };
        write_cmdline(mem, cmdline)?;
        let mut start_info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE,
            rsdp_paddr: rsdp,
            memmap_paddr: PVH_MEMMAP,
            ..Default::default()
        };
        let memmap: Vec<hvm_memmap_table_entry> = memory_map(mem_size)
            .into_iter()
            .map(|(addr, size, type_)| hvm_memmap_table_entry {
                addr,
                size,
                type_,
                reserved: 0,
            })
            .collect();
        start_info.memmap_entries = memmap.len() as u32;
        let module = match initrd {
            Some((name, bytes)) => {
                let (paddr, size) = load_initrd(mem, mem_size, bytes, loaded.kernel_end, name)?;
                start_info.nr_modules = 1;
                start_info.modlist_paddr = PVH_MODLIST;
                Some(hvm_modlist_entry {
                    paddr,
                    size,
                    ..Default::default()
                })
            }
            None => None,
        };
        let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO));
        params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
        if let Some(m) = module {
            params.set_modules(&[m], GuestAddress(PVH_MODLIST));
        }
        PvhBootConfigurator::write_bootparams(&params, mem)
            .map_err(|e| Error::Boot(format!("writing PVH start_info: {e}")))?;
        return Ok(BootEntry {
            protocol: BootProtocol::Pvh,
            entry,
            params: PVH_START_INFO,
            kernel_end: loaded.kernel_end,
        });
    }
    if is_bzimage(image.bytes) {
        let loaded = BzImage::load(
            mem,
            None,
            &mut Cursor::new(image.bytes),
            Some(GuestAddress(HIGH_MEMORY)),
        )
        .map_err(|e| kernel_error(image, format!("not a loadable bzImage: {e}")))?;
        let mut hdr = loaded
            .setup_header
            .ok_or_else(|| kernel_error(image, "bzImage without a setup header"))?;
        let version = hdr.version;
        if version < 0x0206 {
            return Err(kernel_error(
                image,
                format!(
                    "boot protocol {:#x} is too old (2.06 or newer needed)",
                    version
                ),
            ));
        }
        write_cmdline(mem, cmdline)?;
        hdr.type_of_loader = 0xff;
        hdr.cmd_line_ptr = CMDLINE as u32;
        hdr.cmdline_size = cmdline.len() as u32 + 1;
        if let Some((name, bytes)) = initrd {
            let (addr, size) = load_initrd(mem, mem_size, bytes, loaded.kernel_end, name)?;
            hdr.ramdisk_image = addr as u32;
            hdr.ramdisk_size = size as u32;
        }
        let mut zero_page = boot_params {
            hdr,
            ..Default::default()
        };
        zero_page.acpi_rsdp_addr = rsdp;
        let map = memory_map(mem_size);
        for (i, (addr, size, kind)) in map.iter().enumerate() {
            zero_page.e820_table[i] = boot_e820_entry {
                addr: *addr,
                size: *size,
                r#type: *kind,
            };
        }
        zero_page.e820_entries = map.len() as u8;
        LinuxBootConfigurator::write_bootparams(
            &BootParams::new(&zero_page, GuestAddress(ZERO_PAGE)),
            mem,
        )
        .map_err(|e| Error::Boot(format!("writing the zero page: {e}")))?;
        write_identity_page_tables(mem)?;
        return Ok(BootEntry {
            protocol: BootProtocol::Linux64,
            entry: loaded.kernel_load.0 + 0x200,
            params: ZERO_PAGE,
            kernel_end: loaded.kernel_end,
        });
    }
    Err(kernel_error(
        image,
        "neither an ELF image with a PVH note nor a Linux bzImage (no ELF magic, no \"HdrS\" at 0x202)",
    ))
}

/// Identity map of the first GiB with 2 MiB pages (1 GiB pages are not
/// offered everywhere) for the 64-bit Linux entry.
fn write_identity_page_tables(mem: &GuestRam) -> Result<()> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| Error::Boot(format!("writing page tables at {addr:#x}: {e}")))
    };
    w(PML4, PDPT | 0x3)?;
    w(PDPT, PD | 0x3)?;
    for i in 0..512u64 {
        w(PD + i * 8, (i << 21) | 0x83)?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn gdt_entry(seg: &kvm_segment) -> u64 {
    let limit = if seg.g == 1 {
        seg.limit >> 12
    } else {
        seg.limit
    } as u64;
    let base = seg.base;
    let flags = (seg.type_ as u64)
        | ((seg.s as u64) << 4)
        | ((seg.dpl as u64) << 5)
        | ((seg.present as u64) << 7)
        | ((seg.avl as u64) << 12)
        | ((seg.l as u64) << 13)
        | ((seg.db as u64) << 14)
        | ((seg.g as u64) << 15);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((flags & 0xff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// Registers and segments for the BSP at `entry`, and writes the boot GDT
/// (interrupt delivery on some hosts reads the GDT, so it must be real).
pub fn bsp_state(mem: &GuestRam, entry: &BootEntry, sregs: &mut kvm_sregs) -> Result<kvm_regs> {
    let long = entry.protocol == BootProtocol::Linux64;
    let code = segment(0x08, 0xb, long);
    let data = segment(0x10, 0x3, false);
    let mut tss = segment(0x18, 0xb, false);
    tss.s = 0;
    tss.limit = 0x67;
    tss.g = 0;
    tss.db = 0;
    for (i, seg) in [code, data, tss].iter().enumerate() {
        mem.write_obj(gdt_entry(seg), GuestAddress(BOOT_GDT + 8 * (i as u64 + 1)))
            .map_err(|e| Error::Boot(format!("writing the boot GDT: {e}")))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_GDT))
        .and_then(|_| mem.write_obj(0u64, GuestAddress(BOOT_IDT)))
        .map_err(|e| Error::Boot(format!("writing the boot GDT: {e}")))?;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        ..Default::default()
    };
    if long {
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        sregs.cr3 = PML4;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
        regs.rsp = BOOT_STACK;
        regs.rbp = BOOT_STACK;
        regs.rsi = entry.params;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
        regs.rbx = entry.params;
    }
    Ok(regs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        let img = KernelImage {
            name: "junk.bin".into(),
            bytes: b"this is no kernel at all, just some text that is long enough",
        };
        let e = load(&mem(), 32 << 20, &img, "", None, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("junk.bin") && e.contains("neither an ELF"),
            "{e}"
        );
    }

    #[test]
    fn truncated_elf_is_refused() {
        let g = guests::find("hello").unwrap();
        let img = KernelImage {
            name: "cut.elf".into(),
            bytes: &g.image[..100],
        };
        let e = load(&mem(), 32 << 20, &img, "", None, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cut.elf") && e.contains("not a loadable ELF"),
            "{e}"
        );
    }

    #[test]
    fn pvh_guest_loads_with_start_info_and_memmap() {
        let m = mem();
        let g = guests::find("hello").unwrap();
        let img = KernelImage {
            name: "hello".into(),
            bytes: g.image,
        };
        let e = load(&m, 32 << 20, &img, "exit=3", None, 0xe0000).unwrap();
        assert_eq!(e.protocol, BootProtocol::Pvh);
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!(si.memmap_entries, 3);
        assert_eq!(si.rsdp_paddr, 0xe0000);
        let mut c = [0u8; 7];
        m.read_slice(&mut c, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&c, b"exit=3\0");
    }

    #[test]
    fn gdt_entries_encode_like_the_manual() {
        assert_eq!(gdt_entry(&segment(0x08, 0xb, true)), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(&segment(0x10, 0x3, false)), 0x00cf_9300_0000_ffff);
    }
}
