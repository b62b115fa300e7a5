/* hello: prints a greeting, starts every application processor listed in
 * the ACPI MADT by INIT/SIPI (each reports its APIC ID), and exits with the
 * status given as exit=N (default 0).
 * mode=poke   touches an unknown port and unknown MMIO first (the VMM must
 *             log and ignore them; reads return all-ones)
 * mode=sweep sweep=N  writes to N distinct unknown MMIO addresses (a
 *             hostile guest: the VMM's memory and logs must not grow) 
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
