#include "runtime.h"

#define COM1 0x3f8

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};
extern u32 start_info_ptr;

static int serial_ready;

static void serial_init(void) {
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8n1 */
    serial_ready = 1;
}

void putc(char c) {
    if (!serial_ready) serial_init();
    /* THR empty (LSR bit 5); a virtual UART is always ready, a real one not */
    while (!(inb(COM1 + 5) & 0x20)) cpu_relax();
    outb(COM1, (u8)c);
}

void puts(const char *s) {
    while (*s) putc(*s++);
}

void put_u64(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(&buf[i]);
}

void put_hex(u64 v) {
    static const char digits[] = "0123456789abcdef";
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do { buf[--i] = digits[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts(&buf[i]);
}

void put_kv(const char *key, u64 v) {
    putc(' ');
    puts(key);
    putc('=');
    put_u64(v);
}

void header(const char *guest) {
    puts("#NFV v");
    put_u64(PROTOCOL_VERSION);
    puts(" guest=");
    puts(guest);
    put_kv("tsc_khz", tsc_khz());
    putc('\n');
}

void guest_exit(u32 status) {
    puts("#END");
    put_kv("status", status);
    putc('\n');
    outl(EXIT_PORT, status);
    for (;;) __asm__ volatile("cli; hlt");
}

void fail(u32 status, const char *msg) {
    puts("ERROR ");
    puts(msg);
    putc('\n');
    guest_exit(status);
}

void exception_handler(u64 vector, u64 word) {
    puts("EXCEPTION");
    put_kv("vector", vector);
    puts(" top_of_stack=");
    put_hex(word);
    putc('\n');
    guest_exit(STATUS_EXCEPTION);
}

/* ---------------------------------------------------------- cmdline --- */
static struct hvm_start_info *start_info(void) {
    struct hvm_start_info *si = (struct hvm_start_info *)(u64)start_info_ptr;
    return (si && si->magic == 0x336ec578) ? si : 0;
}

const char *cmdline(void) {
    struct hvm_start_info *si = start_info();
    if (!si || !si->cmdline_paddr) return "";
    return (const char *)si->cmdline_paddr;
}

/* Finds "key=" at a word start; returns a pointer to its value or 0. */
static const char *find_arg(const char *key) {
    const char *p = cmdline();
    while (*p) {
        while (*p == ' ') p++;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (!*k && *q == '=') return q + 1;
        while (*p && *p != ' ') p++;
    }
    return 0;
}

int arg_u64(const char *key, u64 *out) {
    const char *v = find_arg(key);
    if (!v) return 0;
    u64 n = 0;
    int digits = 0;
    if (v[0] == '0' && v[1] == 'x') { /* hexadecimal, for addresses */
        v += 2;
        for (;; v++, digits++) {
            if (*v >= '0' && *v <= '9') n = n * 16 + (u64)(*v - '0');
            else if (*v >= 'a' && *v <= 'f') n = n * 16 + (u64)(*v - 'a' + 10);
            else break;
        }
    }
    else
        while (*v >= '0' && *v <= '9') { n = n * 10 + (u64)(*v++ - '0'); digits++; }
    if (!digits || (*v && *v != ' ')) {
        puts("ERROR bad number for ");
        puts(key);
        putc('\n');
        guest_exit(STATUS_BAD_ARGS);
    }
    *out = n;
    return 1;
}

int arg_str(const char *key, char *buf, u32 len) {
    const char *v = find_arg(key);
    if (!v) return 0;
    u32 i = 0;
    while (v[i] && v[i] != ' ' && i + 1 < len) { buf[i] = v[i]; i++; }
    buf[i] = 0;
    return 1;
}

/* ------------------------------------------------------------- time --- */
static u64 cached_tsc_khz;

/* Without tsc_khz= on the command line (another VMM), measure the TSC
 * against PIT channel 0 over 10 ms, reading its count back with latch
 * commands (channel 2's gate needs port 0x61, which not every VMM has).
 * Interrupts are off and the count starts at 0xffff, so no IRQ0 fires. */
static u32 pit_ch0_count(void) {
    outb(0x43, 0x00); /* latch channel 0 */
    u32 lo = inb(0x40);
    return lo | ((u32)inb(0x40) << 8);
}

static u64 calibrate_tsc_with_pit(void) {
    const u32 ticks = 11932; /* 10 ms of the 1.193182 MHz PIT */
    outb(0x43, 0x30);        /* channel 0, lo/hi, mode 0 */
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    u32 first = pit_ch0_count();
    if (first == 0xffff && pit_ch0_count() == 0xffff) return 0; /* no PIT */
    u64 start = rdtsc();
    while (first - pit_ch0_count() < ticks) cpu_relax();
    return (rdtsc() - start) / 10;
}

u64 tsc_khz(void) {
    if (!cached_tsc_khz && !arg_u64("tsc_khz", &cached_tsc_khz)) cached_tsc_khz = calibrate_tsc_with_pit();
    if (!cached_tsc_khz) cached_tsc_khz = 1000000;
    return cached_tsc_khz;
}

u64 cycles_to_ns(u64 cycles) { return cycles * 1000000 / tsc_khz(); }

/* -------------------------------------------------------------- RAM --- */
u64 ram_end_above(u64 addr) {
    struct hvm_start_info *si = start_info();
    if (!si || !si->memmap_paddr) return 0;
    struct hvm_memmap_entry *e = (struct hvm_memmap_entry *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (e[i].type == 1 && e[i].addr <= addr && addr < e[i].addr + e[i].size) return e[i].addr + e[i].size;
    return 0;
}

/* -------------------------------------------------------- interrupts --- */
struct idt_entry {
    u16 off0, sel;
    u8 ist, attr;
    u16 off1;
    u32 off2, zero;
} __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));
extern char exception_stubs[];
void spurious_stub(void);

void idt_set(u8 vector, void (*stub)(void)) {
    u64 a = (u64)stub;
    idt[vector].off0 = (u16)a;
    idt[vector].sel = 0x08;
    idt[vector].ist = 0;
    idt[vector].attr = 0x8e; /* present, interrupt gate */
    idt[vector].off1 = (u16)(a >> 16);
    idt[vector].off2 = (u32)(a >> 32);
}

void idt_init(void) {
    for (int v = 0; v < 32; v++) idt_set((u8)v, (void (*)(void))(exception_stubs + 16 * v));
    idt_set(0xff, spurious_stub);
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) desc = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(desc));
}

void lapic_enable(void) {
    /* mask the legacy PICs: interrupts come through the IOAPIC and LAPIC
     * (an unprogrammed PIC would deliver with vector base 0) */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    wrmsr(0x1b, (rdmsr(0x1b) & ~0xfffUL) | LAPIC_BASE | (1 << 11));
    lapic_write(0x80, 0);            /* TPR */
    lapic_write(0xf0, 0x100 | 0xff); /* SVR: enable, spurious vector 0xff */
}

void lapic_eoi(void) { lapic_write(0xb0, 0); }
u32 lapic_id(void) { return lapic_read(0x20) >> 24; }

int has_tsc_deadline(void) {
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    return (c >> 24) & 1;
}

/* -------------------------------------------------------- histogram --- */
void hist_init(struct hist *h, u64 bucket_width) {
    h->bucket_width = bucket_width ? bucket_width : 1;
    h->count = h->overflow = h->max = h->sum = 0;
    h->min = ~0UL;
    for (u32 i = 0; i < HIST_BUCKETS; i++) h->buckets[i] = 0;
}

void hist_add(struct hist *h, u64 v) {
    u64 b = v / h->bucket_width;
    if (b < HIST_BUCKETS) h->buckets[b]++;
    else h->overflow++;
    h->count++;
    h->sum += v;
    if (v < h->min) h->min = v;
    if (v > h->max) h->max = v;
}

/* R hist series=S unit=U width=W bucket=B count=N per non-empty bucket, then
 * R histsum series=S count min max sum overflow. */
void hist_dump(struct hist *h, const char *series, const char *unit) {
    for (u32 i = 0; i < HIST_BUCKETS; i++) {
        if (!h->buckets[i]) continue;
        puts("R hist series=");
        puts(series);
        put_kv("bucket", i);
        put_kv("count", h->buckets[i]);
        putc('\n');
    }
    puts("R histsum series=");
    puts(series);
    puts(" unit=");
    puts(unit);
    put_kv("width", h->bucket_width);
    put_kv("count", h->count);
    put_kv("min", h->count ? h->min : 0);
    put_kv("max", h->max);
    put_kv("sum", h->sum);
    put_kv("overflow", h->overflow);
    putc('\n');
}

/* ------------------------------------------------------------- ACPI --- */
static int sig_eq(const u8 *p, const char *s, int n) {
    for (int i = 0; i < n; i++)
        if (p[i] != (u8)s[i]) return 0;
    return 1;
}

static u64 find_rsdp(void) {
    struct hvm_start_info *si = start_info();
    if (si && si->version >= 1 && si->rsdp_paddr) return si->rsdp_paddr;
    for (u64 a = 0xe0000; a < 0x100000; a += 16)
        if (sig_eq((const u8 *)a, "RSD PTR ", 8)) return a;
    return 0;
}

u64 acpi_table(const char *sig) {
    u64 rsdp = find_rsdp();
    if (!rsdp) return 0;
    const u8 *r = (const u8 *)rsdp;
    int xsdt = r[15] >= 2 && *(const u64 *)(r + 24);
    u64 sdt = xsdt ? *(const u64 *)(r + 24) : *(const u32 *)(r + 16);
    u32 len = *(const u32 *)(sdt + 4);
    u32 esz = xsdt ? 8 : 4;
    for (u32 off = 36; off + esz <= len; off += esz) {
        u64 t = xsdt ? *(const u64 *)(sdt + off) : *(const u32 *)(sdt + off);
        if (sig_eq((const u8 *)t, sig, 4)) return t;
    }
    return 0;
}

int madt_apic_ids(u32 *ids, int max) {
    u64 t = acpi_table("APIC");
    if (!t) return 0;
    u32 tlen = *(const u32 *)(t + 4);
    int n = 0;
    for (u32 p = 44; p + 2 <= tlen;) {
        const u8 *e = (const u8 *)(t + p);
        if (e[1] == 0) break;
        if (e[0] == 0 && (e[4] & 1) && n < max) ids[n++] = e[3]; /* local APIC, enabled */
        if (e[0] == 9 && (e[8] & 1) && n < max) ids[n++] = *(const u32 *)(e + 4); /* x2APIC */
        p += e[1];
    }
    return n;
}

/* Defaults for guests that take no interrupts or start no APs. */
__attribute__((weak)) void timer_irq(void) { lapic_eoi(); }
__attribute__((weak)) void ext_irq(void) { lapic_eoi(); }
__attribute__((weak)) void ap_main(u32 apic_id) { (void)apic_id; }
