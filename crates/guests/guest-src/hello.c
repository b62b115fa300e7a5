/* hello: prints a greeting, starts every application processor listed in
 * the ACPI MADT by INIT/SIPI (each reports its APIC ID), and exits with the
 * status given as exit=N (default 0).
 * mode=poke   touches an unknown port and unknown MMIO first (the VMM must
 *             log and ignore them; reads return all-ones)
 * mode=sweep sweep=N  writes to N distinct unknown MMIO addresses (a
 *             hostile guest: the VMM's memory and logs must not grow) 
 * mode=barmove moves=N [bar=B]  moves a memory BAR below 4 GiB (32-bit,
 *             or 64-bit by its low half) of the first PCI device on bus 0
 *             that has one (BAR B, or the highest-numbered such BAR) N times
 *             between two free addresses, decoding on, each read back; the
 *             BAR restored at the end (a hostile guest: the VMM's memory,
 *             logs and descriptors must not grow)
 * mode=msixstorm writes=N  turns MSI-X on at the first device on bus 0 with
 *             the capability and makes N 32-bit writes to its table, cycling
 *             over the entries: address (valid, 0 or 0xdead0000), data,
 *             vector control masked and unmasked by turns; all masked and
 *             MSI-X restored at the end
 * mode=triple-fault  loads an empty IDT and raises an exception */
#include "runtime.h"

#define AP_TRAMP_BASE 0x8000
extern char ap_tramp_start[], ap_tramp_end[];
static volatile u32 ap_done;

void ap_main(u32 apic_id) {
    (void)apic_id;
    puts("R cpu apic_id=");
    put_u64(lapic_id());
    puts(" role=ap\n");
    ap_done = 1;
}

static void wait_cycles(u64 n) {
    u64 t = rdtsc();
    while (rdtsc() - t < n) cpu_relax();
}

static void icr_send(u32 apic_id, u32 low) {
    lapic_write(0x310, apic_id << 24);
    lapic_write(0x300, low);
    while (lapic_read(0x300) & (1 << 12)) cpu_relax(); /* delivery pending */
}

static void start_aps(void) {
    u32 ids[16];
    int n = madt_apic_ids(ids, 16);
    u32 self = lapic_id();
    puts("R cpu apic_id=");
    put_u64(self);
    puts(" role=bsp");
    put_kv("cpus", (u64)n);
    putc('\n');
    if (n <= 1) return;
    for (char *s = ap_tramp_start, *d = (char *)AP_TRAMP_BASE; s < ap_tramp_end;) *d++ = *s++;
    for (int i = 0; i < n; i++) {
        if (ids[i] == self) continue;
        ap_done = 0;
        icr_send(ids[i], 0x4500);                       /* INIT */
        wait_cycles(tsc_khz() / 100);                   /* 10 us */
        icr_send(ids[i], 0x4600 | (AP_TRAMP_BASE >> 12)); /* SIPI */
        u64 t = rdtsc(), limit = tsc_khz() * 1000 * 5;   /* 5 s */
        while (!ap_done && rdtsc() - t < limit) cpu_relax();
        if (!ap_done) {
            puts("ERROR ap apic_id=");
            put_u64(ids[i]);
            puts(" did not start\n");
            guest_exit(STATUS_FAIL);
        }
    }
}

/* PCI configuration mechanism 1, bus 0 */
static u32 cfg_read(u32 slot, u32 reg) {
    outl(0xcf8, 0x80000000u | (slot << 11) | (reg & 0xfc));
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"((u16)0xcfc));
    return v;
}

static void cfg_write(u32 slot, u32 reg, u32 v) {
    outl(0xcf8, 0x80000000u | (slot << 11) | (reg & 0xfc));
    outl(0xcfc, v);
}

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

/* The capability `id` of the device in slot, its config offset or 0. */
static u32 find_cap(u32 slot, u8 id) {
    if (!(cfg_read(slot, 4) & (1u << 20))) return 0;
    u32 at = cfg_read(slot, 0x34) & 0xfc;
    for (int guard = 0; at >= 0x40 && guard < 48; guard++) {
        u32 head = cfg_read(slot, at);
        if ((head & 0xff) == id) return at;
        at = (head >> 8) & 0xfc;
    }
    return 0;
}

/* BAR index (0-5) of the highest-numbered memory BAR below 4 GiB (32-bit,
 * or 64-bit with its high half 0: moved by its low half), or -1. */
static int low_bar(u32 slot) {
    int found = -1;
    for (u32 i = 0; i < 6; i++) {
        u32 lo = cfg_read(slot, 0x10 + 4 * i);
        if (lo & 1) continue; /* I/O */
        int is64 = ((lo >> 1) & 3) == 2;
        if ((lo & ~0xfu) && (!is64 || (i < 5 && cfg_read(slot, 0x14 + 4 * i) == 0))) found = (int)i;
        if (is64) i++;
    }
    return found;
}

/* Moves a BAR n times between two addresses in the top of the 32-bit PCI
 * window, where nothing is assigned (checked), decoding on. */
static void bar_moves(u64 n, u64 want) {
    u32 slot, bar = 0;
    int b = -1;
    for (slot = 1; slot < 32; slot++) {
        if ((cfg_read(slot, 0) & 0xffff) == 0xffff) continue;
        if ((b = low_bar(slot)) >= 0) break;
    }
    if (b < 0) fail(STATUS_FAIL, "no device with a memory BAR below 4 GiB on bus 0");
    bar = (u32)b;
    if (want < 6) {
        u32 lo = cfg_read(slot, 0x10 + 4 * (u32)want);
        if ((lo & 1) || !(lo & ~0xfu)) fail(STATUS_BAD_ARGS, "bar= names no memory BAR");
        if (((lo >> 1) & 3) == 2 && cfg_read(slot, 0x14 + 4 * (u32)want)) fail(STATUS_BAD_ARGS, "bar= lies above 4 GiB");
        bar = (u32)want;
    }
    u32 reg = 0x10 + 4 * bar, orig = cfg_read(slot, reg);
    /* free: no BAR of any device on bus 0 lies in [0xe7000000, 0xe8000000) */
    for (u32 s = 0; s < 32; s++) {
        if ((cfg_read(s, 0) & 0xffff) == 0xffff) continue;
        for (u32 i = 0; i < 6; i++) {
            u32 v = cfg_read(s, 0x10 + 4 * i) & ~0xfu;
            if (v >= 0xe7000000u && v < 0xe8000000u) fail(STATUS_FAIL, "0xe7000000 is taken");
        }
    }
    u32 at[2] = {0xe7000000u, 0xe7800000u};
    u32 cmd = cfg_read(slot, 4) & 0xffff;
    cfg_write(slot, 4, cmd | 2); /* memory decoding */
    u32 first = *(volatile u32 *)(u64)(orig & ~0xfu);
    u64 ok = 1;
    outl(0xcf8, 0x80000000u | (slot << 11) | reg); /* the latch stays on the BAR */
    for (u64 i = 0; i < n; i++) {
        u32 to = at[i & 1], back;
        outl(0xcfc, to | (orig & 0xf));
        __asm__ volatile("inl %1, %0" : "=a"(back) : "Nd"((u16)0xcfc));
        if ((back & ~0xfu) != to) ok = 0;
        /* the BAR answers where it went (checked on the first moves only) */
        if (i < 2 && *(volatile u32 *)(u64)to != first) ok = 0;
    }
    cfg_write(slot, reg, orig);
    if ((cfg_read(slot, reg) & ~0xfu) != (orig & ~0xfu)) ok = 0;
    if (*(volatile u32 *)(u64)(orig & ~0xfu) != first) ok = 0;
    cfg_write(slot, 4, cmd);
    puts("R barmove");
    put_kv("slot", slot);
    put_kv("bar", bar);
    put_kv("moves", n);
    put_kv("ok", ok);
    putc('\n');
}

/* n 32-bit writes to the MSI-X table of the first device with one. */
static void msix_storm(u64 n) {
    u32 slot, cap = 0;
    for (slot = 1; slot < 32; slot++) {
        if ((cfg_read(slot, 0) & 0xffff) == 0xffff) continue;
        if ((cap = find_cap(slot, 0x11))) break;
    }
    if (!cap) fail(STATUS_FAIL, "no device with MSI-X on bus 0");
    u32 head = cfg_read(slot, cap), where = cfg_read(slot, cap + 4);
    u32 entries = ((head >> 16) & 0x7ff) + 1, bar = where & 7;
    u32 lo = cfg_read(slot, 0x10 + 4 * bar);
    if (lo & 1) fail(STATUS_FAIL, "the MSI-X table is in an I/O BAR");
    u64 base = lo & ~0xfUL;
    if (((lo >> 1) & 3) == 2) base |= (u64)cfg_read(slot, 0x14 + 4 * bar) << 32;
    if (!base || (base >> 32)) fail(STATUS_FAIL, "the MSI-X BAR is not below 4 GiB");
    u64 table = base + (where & ~7u);
    u32 cmd = cfg_read(slot, 4) & 0xffff;
    cfg_write(slot, 4, cmd | 2);                               /* memory decoding */
    cfg_write(slot, cap, (head & 0xbfffffffu) | 0x80000000u); /* enable, unmasked */
    u32 addrs[3] = {LAPIC_BASE | (lapic_id() << 12), 0, 0xdead0000u};
    for (u64 i = 0; i < n; i++) {
        u64 visit = i / 4;
        u32 e = (u32)(visit % entries), word = (u32)(i % 4), v;
        if (word == 0) v = addrs[visit % 3];
        else if (word == 1) v = 0;
        else if (word == 2) v = 0x40 + (u32)(visit & 0x3f);
        else v = (u32)((visit / entries) & 1); /* each entry unmasked, masked, ... */
        *(volatile u32 *)(table + 16 * e + 4 * word) = v;
    }
    for (u32 e = 0; e < entries; e++) *(volatile u32 *)(table + 16 * e + 12) = 1;
    cfg_write(slot, cap, head);
    cfg_write(slot, 4, cmd);
    puts("R msixstorm");
    put_kv("slot", slot);
    put_kv("entries", entries);
    put_kv("writes", n);
    putc('\n');
}

int guest_main(void) {
    char mode[32] = "";
    u64 status = 0;
    header("hello");
    arg_str("mode", mode, sizeof(mode));
    arg_u64("exit", &status);
    puts("Hello from the nfvisor hello guest\n");
    if (mode[0] == 'p') {
        u8 v = inb(0x2f0);
        u32 m = *(volatile u32 *)0xc0000000UL;
        *(volatile u32 *)0xc0000000UL = 1;
        outb(0x2f0, 1);
        puts("R poke port_read=");
        put_hex(v);
        puts(" mmio_read=");
        put_hex(m);
        putc('\n');
    }
    if (streq(mode, "barmove")) {
        u64 n = 0;
        u64 bar = 6;
        arg_u64("moves", &n);
        arg_u64("bar", &bar);
        bar_moves(n, bar);
    }
    if (streq(mode, "msixstorm")) {
        u64 n = 0;
        arg_u64("writes", &n);
        msix_storm(n);
    }
    if (mode[0] == 's') {
        u64 n = 0;
        arg_u64("sweep", &n);
        for (u64 i = 0; i < n; i++) *(volatile u32 *)(0xc0000000UL + i * 8) = (u32)i;
        puts("R sweep");
        put_kv("addresses", n);
        putc('\n');
    }
    if (mode[0] == 't') {
        struct { u16 limit; u64 base; } __attribute__((packed)) empty = {0, 0};
        puts("raising an exception with no IDT\n");
        __asm__ volatile("lidt %0; int3" ::"m"(empty));
    }
    idt_init();
    lapic_enable();
    start_aps();
    return (int)status;
}
