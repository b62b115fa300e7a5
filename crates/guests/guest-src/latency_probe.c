/* latency-probe: the in-guest cyclictest and osnoise.
 *
 * metric=timer (default): arms the LAPIC TSC-deadline timer every
 *   period_us (default 200), halts, and records the wake-up latency (TSC at
 *   handler entry - deadline) of `samples` wake-ups (default 2000).
 * metric=irq: takes `samples` interrupts that nfvisor's injector thread
 *   sends through an irqfd on GSI 10 (IOAPIC pin 10 -> vector 0x41). A
 *   ring at IRQ_RING holds (sequence, ack, send time in guest TSC); the
 *   handler records arrival - send and acknowledges the sequence; the host
 *   sends the next one only after the ack.
 * metric=preempt: spins reading the TSC for `samples` windows of 1 ms;
 *   every gap between two reads above threshold_ns (default 1000, raised
 *   to 4x the loop's own cost) is vCPU preemption. Per window: the sum of
 *   its gaps ("preempt" series); every gap ("gap" series).
 *
 * The samples run in `blocks` blocks (default 1). After each block the guest
 * writes the running maximum (ns) to LAT_PORT+4 and the block number to
 * LAT_PORT (a preemption run first writes its gap threshold to LAT_PORT+8):
 * nfvisor runs the host baseline there, on the same CPU at the
 * same priority, while the guest waits. Elsewhere the port is ignored.
 * Histograms (1 us buckets) are kept in the guest and dumped at the end. */
#include "runtime.h"

#define TIMER_VECTOR 0x40
#define IRQ_VECTOR 0x41
#define IRQ_GSI 10
#define IRQ_RING 0x300000UL
#define IRQ_READY 0x6e667672UL /* "nfvr" */
#define IOAPIC_BASE 0xfec00000UL
#define LAT_PORT 0x9f8
void timer_stub(void);
void ext_stub(void);

/* The ring shared with the injector: written by the host except `ack`. */
struct irq_ring {
    volatile u64 seq, ack, send_tsc, ready;
};

static volatile u64 fired_tsc;
static struct hist lat, gaps;

void timer_irq(void) {
    fired_tsc = rdtsc();
    lapic_eoi();
}

static u64 irq_received;
static void block_done(u64 block, u64 max_ns);

void ext_irq(void) {
    u64 now = rdtsc();
    struct irq_ring *r = (struct irq_ring *)IRQ_RING;
    u64 seq = r->seq, sent = r->send_tsc;
    if (seq == irq_received + 1) {
        hist_add(&lat, now > sent ? cycles_to_ns(now - sent) : 0);
        irq_received = seq;
        r->ack = seq;
    }
    lapic_eoi();
}

static void ioapic_write(u32 reg, u32 v) {
    *(volatile u32 *)IOAPIC_BASE = reg;
    *(volatile u32 *)(IOAPIC_BASE + 0x10) = v;
}

static void run_irq(u64 samples) {
    struct irq_ring *r = (struct irq_ring *)IRQ_RING;
    if (ram_end_above(IRQ_RING) < IRQ_RING + 4096) fail(STATUS_BAD_ARGS, "irq: no RAM for the ring at 3 MiB");
    idt_set(IRQ_VECTOR, ext_stub);
    lapic_enable();
    ioapic_write(0x10 + 2 * IRQ_GSI + 1, lapic_id() << 24); /* destination */
    ioapic_write(0x10 + 2 * IRQ_GSI, IRQ_VECTOR);           /* fixed, edge, unmasked */
    r->ack = 0;
    r->ready = IRQ_READY;
    u64 limit = tsc_khz() * 5000, last = rdtsc(), seen = 0; /* 5 s without one */
    while (irq_received < samples) {
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        if (irq_received != seen) {
            seen = irq_received;
            last = rdtsc();
        } else if (rdtsc() - last > limit) {
            puts("ERROR irq: no interrupt for 5 s after sequence ");
            put_u64(irq_received);
            putc('\n');
            guest_exit(STATUS_FAIL);
        }
    }
    r->ready = 0;
    block_done(0, lat.max);
}

static void block_done(u64 block, u64 max_ns) {
    outl(LAT_PORT + 4, (u32)(max_ns > 0xffffffffUL ? 0xffffffffUL : max_ns));
    outl(LAT_PORT, (u32)block);
}

static void run_timer(u64 period_us, u64 samples, u64 blocks) {
    if (!has_tsc_deadline()) fail(STATUS_FAIL, "no TSC-deadline timer in CPUID.1:ECX[24]");
    idt_set(TIMER_VECTOR, timer_stub);
    lapic_enable();
    lapic_write(0x320, TIMER_VECTOR | (2 << 17)); /* LVT timer: TSC-deadline mode */
    u64 period = period_us * tsc_khz() / 1000, per_block = samples / blocks;
    for (u64 i = 0; i < samples; i++) {
        fired_tsc = 0;
        u64 deadline = rdtsc() + period;
        wrmsr(0x6e0, deadline);
        while (!fired_tsc) __asm__ volatile("sti; hlt; cli" ::: "memory");
        u64 late = fired_tsc > deadline ? fired_tsc - deadline : 0;
        hist_add(&lat, cycles_to_ns(late));
        if ((i + 1) % per_block == 0 || i + 1 == samples) block_done(i / per_block, lat.max);
    }
}

static void run_preempt(u64 samples, u64 blocks, u64 threshold_ns) {
    u64 khz = tsc_khz(), window = khz; /* 1 ms of TSC */
    /* the loop's own cost: the smallest step over a short calibration */
    u64 step = ~0UL, last = rdtsc();
    for (int i = 0; i < 1000; i++) {
        u64 now = rdtsc();
        if (now - last < step) step = now - last;
        last = now;
    }
    u64 threshold = threshold_ns * khz / 1000000;
    if (threshold < 4 * step) threshold = 4 * step;
    outl(LAT_PORT + 8, (u32)cycles_to_ns(threshold)); /* the host counts the same gaps */
    puts("R preempt threshold_ns=");
    put_u64(cycles_to_ns(threshold));
    put_kv("loop_ns", cycles_to_ns(step));
    putc('\n');
    u64 per_block = samples / blocks;
    for (u64 w = 0; w < samples; w++) {
        u64 start = rdtsc(), prev = start, lost = 0;
        while (prev - start < window) {
            u64 now = rdtsc();
            if (now - prev > threshold) {
                lost += now - prev;
                hist_add(&gaps, cycles_to_ns(now - prev));
            }
            prev = now;
        }
        hist_add(&lat, cycles_to_ns(lost));
        if ((w + 1) % per_block == 0 || w + 1 == samples) {
            block_done(w / per_block, lat.max);
        }
    }
}

int guest_main(void) {
    u64 period_us = 200, samples = 2000, blocks = 1, threshold_ns = 1000;
    char metric[16] = "timer";
    header("latency-probe");
    arg_str("metric", metric, sizeof(metric));
    arg_u64("period_us", &period_us);
    arg_u64("samples", &samples);
    arg_u64("blocks", &blocks);
    arg_u64("threshold_ns", &threshold_ns);
    if (!period_us || !samples) fail(STATUS_BAD_ARGS, "period_us and samples must be > 0");
    if (!blocks || blocks > samples) fail(STATUS_BAD_ARGS, "blocks must be between 1 and samples");
    int preempt = metric[0] == 'p', irq = metric[0] == 'i';
    if (!preempt && !irq && metric[0] != 't') fail(STATUS_BAD_ARGS, "metric must be timer, irq or preempt");

    idt_init();
    hist_init(&lat, 1000); /* ns, 1 us buckets */
    hist_init(&gaps, 1000);
    puts("R config metric=");
    puts(preempt ? "preempt" : irq ? "irq" : "timer");
    put_kv("period_us", period_us);
    put_kv("samples", samples);
    put_kv("blocks", blocks);
    putc('\n');

    if (preempt) run_preempt(samples, blocks, threshold_ns);
    else if (irq) run_irq(samples);
    else run_timer(period_us, samples, blocks);

    hist_dump(&lat, preempt ? "preempt" : irq ? "irq" : "timer", "ns");
    if (preempt) hist_dump(&gaps, "gap", "ns");
    puts("latency-probe: ");
    puts(preempt ? "preempt: " : irq ? "irq: " : "timer: ");
    put_u64(lat.count);
    puts(preempt ? " windows of 1 ms, lost per window min " : irq ? " interrupts, min " : " wake-ups, min ");
    put_u64(lat.min / 1000);
    puts(" us, avg ");
    put_u64(lat.sum / lat.count / 1000);
    puts(" us, max ");
    put_u64(lat.max / 1000);
    puts(" us\n");
    if (preempt) {
        puts("latency-probe: longest gap ");
        put_u64(gaps.max / 1000);
        puts(" us\n");
    }
    return STATUS_OK;
}
