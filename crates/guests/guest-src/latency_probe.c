/* latency-probe: the in-guest cyclictest. Arms the LAPIC TSC-deadline
 * timer every period_us (default 200), halts, and records the wake-up
 * latency (TSC at handler entry - deadline) of samples (default 2000)
 * wake-ups in a 1 us-bucket histogram kept in the guest, dumped over COM1
 * at the end. The host computes the statistics from the buckets. */
#include "runtime.h"

#define TIMER_VECTOR 0x40
void timer_stub(void);

static volatile u64 fired_tsc;
static struct hist lat;

void timer_irq(void) {
    fired_tsc = rdtsc();
    lapic_eoi();
}

int guest_main(void) {
    u64 period_us = 200, samples = 2000;
    header("latency-probe");
    arg_u64("period_us", &period_us);
    arg_u64("samples", &samples);
    if (!period_us || !samples) fail(STATUS_BAD_ARGS, "period_us and samples must be > 0");
    if (!has_tsc_deadline()) fail(STATUS_FAIL, "no TSC-deadline timer in CPUID.1:ECX[24]");

    idt_init();
    idt_set(TIMER_VECTOR, timer_stub);
    lapic_enable();
    lapic_write(0x320, TIMER_VECTOR | (2 << 17)); /* LVT timer: TSC-deadline mode */
    hist_init(&lat, 1000);                         /* ns, 1 us buckets */

    puts("R config metric=timer");
    put_kv("period_us", period_us);
    put_kv("samples", samples);
    putc('\n');

    u64 period = period_us * tsc_khz() / 1000;
    for (u64 i = 0; i < samples; i++) {
        fired_tsc = 0;
        u64 deadline = rdtsc() + period;
        wrmsr(0x6e0, deadline);
        while (!fired_tsc) __asm__ volatile("sti; hlt; cli" ::: "memory");
        u64 late = fired_tsc > deadline ? fired_tsc - deadline : 0;
        hist_add(&lat, cycles_to_ns(late));
    }
    hist_dump(&lat, "timer", "ns");
    puts("latency-probe: ");
    put_u64(lat.count);
    puts(" wake-ups, min ");
    put_u64(lat.min / 1000);
    puts(" us, avg ");
    put_u64(lat.sum / lat.count / 1000);
    puts(" us, max ");
    put_u64(lat.max / 1000);
    puts(" us\n");
    return STATUS_OK;
}
