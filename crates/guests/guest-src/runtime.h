/* Runtime shared by the bundled guests: COM1 output, the nfvisor guest line
 * protocol, command-line parsing, TSC, LAPIC, IDT, ACPI MADT, exit port. */
#ifndef NFV_RUNTIME_H
#define NFV_RUNTIME_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define PROTOCOL_VERSION 1
#define EXIT_PORT 0xf4
#define BENCH_PORT 0x9f0 /* free on QEMU machines too (0x510 is fw_cfg) */
#define BENCH_MMIO 0xd0000000UL
#define LAPIC_BASE 0xfee00000UL

/* Guest status codes (written to EXIT_PORT). */
#define STATUS_OK 0
#define STATUS_FAIL 1
#define STATUS_BAD_ARGS 2
#define STATUS_CORRUPT 3
#define STATUS_EXCEPTION 4

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

/* output */
void putc(char c);
void puts(const char *s);
void put_u64(u64 v);
void put_hex(u64 v);
/* "key=value" helpers for protocol records */
void put_kv(const char *key, u64 v);
void header(const char *guest);
void __attribute__((noreturn)) guest_exit(u32 status);
void __attribute__((noreturn)) fail(u32 status, const char *msg);

/* command line: "mode=... key=value ..." */
const char *cmdline(void);
int arg_u64(const char *key, u64 *out);
int arg_str(const char *key, char *buf, u32 len);

/* time */
u64 tsc_khz(void);
u64 cycles_to_ns(u64 cycles);

/* memory map from the PVH start_info: end of the RAM region holding addr */
u64 ram_end_above(u64 addr);
extern u8 __image_end[];

/* interrupts */
void idt_init(void);
void idt_set(u8 vector, void (*stub)(void));
void lapic_enable(void);
void lapic_eoi(void);
u32 lapic_id(void);
int has_tsc_deadline(void);

/* histogram of samples with fixed-width buckets, dumped as protocol records */
#define HIST_BUCKETS 4096
struct hist {
    u64 bucket_width;
    u64 count, overflow, min, max, sum;
    u32 buckets[HIST_BUCKETS];
};
void hist_init(struct hist *h, u64 bucket_width);
void hist_add(struct hist *h, u64 v);
void hist_dump(struct hist *h, const char *series, const char *unit);

/* ACPI: a table by signature (0 if absent); APIC IDs of the enabled
 * processors, from the MADT */
u64 acpi_table(const char *sig);
int madt_apic_ids(u32 *ids, int max);

#endif
