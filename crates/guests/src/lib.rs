//! The bundled guests: small bare-metal programs, each a PVH ELF image that
//! prints its results on COM1 in the nfvisor guest line protocol (see the
//! README) and ends through the debug-exit port 0xf4. They run unchanged
//! under QEMU (`-M microvm -device isa-debug-exit,iobase=0xf4,iosize=4`).

pub mod protocol;

/// One bundled guest image.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// Name used on the command line (`nfvisor run --guest NAME`).
    pub name: &'static str,
    /// One line on what it does and which parameters it takes.
    pub summary: &'static str,
    /// The PVH ELF image.
    pub image: &'static [u8],
}

macro_rules! image {
    ($file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $file))
    };
}

/// Every bundled guest, the default (`latency-probe`) first.
pub const ALL: &[Guest] = &[
    Guest {
        name: "latency-probe",
        summary: "in-guest cyclictest: LAPIC TSC-deadline wake-up latency; period_us=200 samples=2000",
        image: image!("latency_probe.elf"),
    },
    Guest {
        name: "hello",
        summary: "prints a line, starts each AP by INIT/SIPI (each reports its APIC ID); exit=N mode=poke|triple-fault",
        image: image!("hello.elf"),
    },
    Guest {
        name: "exit-bench",
        summary: "times N round trips of PIO, MMIO and CPUID exits with RDTSC; n=1000 ops=pio,mmio,cpuid",
        image: image!("exit_bench.elf"),
    },
    Guest {
        name: "ivshmem-probe",
        summary: "finds the ivshmem device on PCI, writes (mode=write) or checks (mode=read) a pattern in its BAR2; seed=1 bytes=4096",
        image: image!("ivshmem_probe.elf"),
    },
    Guest {
        name: "net-probe",
        summary: "virtio-net driver (modern virtio-pci 1af4:1041, MSI-X): mode=echo|send|recv|bad|link count=10 (echo, bad: 0 = forever) size=60 (send, 60..1514) timeout_s=30 irq=msix|poll event_idx=0|1 (1: VIRTIO_F_RING_EVENT_IDX accepted when offered: used_event written, avail_event honoured, kicks counted); mode=bad case=loop|past_ram|long_chain|queue_size3|ring_outside|unoffered|reset_mid misbehaves as a hostile driver, resets, then echoes count frames; mode=link waits for count link changes (configuration interrupts on a vector of their own) and prints each status",
        image: image!("net_probe.elf"),
    },
    Guest {
        name: "dirtier",
        summary: "dirties one word per 4 KiB page per pass and checks every pass; mb=4 passes=3 (0 = forever) tick=N zero_every=K dma_mb=N (pages written by the VMM on request)",
        image: image!("dirtier.elf"),
    },
];

/// The guest `nfvisor run` boots when given no kernel.
pub const DEFAULT: &str = "latency-probe";

/// Looks a bundled guest up by name.
pub fn find(name: &str) -> Option<&'static Guest> {
    ALL.iter().find(|g| g.name == name)
}

/// The names of all bundled guests, for error messages.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|g| g.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_an_elf_with_a_pvh_note() {
        for g in ALL {
            assert_eq!(&g.image[..4], b"\x7fELF", "{} is not an ELF image", g.name);
            // the Xen note name is present in the image
            assert!(
                g.image.windows(4).any(|w| w == b"Xen\0"),
                "{} has no Xen note",
                g.name
            );
        }
        assert!(find(DEFAULT).is_some());
    }
}
