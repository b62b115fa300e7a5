/* exit-bench: n (default 1000) round trips each of a port write (PIO exit
 * to the VMM), an MMIO write to an unbacked address (MMIO exit to the VMM)
 * and CPUID (handled inside KVM), each timed with RDTSC. ops=pio,mmio,cpuid
 * picks a subset. Histograms in cycles go out over COM1. */
#include "runtime.h"

static struct hist h;

static int wanted(const char *ops, const char *op) {
    if (!ops[0]) return 1;
    for (const char *p = ops; *p;) {
        const char *o = op;
        while (*o && *p == *o) { p++; o++; }
        if (!*o && (*p == ',' || !*p)) return 1;
        while (*p && *p != ',') p++;
        if (*p == ',') p++;
    }
    return 0;
}

static void run(const char *name, int op, u64 n) {
    hist_init(&h, 128);
    for (u64 i = 0; i < n; i++) {
        u32 a, b, c, d;
        u64 t0 = rdtsc();
        if (op == 0) outl(BENCH_PORT, (u32)i);
        else if (op == 1) *(volatile u32 *)BENCH_MMIO = (u32)i;
        else cpuid(0, 0, &a, &b, &c, &d);
        u64 t1 = rdtsc();
        hist_add(&h, t1 - t0);
    }
    hist_dump(&h, name, "cycles");
    puts("exit-bench: ");
    puts(name);
    put_kv("n", h.count);
    put_kv("avg_cycles", h.sum / h.count);
    put_kv("min_cycles", h.min);
    put_kv("max_cycles", h.max);
    putc('\n');
}

int guest_main(void) {
    u64 n = 1000;
    char ops[32] = "";
    header("exit-bench");
    arg_u64("n", &n);
    arg_str("ops", ops, sizeof(ops));
    if (!n) fail(STATUS_BAD_ARGS, "n must be > 0");
    puts("R config");
    put_kv("n", n);
    put_kv("port", BENCH_PORT);
    puts(" mmio=");
    put_hex(BENCH_MMIO);
    putc('\n');
    if (wanted(ops, "pio")) run("pio", 0, n);
    if (wanted(ops, "mmio")) run("mmio", 1, n);
    if (wanted(ops, "cpuid")) run("cpuid", 2, n);
    return STATUS_OK;
}
