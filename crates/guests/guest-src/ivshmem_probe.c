/* ivshmem-probe: finds the ivshmem PCI device (1af4:1110) on bus 0 through
 * the 0xCF8/0xCFC configuration ports, reads its BAR2 (the shared memory),
 * and either writes a pattern over `bytes` of it (mode=write, then reads it
 * back) or checks a pattern another guest wrote (mode=read). The pattern is
 * derived from seed=N and the word index.
 * Doorbell mode: mode=wait count=K takes K interrupts on vector 0 (by MSI-X
 * when the device has it, as QEMU's ivshmem-doorbell and nfvisor's do, else
 * or with irq=intx on the IOAPIC pin of the PCI interrupt line), counting them in word 0 of the region and
 * marking word 1 ready; mode=ring peer=P count=K waits for that, then rings
 * peer P's vector 0 K times, each after the previous was counted.
 * Round trip: mode=echo peer=P rings P back from its interrupt handler;
 * mode=ping peer=P count=K rings P and times (RDTSC) until P's ring comes
 * back, K times, and dumps the round trips as the "rtt" histogram (ns).
 * BARs: bar0=A bar1=A bar2=A move them first (with memory decoding off, as
 * an OS does; BAR2 is sized on the way), then everything runs at the new
 * addresses; the old BAR2 address is read once to show it no longer decodes.
 * Status: 0 ok, 1 no device or timeout, 2 bad parameters, 3 the pattern did
 * not match. */
#include "runtime.h"

static u32 pci_read(u32 dev, u32 reg) {
    outl(0xcf8, 0x80000000u | (dev << 11) | (reg & 0xfc));
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"((u16)0xcfc));
    return v;
}

static void pci_write(u32 dev, u32 reg, u32 v) {
    outl(0xcf8, 0x80000000u | (dev << 11) | (reg & 0xfc));
    outl(0xcfc, v);
}

/* Points every MSI-X vector of `dev` at this CPU's LAPIC with `vector`,
 * unmasked, and enables MSI-X (and memory decoding and bus mastering, which
 * QEMU needs to deliver a message). Returns 0 if there is no MSI-X. */
/* Sizes BAR2 and moves the BARs the command line names (decoding off
 * meanwhile). */
static void move_bars(u32 dev) {
    u64 to[3] = {0, 0, 0};
    int moves = arg_u64("bar0", &to[0]) | arg_u64("bar1", &to[1]) | arg_u64("bar2", &to[2]);
    u32 cmd = pci_read(dev, 4) & 0xffff;
    pci_write(dev, 4, cmd & ~2u);
    u32 lo = pci_read(dev, 0x18), hi = pci_read(dev, 0x1c);
    pci_write(dev, 0x18, ~0u);
    pci_write(dev, 0x1c, ~0u);
    u64 mask = (pci_read(dev, 0x18) & ~0xfUL) | ((u64)pci_read(dev, 0x1c) << 32);
    pci_write(dev, 0x18, lo);
    pci_write(dev, 0x1c, hi);
    u64 old2 = (lo & ~0xfUL) | ((u64)hi << 32);
    if (to[0]) pci_write(dev, 0x10, (u32)to[0]);
    if (to[1]) pci_write(dev, 0x14, (u32)to[1]);
    if (to[2]) {
        pci_write(dev, 0x18, (u32)to[2] | (lo & 0xf));
        pci_write(dev, 0x1c, (u32)(to[2] >> 32));
    }
    pci_write(dev, 4, cmd | 2);
    puts("R bars");
    put_kv("size2", ~mask + 1);
    put_kv("moved", moves);
    if (to[2] && to[2] != old2) {
        puts(" old2=");
        put_hex(*(volatile u64 *)old2);
    }
    putc('\n');
}

static volatile u32 *msix_table;

static int msix_setup(u32 dev, u8 vector) {
    u32 cmd = pci_read(dev, 4);
    if (!(cmd & (1u << 20))) return 0; /* no capability list */
    u32 at = pci_read(dev, 0x34) & 0xfc;
    while (at && (pci_read(dev, at) & 0xff) != 0x11) at = (pci_read(dev, at) >> 8) & 0xfc;
    if (!at) return 0;
    u32 head = pci_read(dev, at), table = pci_read(dev, at + 4);
    u32 bar = pci_read(dev, 0x10 + 4 * (table & 7));
    if (bar & 1) fail(STATUS_FAIL, "the MSI-X table is in an I/O BAR");
    volatile u32 *t = (volatile u32 *)(u64)((bar & ~0xfu) + (table & ~7u));
    msix_table = t;
    u32 n = ((head >> 16) & 0x7ff) + 1;
    for (u32 v = 0; v < n; v++) {
        t[4 * v + 0] = 0xfee00000u | (lapic_id() << 12);
        t[4 * v + 1] = 0;
        t[4 * v + 2] = vector; /* fixed, edge */
        t[4 * v + 3] = 0;      /* unmasked */
    }
    pci_write(dev, 4, (cmd & 0xffff) | 6);
    pci_write(dev, at, (head & ~(1u << 30)) | (1u << 31)); /* enable, function unmasked */
    return 1;
}

#define READY 0x726561647921UL
#define DOORBELL_VECTOR 0x42
void ext_stub(void);
static volatile u64 *shared;
static volatile u64 received;
static volatile u32 *echo_bell; /* echo mode: ring back from the handler */
static u32 echo_value;
static int count_in_region;
static struct hist rtt;

void ext_irq(void) {
    received++;
    if (count_in_region) shared[0] = received;
    if (echo_bell) *echo_bell = echo_value;
    lapic_eoi();
}

static void ioapic_route(u32 pin, u8 vector) {
    volatile u32 *sel = (volatile u32 *)0xfec00000UL, *win = (volatile u32 *)0xfec00010UL;
    *sel = 0x10 + 2 * pin + 1;
    *win = lapic_id() << 24;
    *sel = 0x10 + 2 * pin;
    *win = vector; /* fixed, edge, unmasked */
}

/* Interrupts open for a moment: spinning rather than HLT, so a guest that
 * never gets its interrupt still reaches its time limit (nothing else would
 * wake a HLT). */
static void wait_interrupt(void) {
    u64 t = rdtsc(), seen = received;
    __asm__ volatile("sti" ::: "memory");
    while (received == seen && rdtsc() - t < tsc_khz() * 10) cpu_relax();
    __asm__ volatile("cli" ::: "memory");
}

static int wait_for(volatile u64 *word, u64 value, u64 seconds) {
    u64 limit = tsc_khz() * 1000 * seconds, t = rdtsc();
    while (*word != value)
        if (rdtsc() - t > limit) return 0;
    return 1;
}

static int doorbell(const char *mode, u32 dev, u64 bar0, volatile u64 *mem) {
    u64 count = 10, peer = 0;
    arg_u64("count", &count);
    arg_u64("peer", &peer);
    shared = mem;
    u32 id = *(volatile u32 *)(bar0 + 8);
    puts("R doorbell");
    put_kv("ivposition", id);
    putc('\n');
    int takes_interrupts = (mode[0] == 'w' && mode[1] == 'a') || mode[0] == 'e' || mode[0] == 'p';
    if (takes_interrupts) {
        char irq[8] = "msix";
        arg_str("irq", irq, sizeof(irq));
        idt_init();
        idt_set(DOORBELL_VECTOR, ext_stub);
        lapic_enable();
        int msix = irq[0] == 'm' && msix_setup(dev, DOORBELL_VECTOR);
        if (!msix) ioapic_route(pci_read(dev, 0x3c) & 0xff, DOORBELL_VECTOR);
        puts("R interrupts");
        put_kv("msix", msix);
        putc('\n');
    }
    if (mode[0] == 'p') {
        /* ping: the echo side marks word 1 ready */
        if (!wait_for(&mem[1], READY, 10)) fail(STATUS_FAIL, "the echo peer never became ready");
        hist_init(&rtt, 1000); /* 1 us buckets */
        u64 limit = tsc_khz() * 5000;
        for (u64 i = 1; i <= count; i++) {
            u64 t0 = rdtsc();
            *(volatile u32 *)(bar0 + 12) = (u32)((peer << 16) | 0);
            __asm__ volatile("sti" ::: "memory");
            while (received < i)
                if (rdtsc() - t0 > limit) fail(STATUS_FAIL, "no ring back within 5 s");
            u64 t1 = rdtsc();
            __asm__ volatile("cli" ::: "memory");
            hist_add(&rtt, cycles_to_ns(t1 - t0));
        }
        mem[1] = 0;
        hist_dump(&rtt, "rtt", "ns");
        puts("R doorbell");
        put_kv("pings", count);
        putc('\n');
        return STATUS_OK;
    }
    if (mode[0] == 'e') {
        echo_bell = (volatile u32 *)(bar0 + 12);
        echo_value = (u32)((peer << 16) | 0);
        mem[1] = READY;
        u64 limit = tsc_khz() * 10000, last = rdtsc(), seen = 0;
        while (received < count) {
            wait_interrupt();
            if (received != seen) {
                seen = received;
                last = rdtsc();
            } else if (rdtsc() - last > limit) {
                fail(STATUS_FAIL, "no ping for 10 s");
            }
        }
        puts("R doorbell");
        put_kv("echoed", received);
        putc('\n');
        return STATUS_OK;
    }
    if (mode[0] == 'w' && mode[1] == 'a') {
        /* hold_ms=N: vector 0 masked for N ms after ready; a doorbell rung
         * meanwhile must wait, then arrive on unmask */
        u64 hold_ms = 0;
        arg_u64("hold_ms", &hold_ms);
        if (hold_ms && !msix_table) fail(STATUS_BAD_ARGS, "hold_ms needs MSI-X");
        if (hold_ms) msix_table[3] = 1;
        count_in_region = 1;
        mem[0] = 0;
        mem[1] = READY;
        if (hold_ms) {
            u64 t0 = rdtsc();
            __asm__ volatile("sti" ::: "memory");
            while (rdtsc() - t0 < tsc_khz() * hold_ms) cpu_relax();
            __asm__ volatile("cli" ::: "memory");
            if (received) fail(STATUS_FAIL, "an interrupt arrived while its vector was masked");
            msix_table[3] = 0;
            puts("R held");
            put_kv("ms", hold_ms);
            putc('\n');
        }
        u64 limit = tsc_khz() * 10000, last = rdtsc(), seen = 0;
        while (received < count) {
            wait_interrupt();
            if (received != seen) {
                seen = received;
                last = rdtsc();
            } else if (rdtsc() - last > limit) {
                fail(STATUS_FAIL, "no doorbell for 10 s");
            }
        }
        mem[1] = 0;
        puts("R doorbell");
        put_kv("received", received);
        putc('\n');
        return STATUS_OK;
    }
    if (!wait_for(&mem[1], READY, 10)) fail(STATUS_FAIL, "the peer never became ready");
    u64 answer_s = 5; /* how long each doorbell may take to be counted */
    arg_u64("answer_s", &answer_s);
    for (u64 i = 1; i <= count; i++) {
        *(volatile u32 *)(bar0 + 12) = (u32)((peer << 16) | 0);
        if (!wait_for(&mem[0], i, answer_s)) fail(STATUS_FAIL, "a doorbell was not counted in time (answer_s)");
    }
    puts("R doorbell");
    put_kv("rung", count);
    putc('\n');
    return STATUS_OK;
}

static u64 pattern(u64 seed, u64 i) {
    u64 z = seed * 0x9e3779b97f4a7c15UL + i;
    z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9UL;
    return z ^ (z >> 29);
}

int guest_main(void) {
    char mode[16] = "write";
    u64 seed = 1, bytes = 4096;
    header("ivshmem-probe");
    arg_str("mode", mode, sizeof(mode));
    arg_u64("seed", &seed);
    arg_u64("bytes", &bytes);
    if (!bytes || bytes % 8) fail(STATUS_BAD_ARGS, "bytes must be a non-zero multiple of 8");
    u32 dev;
    for (dev = 0; dev < 32; dev++)
        if (pci_read(dev, 0) == 0x11101af4) break;
    if (dev == 32) fail(STATUS_FAIL, "no ivshmem device on PCI bus 0");
    /* ECAM, where an ACPI MCFG table announces it: the same space as the ports */
    u64 mcfg = acpi_table("MCFG");
    if (mcfg) {
        u64 ecam = *(volatile u64 *)(mcfg + 44); /* first allocation: base, segment, buses */
        u8 first_bus = *(volatile u8 *)(mcfg + 54);
        volatile u32 *cfg = (volatile u32 *)(ecam - ((u64)first_bus << 20) + ((u64)dev << 15));
        int same = cfg[0] == pci_read(dev, 0) && cfg[0x18 / 4] == pci_read(dev, 0x18) &&
                   cfg[0x10 / 4] == pci_read(dev, 0x10);
        puts("R ecam base=");
        put_hex(ecam);
        put_kv("match", same);
        putc('\n');
        if (!same) fail(STATUS_CORRUPT, "ECAM and the 0xCF8 ports disagree");
    }
    move_bars(dev);
    u64 bar2 = (pci_read(dev, 0x18) & ~0xfUL) | ((u64)pci_read(dev, 0x1c) << 32);
    puts("R ivshmem");
    put_kv("slot", dev);
    puts(" bar2=");
    put_hex(bar2);
    putc('\n');
    if (bar2 >> 32) fail(STATUS_FAIL, "BAR2 is above 4 GiB, which this guest does not map");
    volatile u64 *mem = (volatile u64 *)bar2;
    if (mode[0] == 'r' && mode[1] == 'i') return doorbell(mode, dev, pci_read(dev, 0x10) & ~0xfUL, mem);
    if (mode[0] == 'w' && mode[1] == 'a') return doorbell(mode, dev, pci_read(dev, 0x10) & ~0xfUL, mem);
    if (mode[0] == 'e' || mode[0] == 'p') return doorbell(mode, dev, pci_read(dev, 0x10) & ~0xfUL, mem);
    u64 words = bytes / 8, bad = 0;
    if (mode[0] == 'w' && mode[1] == 'r')
        for (u64 i = 0; i < words; i++) mem[i] = pattern(seed, i);
    u64 repeat = 1;
    arg_u64("repeat", &repeat); /* read passes, to watch the window open and close */
    for (u64 r = 0; r < repeat; r++)
        for (u64 i = 0; i < words; i++)
            if (mem[i] != pattern(seed, i)) bad++;
    puts("R check");
    put_kv("words", words * repeat);
    put_kv("mismatches", bad);
    putc('\n');
    puts(bad ? "ivshmem-probe: pattern MISMATCH\n" : "ivshmem-probe: pattern OK\n");
    return bad ? STATUS_CORRUPT : STATUS_OK;
}
