/* dirtier: one 8-byte write per 4 KiB page per pass over a working set of
 * mb MiB (default 4) starting at 4 MiB, the value derived from the pass
 * number and the page index, then a full read-back check of the pass.
 * passes=N (default 3; 0 = forever), tick=N prints a progress record every
 * N pages. zero_every=K: on even passes every K-th page is written 0, which
 * leaves the whole page zero (a migration must send it as a zero marker:
 * a stale copy would fail the read-back). Ends with DIRTIER OK passes=.. digest=.. max_gap_cycles=.. and
 * status 0, or DIRTIER CORRUPT page=.. and status 3. The digest depends
 * only on the values, never on timing.
 * dma_mb=N: a second working set of N MiB right after the first that the
 * guest never writes itself: each pass, nfvisor's DMA probe (port 0x9e8)
 * writes every page's value there on the guest's request, and the
 * read-back checks it too. Pages only the VMM writes are not in KVM's
 * dirty log: a migration that missed them leaves stale values. */
#include "runtime.h"

#define BASE 0x400000UL
#define PAGE 4096UL
#define DMA_PORT 0x9e8


static u64 value_of(u64 pass, u64 page) {
    u64 z = (pass << 32) + page + 0x9e3779b97f4a7c15UL; /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
    return (z ^ (z >> 31)) | 1; /* never zero: a lost page reads as zero */
}

static u32 dma_value(u64 pass, u64 page) { return (u32)(value_of(pass, page ^ 0x5a5a5a) | 1); }

static u64 zero_every;

/* DIRTIER CORRUPT[what] page=.. pass=.. expected=.. found=.., status 3 */
static void __attribute__((noreturn)) corrupt(const char *what, u64 page, u64 pass, u64 want, u64 got) {
    puts("DIRTIER CORRUPT");
    puts(what);
    put_kv("page", page);
    put_kv("pass", pass);
    puts(" expected=");
    put_hex(want);
    puts(" found=");
    put_hex(got);
    putc('\n');
    guest_exit(STATUS_CORRUPT);
}

/* every page of the DMA set holds what the probe wrote in `pass` */
static void check_dma(u64 base, u64 pages, u64 pass) {
    for (u64 p = 0; p < pages; p++) {
        u32 want = dma_value(pass, p), got = *(volatile u32 *)(base + p * PAGE);
        if (got != want) corrupt(" dma", p, pass, want, got);
    }
}

static u64 expected(u64 pass, u64 page) {
    if (zero_every && pass % 2 == 0 && page % zero_every == 0) return 0;
    return value_of(pass, page);
}

int guest_main(void) {
    u64 mb = 4, passes = 3, tick = 0, dma_mb = 0;
    header("dirtier");
    arg_u64("mb", &mb);
    arg_u64("passes", &passes);
    arg_u64("tick", &tick);
    arg_u64("zero_every", &zero_every);
    arg_u64("dma_mb", &dma_mb);
    if (!mb) fail(STATUS_BAD_ARGS, "mb must be > 0");
    u64 pages = mb * 256, dma_pages = dma_mb * 256, end = ram_end_above(BASE);
    u64 dma_base = BASE + pages * PAGE;
    if (end && dma_base + dma_pages * PAGE > end) fail(STATUS_BAD_ARGS, "working set larger than guest RAM above 4 MiB");
    if (dma_pages && dma_base + dma_pages * PAGE > 0x100000000UL) fail(STATUS_BAD_ARGS, "the DMA probe takes 32-bit addresses: dma_mb must end below 4 GiB");
    puts("R config");
    put_kv("mb", mb);
    put_kv("pages", pages);
    put_kv("passes", passes);
    put_kv("dma_pages", dma_pages);
    putc('\n');

    u64 max_gap = 0, last = rdtsc(), digest = 0, pass;
    for (pass = 1; !passes || pass <= passes; pass++) {
        for (u64 p = 0; p < pages; p++) {
            *(volatile u64 *)(BASE + p * PAGE) = expected(pass, p);
            u64 now = rdtsc();
            if (now - last > max_gap) max_gap = now - last;
            last = now;
            if (tick && (p + 1) % tick == 0) {
                puts("R tick");
                put_kv("pass", pass);
                put_kv("page", p + 1);
                put_kv("max_gap_cycles", max_gap);
                putc('\n');
                last = rdtsc();
            }
        }
        /* what the probe wrote last pass must still be there: a page lost
         * in an earlier round of a migration shows here, before this pass
         * overwrites it */
        if (pass > 1) check_dma(dma_base, dma_pages, pass - 1);
        for (u64 p = 0; p < dma_pages; p++) {
            outl(DMA_PORT, (u32)(dma_base + p * PAGE));
            outl(DMA_PORT + 4, dma_value(pass, p));
        }
        check_dma(dma_base, dma_pages, pass);
        digest = 0;
        for (u64 p = 0; p < pages; p++) {
            u64 want = expected(pass, p), got = *(volatile u64 *)(BASE + p * PAGE);
            if (got != want) corrupt("", p, pass, want, got);
            digest = (digest ^ got) * 0x100000001b3UL;
        }
        last = rdtsc();
    }
    puts("DIRTIER OK");
    put_kv("passes", pass - 1);
    puts(" digest=");
    put_hex(digest);
    put_kv("max_gap_cycles", max_gap);
    putc('\n');
    return STATUS_OK;
}
