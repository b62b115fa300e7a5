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
        name: "blk-probe",
        summary: "virtio-blk driver (modern virtio-pci 1af4:1042, MSI-X, queue 0): mode=verify|write|bench|bad; verify start=0 sectors=256 chunk=8 seed=1 qd=1 writes blk_pattern, flushes, reads back, then discards and write-zeroes a chunk each; write passes=1 (0 = forever) checks the previous pass and rewrites the range; bench op=randread|randwrite count=1000 qd=1..16 bs=4096 span=capacity (latency percentiles); bad case=unknown_type|past_end|odd_len|read_into_ro|write_ro|discard_flags|discard_too_many|wz_too_big|no_status, then a good read; timeout_s=30 irq=msix|poll event_idx=0|1",
        image: image!("blk_probe.elf"),
    },
    Guest {
        name: "vsock-probe",
        summary: "virtio-vsock driver (modern virtio-pci 1af4:1053, MSI-X; rx/tx/event queues, credit flow control, 32 connections) and virtio-rng reader (1af4:1044): mode=echo|recv|send|overrun|reset|rng; echo port=1234 conns=1 (0 = forever) echoes every connection; recv port= bytes=65536 conns= checks pattern(i) = (i*31 + 7 + (i>>8)) & 0xff, answers GOOD or BAD n; send port= bytes= conns=1..32 expect_refused=0|1 connects to CID 2 from ports 1024+k; overrun port= floods ignoring credit (expects RST), then a clean connection; reset port= resets=1 after=1 echoes across TRANSPORT_RESET events; rng bytes=4096 chunk=512; timeout_s=30 irq=msix|poll event_idx=0|1",
        image: image!("vsock_probe.elf"),
    },
    Guest {
        name: "dirtier",
        summary: "dirties one word per 4 KiB page per pass and checks every pass; mb=4 passes=3 (0 = forever) tick=N zero_every=K dma_mb=N (pages written by the VMM on request)",
        image: image!("dirtier.elf"),
    },
];

/// What blk-probe writes to a sector: 64 little-endian words, word `w` =
/// `mix(seed * 0x9e3779b97f4a7c15 + sector * 0xbf58476d1ce4e5b9 + w)`
/// (wrapping), `mix` being splitmix64's finaliser (`blk_probe.c` says the
/// same).
pub fn blk_pattern(seed: u64, sector: u64) -> [u8; 512] {
    fn mix(mut z: u64) -> u64 {
        z ^= z >> 30;
        z = z.wrapping_mul(0xbf58476d1ce4e5b9);
        z ^= z >> 27;
        z = z.wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    let base = seed
        .wrapping_mul(0x9e3779b97f4a7c15)
        .wrapping_add(sector.wrapping_mul(0xbf58476d1ce4e5b9));
    let mut out = [0u8; 512];
    for (w, word) in out.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&mix(base.wrapping_add(w as u64)).to_le_bytes());
    }
    out
}

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

    #[test]
    fn blk_pattern_is_the_documented_hash() {
        let p = blk_pattern(1, 0);
        // word 0 of (seed 1, sector 0): mix(0x9e3779b97f4a7c15), splitmix64's first output for seed 0
        assert_eq!(p[..8], 0xe220a8397b1dcdafu64.to_le_bytes());
        assert_eq!(
            u64::from_le_bytes(blk_pattern(7, 1000)[504..].try_into().unwrap()),
            0x16fd40d26d224ad7
        );
        assert_ne!(blk_pattern(1, 0), blk_pattern(2, 0));
        assert_ne!(blk_pattern(1, 0), blk_pattern(1, 1));
        assert_eq!(blk_pattern(3, 9), blk_pattern(3, 9));
    }
}
