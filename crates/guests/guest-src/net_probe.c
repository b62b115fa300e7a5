/* net-probe: a small virtio-net driver for the modern virtio-pci transport
 * (virtio 1.x, PCI 1af4:1041), split virtqueues, receiveq 0 and transmitq 1.
 *
 * Finds the device on PCI bus 0 through the 0xCF8/0xCFC ports, reads its
 * BARs as the firmware or the VMM assigned them (sized, never moved), walks
 * the virtio vendor capabilities (common, notify, ISR, device config, PCI
 * cfg access) and the MSI-X capability, then initialises the device as the
 * virtio 1.2 spec (3.1) says: reset, ACKNOWLEDGE, DRIVER, features (only
 * VERSION_1, NET_F_MAC, NET_F_STATUS, NET_F_MTU accepted), FEATURES_OK (read
 * back), queues, MSI-X vectors (read back), DRIVER_OK.
 *
 * Completions come by MSI-X (every vector aimed at this CPU's LAPIC) and are
 * waited for with interrupts open, spinning; the used rings are polled too,
 * so a missed interrupt costs time, not the run (irq=poll: no MSI-X at all).
 * Every index, length and id the device writes is checked before use.
 *
 * Modes:
 *   mode=echo count=N   send every frame addressed to this MAC (unicast; any
 *                       unicast frame without NET_F_MAC) back with the MACs
 *                       swapped, zero-copy; others are counted, not echoed.
 *                       count=0: forever. R echo frames= bytes= other=
 *   mode=send count=N size=S   N broadcast frames of S bytes (60..1514),
 *                       ethertype 0x88b5. R send frames= bytes=
 *   mode=recv count=N   take N frames of ethertype 0x88b5 (others are
 *                       counted as other), check each one's checksum.
 *                       R recv frames= bad= other=
 * timeout_s=30: how long to wait for the next frame (echo, recv) or for a
 * transmitted frame to complete; irq=msix|poll.
 *
 * Test frame (after the 14-byte Ethernet header, little-endian words):
 *   u32 seq, u32 csum = FNV-1a 32 over the rest, then the rest: the bytes of
 *   xorshift32 words seeded with seq * 0x9e3779b9 + 0x6d2b79f5 (1 if that
 *   is 0), each word's bytes low first.
 * Each buffer holds the 12-byte virtio_net_hdr_v1 then the frame.
 *
 * Status: 0 ok, 1 no device / device error / timeout, 2 bad parameters,
 * 3 a bad frame (recv). */
#include "runtime.h"

#define VENDOR_DEVICE 0x10411af4u
#define NET_VECTOR 0x51
#define QMAX 64
#define HDR_LEN 12
#define FRAME_MAX 1514
#define BUF_LEN (HDR_LEN + FRAME_MAX) /* 1526, what the spec asks for */
#define BUF_STRIDE 1536
#define NBUF (2 * QMAX)
#define ETHERTYPE 0x88b5

/* feature bits */
#define F_MTU 3
#define F_MAC 5
#define F_STATUS 16
#define F_VERSION_1 32
#define ACCEPTED ((1UL << F_MTU) | (1UL << F_MAC) | (1UL << F_STATUS) | (1UL << F_VERSION_1))

/* device_status bits */
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64
#define S_FAILED 128

/* virtio_pci_common_cfg */
#define C_DFSELECT 0x00
#define C_DF 0x04
#define C_GFSELECT 0x08
#define C_GF 0x0c
#define C_MSIX 0x10
#define C_NUMQ 0x12
#define C_STATUS 0x14
#define C_GENERATION 0x15
#define C_Q_SELECT 0x16
#define C_Q_SIZE 0x18
#define C_Q_MSIX 0x1a
#define C_Q_ENABLE 0x1c
#define C_Q_NOFF 0x1e
#define C_Q_DESC 0x20
#define C_Q_DRIVER 0x28
#define C_Q_DEVICE 0x30
#define COMMON_MIN_LEN 0x38
#define NO_VECTOR 0xffff

#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_USED_F_NO_NOTIFY 1

/* ------------------------------------------------------------- PCI --- */
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

static u8 pci_read8(u32 dev, u32 reg) { return (u8)(pci_read(dev, reg) >> (8 * (reg & 3))); }

/* ------------------------------------------------------------ MMIO --- */
static inline u8 mr8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mr16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mr32(u64 a) { return *(volatile u32 *)a; }
static inline void mw8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mw16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mw32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mw64(u64 a, u64 v) { /* two 32-bit writes, low first */
    mw32(a, (u32)v);
    mw32(a + 4, (u32)(v >> 32));
}
/* a full barrier (store -> load): the driver's avail index before the
 * device's used flags */
static inline void mb(void) { __asm__ volatile("lock; orq $0, (%%rsp)" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* --------------------------------------------------- page tables --- */
/* The static tables map the low 4 GiB; a 64-bit BAR above it is mapped here
 * (identity, 2 MiB pages, uncached) under PML4 entry 0 (the first 512 GiB). */
static u64 extra_pd[4][512] __attribute__((aligned(4096)));
static int extra_pds;

static int map_mmio(u64 addr, u64 len) {
    if (addr + len <= 0x100000000UL) return 1;
    if ((addr + len) >> 39) return 0;
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & 0xffffffffff000UL);
    if (!(pml4[0] & 1)) return 0;
    u64 *pdpt = (u64 *)(pml4[0] & 0xffffffffff000UL);
    for (u64 a = addr & ~0x1fffffUL; a < addr + len; a += 0x200000) {
        u64 i = a >> 30;
        if (!(pdpt[i] & 1)) {
            if (extra_pds == 4) return 0;
            u64 *pd = extra_pd[extra_pds++];
            pdpt[i] = (u64)pd | 0x3;
        }
        if (pdpt[i] & 0x80) continue; /* a 1 GiB page already */
        u64 *pd = (u64 *)(pdpt[i] & 0xffffffffff000UL);
        pd[(a >> 21) & 511] = a | 0x9b; /* P | RW | PWT | PCD | PS */
    }
    __asm__ volatile("mov %0, %%cr3" ::"r"(cr3) : "memory");
    return 1;
}

/* ------------------------------------------------------- the device --- */
struct bar {
    u64 addr, size;
    int io;
};
struct region {
    int found;
    u32 bar, off, len;
    u64 addr;
};
static u32 dev;
static struct bar bars[6];
static struct region common, notify, isr, devcfg;
static u32 notify_mult;
static int pcicfg;
static u64 features;

static void set_status(u8 s) { mw8(common.addr + C_STATUS, s); }
static u8 get_status(void) { return mr8(common.addr + C_STATUS); }

static void __attribute__((noreturn)) device_fail(const char *msg) {
    if (common.found) set_status((u8)(get_status() | S_FAILED));
    fail(STATUS_FAIL, msg);
}

/* Reads the six BARs as assigned, sizing each with decoding off (the BAR
 * is written back unchanged: nothing moves). */
static void read_bars(void) {
    u32 cmd = pci_read(dev, 4) & 0xffff;
    pci_write(dev, 4, cmd & ~3u);
    for (u32 i = 0; i < 6; i++) {
        u32 reg = 0x10 + 4 * i, lo = pci_read(dev, reg);
        bars[i].addr = bars[i].size = 0;
        bars[i].io = lo & 1;
        int is64 = !bars[i].io && ((lo >> 1) & 3) == 2 && i < 5;
        u32 hi = is64 ? pci_read(dev, reg + 4) : 0;
        pci_write(dev, reg, ~0u);
        if (is64) pci_write(dev, reg + 4, ~0u);
        u64 mask = pci_read(dev, reg);
        mask = bars[i].io ? (mask & ~3UL) | 0xffffffffffff0000UL : (mask & ~0xfUL);
        if (is64) mask |= (u64)pci_read(dev, reg + 4) << 32;
        else if (!bars[i].io) mask |= 0xffffffff00000000UL;
        pci_write(dev, reg, lo);
        if (is64) pci_write(dev, reg + 4, hi);
        if (mask != 0xffffffff00000000UL && mask != 0xffffffffffff0000UL && mask) {
            bars[i].size = ~mask + 1;
            bars[i].addr = bars[i].io ? (lo & ~3u) : ((lo & ~0xfUL) | ((u64)hi << 32));
        }
        if (is64) {
            i++;
            bars[i].addr = bars[i].size = 0;
            bars[i].io = 0;
        }
    }
    pci_write(dev, 4, cmd | 6); /* memory decoding, bus mastering */
}

/* A capability's window, checked against its BAR and mapped. */
static int take_region(struct region *r, u32 bar, u32 off, u32 len) {
    if (bar > 5 || bars[bar].io || !bars[bar].size || !bars[bar].addr) return 0;
    if ((u64)off + len > bars[bar].size) return 0;
    r->found = 1;
    r->bar = bar;
    r->off = off;
    r->len = len;
    r->addr = bars[bar].addr + off;
    if (!map_mmio(r->addr, len)) device_fail("a BAR lies beyond the first 512 GiB");
    return 1;
}

static u32 msix_at, msix_entries;
static u64 msix_table;

static void walk_caps(void) {
    if (!(pci_read(dev, 4) & (1u << 20))) device_fail("the device has no capability list");
    u32 at = pci_read8(dev, 0x34) & 0xfc;
    for (int guard = 0; at >= 0x40 && guard < 48; guard++) {
        u8 id = pci_read8(dev, at);
        if (id == 0x09) {
            u8 cap_len = pci_read8(dev, at + 2), type = pci_read8(dev, at + 3), bar = pci_read8(dev, at + 4);
            u32 off = pci_read(dev, at + 8), len = pci_read(dev, at + 12);
            if (cap_len >= 16) {
                if (type == 1 && !common.found) take_region(&common, bar, off, len);
                if (type == 2 && !notify.found && cap_len >= 20 && take_region(&notify, bar, off, len))
                    notify_mult = pci_read(dev, at + 16);
                if (type == 3 && !isr.found) take_region(&isr, bar, off, len);
                if (type == 4 && !devcfg.found) take_region(&devcfg, bar, off, len);
                if (type == 5) pcicfg = 1;
            }
        } else if (id == 0x11 && !msix_at) {
            msix_at = at;
        }
        at = pci_read8(dev, at + 1) & 0xfc;
    }
    if (!common.found || common.len < COMMON_MIN_LEN) device_fail("no usable common configuration capability");
    if (!notify.found) device_fail("no usable notify capability");
    if (msix_at) {
        u32 head = pci_read(dev, msix_at), table = pci_read(dev, msix_at + 4);
        u32 n = ((head >> 16) & 0x7ff) + 1, bar = table & 7, off = table & ~7u;
        struct region r = {0, 0, 0, 0, 0};
        if (take_region(&r, bar, off, n * 16)) {
            msix_table = r.addr;
            msix_entries = n;
        }
    }
    puts("R caps");
    put_kv("slot", dev);
    put_kv("common_bar", common.bar);
    puts(" common_off=");
    put_hex(common.off);
    puts(" common_len=");
    put_hex(common.len);
    put_kv("notify_bar", notify.bar);
    puts(" notify_off=");
    put_hex(notify.off);
    puts(" notify_len=");
    put_hex(notify.len);
    put_kv("notify_mult", notify_mult);
    put_kv("isr", isr.found);
    put_kv("device_cfg", devcfg.found);
    puts(" device_cfg_len=");
    put_hex(devcfg.len);
    put_kv("pci_cfg", pcicfg);
    put_kv("msix_entries", msix_entries);
    if (msix_at) {
        u32 table = pci_read(dev, msix_at + 4);
        put_kv("msix_bar", table & 7);
        puts(" msix_off=");
        put_hex(table & ~7u);
    }
    puts(" bar=");
    put_hex(bars[common.bar].addr);
    puts(" bar_size=");
    put_hex(bars[common.bar].size);
    putc('\n');
}

/* ------------------------------------------------------ interrupts --- */
void ext_stub(void);
static volatile u64 irqs;

void ext_irq(void) {
    irqs++;
    lapic_eoi();
}

/* MSI-X table entries 0..n-1 to this CPU's LAPIC, NET_VECTOR, then MSI-X
 * on with the function unmasked. */
static void msix_enable(u32 n) {
    volatile u32 *t = (volatile u32 *)msix_table;
    for (u32 v = 0; v < n; v++) {
        t[4 * v + 0] = 0xfee00000u | (lapic_id() << 12);
        t[4 * v + 1] = 0;
        t[4 * v + 2] = NET_VECTOR; /* fixed, edge */
        t[4 * v + 3] = 0;          /* unmasked */
    }
    u32 head = pci_read(dev, msix_at);
    pci_write(dev, msix_at, (head & ~(1u << 30)) | (1u << 31));
}

/* ----------------------------------------------------- virtqueues --- */
struct desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
struct avail {
    u16 flags, idx, ring[QMAX], used_event;
};
struct used_elem {
    u32 id, len;
};
struct used {
    u16 flags, idx;
    struct used_elem ring[QMAX];
    u16 avail_event;
};
struct vq {
    struct desc desc[QMAX] __attribute__((aligned(4096)));
    struct avail avail __attribute__((aligned(4096)));
    struct used used __attribute__((aligned(4096)));
    u16 size, last_used, avail_idx, index;
    u64 notify_addr;
    int inflight[QMAX]; /* buffer index + 1 posted on this descriptor, 0 free */
    u32 posted_len[QMAX];
};
static struct vq rxq, txq;
static u8 buffers[NBUF][BUF_STRIDE] __attribute__((aligned(4096)));
static u32 free_bufs[NBUF], nfree;
static u64 notifies, suppressed, polled, timeout_cycles;
static int msix_on; /* interrupts expected */

static u32 take_buf(void) {
    if (!nfree) fail(STATUS_FAIL, "out of buffers (a driver bug)");
    return free_bufs[--nfree];
}
static void give_buf(u32 b) { free_bufs[nfree++] = b; }

static u16 queue_setup(struct vq *q, u16 index, u16 vector) {
    mw16(common.addr + C_Q_SELECT, index);
    u16 max = mr16(common.addr + C_Q_SIZE);
    if (max == 0) device_fail("queue size 0: the queue is not available");
    if (max & (max - 1)) device_fail("queue size is not a power of two");
    if (mr16(common.addr + C_Q_ENABLE)) device_fail("queue enabled after reset");
    u16 size = max < QMAX ? max : QMAX;
    mw16(common.addr + C_Q_SIZE, size);
    if (mr16(common.addr + C_Q_SIZE) != size) device_fail("the queue size written does not read back");
    q->size = size;
    q->index = index;
    q->last_used = q->avail_idx = 0;
    q->avail.flags = 0;
    q->avail.idx = 0;
    mw64(common.addr + C_Q_DESC, (u64)q->desc);
    mw64(common.addr + C_Q_DRIVER, (u64)&q->avail);
    mw64(common.addr + C_Q_DEVICE, (u64)&q->used);
    u16 got = NO_VECTOR;
    if (vector != NO_VECTOR) {
        mw16(common.addr + C_Q_MSIX, vector);
        got = mr16(common.addr + C_Q_MSIX);
    }
    u16 qnoff = mr16(common.addr + C_Q_NOFF);
    u64 noff = (u64)qnoff * notify_mult;
    if (noff + 2 > notify.len) device_fail("queue_notify_off * notify_off_multiplier lies outside the notify window");
    q->notify_addr = notify.addr + noff;
    mw16(common.addr + C_Q_ENABLE, 1);
    puts("R queue");
    put_kv("index", index);
    put_kv("max", max);
    put_kv("size", size);
    put_kv("notify_off", qnoff);
    puts(" notify_at=");
    put_hex(notify.off + noff);
    put_kv("vector", got);
    putc('\n');
    return got;
}

/* Makes descriptor d available with buffer b; the caller notifies. */
static void post(struct vq *q, u16 d, u32 b, u32 len, u16 flags) {
    q->desc[d].addr = (u64)buffers[b];
    q->desc[d].len = len;
    q->desc[d].flags = flags;
    q->desc[d].next = 0;
    q->inflight[d] = (int)b + 1;
    q->posted_len[d] = len;
    q->avail.ring[q->avail_idx & (q->size - 1)] = d;
    barrier();
    q->avail_idx++;
    *(volatile u16 *)&q->avail.idx = q->avail_idx;
}

static void kick(struct vq *q) {
    mb();
    if (*(volatile u16 *)&q->used.flags & VIRTQ_USED_F_NO_NOTIFY) {
        suppressed++;
        return;
    }
    mw16(q->notify_addr, q->index);
    notifies++;
}

static u16 used_idx(struct vq *q) { return *(volatile u16 *)&q->used.idx; }

/* The next used element, checked: 1 and *d, *b, *len, or 0 if none. */
static int next_used(struct vq *q, u16 *d, u32 *b, u32 *len) {
    u16 idx = used_idx(q);
    if (idx == q->last_used) return 0;
    if ((u16)(idx - q->last_used) > q->size) device_fail("used index ran ahead of the ring");
    barrier();
    struct used_elem e = *(volatile struct used_elem *)&q->used.ring[q->last_used & (q->size - 1)];
    q->last_used++;
    if (e.id >= q->size) device_fail("used ring id outside the ring");
    if (!q->inflight[e.id]) device_fail("used ring id of a descriptor not in flight");
    if (e.len > q->posted_len[e.id] && (q->desc[e.id].flags & VIRTQ_DESC_F_WRITE))
        device_fail("used length larger than the buffer");
    *d = (u16)e.id;
    *b = (u32)q->inflight[e.id] - 1;
    *len = e.len;
    q->inflight[e.id] = 0;
    return 1;
}

/* Waits until q has a used element: interrupts open, spinning, the used
 * index polled too. 0 on timeout (never with timeout 0). */
static int wait_used(struct vq *q, u64 timeout) {
    u64 t0 = rdtsc(), seen = irqs;
    while (used_idx(q) == q->last_used) {
        if (timeout && rdtsc() - t0 > timeout) return 0;
        __asm__ volatile("sti" ::: "memory");
        u64 t1 = rdtsc();
        while (irqs == seen && used_idx(q) == q->last_used && rdtsc() - t1 < tsc_khz() * 10) cpu_relax();
        __asm__ volatile("cli" ::: "memory");
    }
    if (irqs == seen && msix_on) {
        /* found by polling: give the interrupt 1 ms more before counting
         * the completion as one without an interrupt */
        __asm__ volatile("sti" ::: "memory");
        u64 t1 = rdtsc();
        while (irqs == seen && rdtsc() - t1 < tsc_khz()) cpu_relax();
        __asm__ volatile("cli" ::: "memory");
        if (irqs == seen) polled++;
    }
    return 1;
}

static u16 free_desc(struct vq *q) {
    for (u16 d = 0; d < q->size; d++)
        if (!q->inflight[d]) return d;
    return q->size;
}

/* Reclaims every completed transmit buffer. */
static void reap_tx(void) {
    u16 d;
    u32 b, len;
    while (next_used(&txq, &d, &b, &len)) give_buf(b);
}

/* A descriptor on the transmit queue, waiting for one to complete if all
 * are in flight. */
static u16 tx_slot(void) {
    reap_tx();
    u16 d = free_desc(&txq);
    while (d == txq.size) {
        if (!wait_used(&txq, timeout_cycles)) device_fail("timeout: no transmit completion");
        reap_tx();
        d = free_desc(&txq);
    }
    return d;
}

static void drain_tx(void) {
    for (;;) {
        reap_tx();
        int busy = 0;
        for (u16 d = 0; d < txq.size; d++) busy |= txq.inflight[d];
        if (!busy) return;
        if (!wait_used(&txq, timeout_cycles)) device_fail("timeout: no transmit completion");
    }
}

static void clear_hdr(u8 *p) {
    for (int i = 0; i < HDR_LEN; i++) p[i] = 0;
}

/* ---------------------------------------------------- test frames --- */
static u32 fnv1a(const u8 *p, u32 n) {
    u32 h = 2166136261u;
    for (u32 i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

static void fill_pattern(u8 *p, u32 n, u32 seq) {
    u32 s = seq * 0x9e3779b9u + 0x6d2b79f5u;
    if (!s) s = 1;
    for (u32 i = 0; i < n; i += 4) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        for (u32 k = 0; k < 4 && i + k < n; k++) p[i + k] = (u8)(s >> (8 * k));
    }
}

static void put_le32(u8 *p, u32 v) {
    for (int i = 0; i < 4; i++) p[i] = (u8)(v >> (8 * i));
}
static u32 get_le32(const u8 *p) { return p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }

/* ------------------------------------------------------------ main --- */
static u8 mac[6] = {0x02, 0, 0, 0, 0, 0};

static u16 cfg16(u32 off) { return mr16(devcfg.addr + off); }

/* Device config read consistently (config_generation before and after). */
static void read_config(u16 *status, u16 *mtu) {
    for (int tries = 0;; tries++) {
        if (tries == 100) device_fail("config_generation never settles");
        u8 gen = mr8(common.addr + C_GENERATION);
        if (features & (1UL << F_MAC))
            for (int i = 0; i < 6; i++) mac[i] = mr8(devcfg.addr + (u32)i);
        *status = (features & (1UL << F_STATUS)) ? cfg16(6) : 1; /* link up when not reported */
        *mtu = (features & (1UL << F_MTU)) ? cfg16(10) : 1500;
        if (mr8(common.addr + C_GENERATION) == gen) return;
    }
}

static void put_mac(const u8 *m) {
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 6; i++) {
        if (i) putc(':');
        putc(hex[m[i] >> 4]);
        putc(hex[m[i] & 15]);
    }
}

static int echo(u64 count) {
    u64 frames = 0, bytes = 0, other = 0;
    while (!count || frames < count) {
        reap_tx();
        u16 d;
        u32 b, len;
        if (!next_used(&rxq, &d, &b, &len)) {
            if (!wait_used(&rxq, count ? timeout_cycles : 0)) device_fail("timeout: no frame received");
            continue;
        }
        u8 *p = buffers[b];
        u32 flen = len >= HDR_LEN ? len - HDR_LEN : 0;
        u8 *f = p + HDR_LEN;
        int mine = flen >= 14 && !(f[0] & 1);
        if (mine && (features & (1UL << F_MAC)))
            for (int i = 0; i < 6; i++) mine &= f[i] == mac[i];
        if (!mine) {
            other++;
            post(&rxq, d, b, BUF_LEN, VIRTQ_DESC_F_WRITE);
            kick(&rxq);
            continue;
        }
        for (int i = 0; i < 6; i++) {
            u8 t = f[i];
            f[i] = f[6 + i];
            f[6 + i] = t;
        }
        clear_hdr(p);
        u16 t = tx_slot();
        post(&txq, t, b, len, 0);
        kick(&txq);
        post(&rxq, d, take_buf(), BUF_LEN, VIRTQ_DESC_F_WRITE);
        kick(&rxq);
        frames++;
        bytes += flen;
    }
    drain_tx();
    puts("R echo");
    put_kv("frames", frames);
    put_kv("bytes", bytes);
    put_kv("other", other);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    put_kv("notifies", notifies);
    put_kv("suppressed", suppressed);
    putc('\n');
    return STATUS_OK;
}

static int send(u64 count, u64 size) {
    u64 bytes = 0;
    for (u64 n = 0; n < count; n++) {
        u16 d = tx_slot();
        u32 b = take_buf();
        u8 *p = buffers[b], *f = p + HDR_LEN;
        clear_hdr(p);
        for (int i = 0; i < 6; i++) {
            f[i] = 0xff;
            f[6 + i] = mac[i];
        }
        f[12] = ETHERTYPE >> 8;
        f[13] = ETHERTYPE & 0xff;
        u32 rest = (u32)size - 14 - 8;
        fill_pattern(f + 22, rest, (u32)n);
        put_le32(f + 14, (u32)n);
        put_le32(f + 18, fnv1a(f + 22, rest));
        post(&txq, d, b, HDR_LEN + (u32)size, 0);
        kick(&txq);
        bytes += size;
    }
    drain_tx();
    puts("R send");
    put_kv("frames", count);
    put_kv("bytes", bytes);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    put_kv("notifies", notifies);
    put_kv("suppressed", suppressed);
    putc('\n');
    return STATUS_OK;
}

static int recv(u64 count) {
    u64 frames = 0, bad = 0, other = 0, bytes = 0;
    while (frames < count) {
        u16 d;
        u32 b, len;
        if (!next_used(&rxq, &d, &b, &len)) {
            if (!wait_used(&rxq, timeout_cycles)) device_fail("timeout: no frame received");
            continue;
        }
        u8 *f = buffers[b] + HDR_LEN;
        u32 flen = len >= HDR_LEN ? len - HDR_LEN : 0;
        if (flen < 14 || f[12] != (ETHERTYPE >> 8) || f[13] != (ETHERTYPE & 0xff)) {
            other++;
        } else {
            frames++;
            bytes += flen;
            if (flen < 22 || get_le32(f + 18) != fnv1a(f + 22, flen - 22)) {
                if (!bad) {
                    puts("R badframe");
                    put_kv("seq", flen >= 18 ? get_le32(f + 14) : 0);
                    put_kv("len", flen);
                    putc('\n');
                }
                bad++;
            }
        }
        post(&rxq, d, b, BUF_LEN, VIRTQ_DESC_F_WRITE);
        kick(&rxq);
    }
    puts("R recv");
    put_kv("frames", frames);
    put_kv("bad", bad);
    put_kv("other", other);
    put_kv("bytes", bytes);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    putc('\n');
    return bad ? STATUS_CORRUPT : STATUS_OK;
}

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

int guest_main(void) {
    char mode[8] = "echo", irq[8] = "msix";
    u64 count = 10, size = 60, timeout_s = 30;
    header("net-probe");
    arg_str("mode", mode, sizeof(mode));
    arg_str("irq", irq, sizeof(irq));
    arg_u64("count", &count);
    arg_u64("size", &size);
    arg_u64("timeout_s", &timeout_s);
    int m_echo = streq(mode, "echo"), m_send = streq(mode, "send"), m_recv = streq(mode, "recv");
    if (!m_echo && !m_send && !m_recv) fail(STATUS_BAD_ARGS, "mode must be echo, send or recv");
    if (!streq(irq, "msix") && !streq(irq, "poll")) fail(STATUS_BAD_ARGS, "irq must be msix or poll");
    if (m_send && (size < 60 || size > FRAME_MAX)) fail(STATUS_BAD_ARGS, "size must be 60..1514");
    if (!count && !m_echo) fail(STATUS_BAD_ARGS, "count=0 (forever) is for mode=echo");
    if (!timeout_s || timeout_s > 3600) fail(STATUS_BAD_ARGS, "timeout_s must be 1..3600");
    timeout_cycles = tsc_khz() * 1000 * timeout_s;

    for (dev = 0; dev < 32; dev++)
        if (pci_read(dev, 0) == VENDOR_DEVICE) break;
    if (dev == 32) fail(STATUS_FAIL, "no modern virtio-net device (1af4:1041) on PCI bus 0");
    read_bars();
    walk_caps();

    /* 3.1.1: reset, then ACKNOWLEDGE and DRIVER */
    set_status(0);
    for (u64 t = rdtsc(); get_status() != 0;)
        if (rdtsc() - t > tsc_khz() * 1000) fail(STATUS_FAIL, "the device does not finish its reset");
    set_status(S_ACKNOWLEDGE);
    set_status(S_ACKNOWLEDGE | S_DRIVER);

    mw32(common.addr + C_DFSELECT, 0);
    u64 offered = mr32(common.addr + C_DF);
    mw32(common.addr + C_DFSELECT, 1);
    offered |= (u64)mr32(common.addr + C_DF) << 32;
    if (!(offered & (1UL << F_VERSION_1))) device_fail("VIRTIO_F_VERSION_1 not offered");
    features = offered & ACCEPTED;
    mw32(common.addr + C_GFSELECT, 0);
    mw32(common.addr + C_GF, (u32)features);
    mw32(common.addr + C_GFSELECT, 1);
    mw32(common.addr + C_GF, (u32)(features >> 32));
    set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(get_status() & S_FEATURES_OK)) device_fail("FEATURES_OK did not read back: features refused");

    u16 nq = mr16(common.addr + C_NUMQ);
    if (nq < 2) device_fail("fewer than two queues");
    u16 status, mtu;
    if (!devcfg.found && (features & ((1UL << F_MAC) | (1UL << F_STATUS) | (1UL << F_MTU))))
        device_fail("no device configuration capability");
    if (devcfg.found && devcfg.len < 12 && (features & (1UL << F_MTU))) device_fail("device config too short for mtu");
    if (devcfg.found && devcfg.len < 8 && (features & (1UL << F_STATUS))) device_fail("device config too short for status");
    if (devcfg.found && devcfg.len < 6 && (features & (1UL << F_MAC))) device_fail("device config too short for mac");
    read_config(&status, &mtu);

    /* interrupts: config on entry 0, receiveq 1, transmitq 2 (all on 0
     * when the table is smaller) */
    idt_init();
    idt_set(NET_VECTOR, ext_stub);
    lapic_enable();
    int msix = irq[0] == 'm' && msix_table;
    u16 vcfg = NO_VECTOR, vrx = NO_VECTOR, vtx = NO_VECTOR;
    if (msix) {
        msix_enable(msix_entries < 3 ? 1 : 3);
        vcfg = 0;
        vrx = msix_entries < 3 ? 0 : 1;
        vtx = msix_entries < 3 ? 0 : 2;
        mw16(common.addr + C_MSIX, vcfg);
        if (mr16(common.addr + C_MSIX) != vcfg) msix = 0;
    }
    u16 grx = queue_setup(&rxq, 0, msix ? vrx : NO_VECTOR);
    u16 gtx = queue_setup(&txq, 1, msix ? vtx : NO_VECTOR);
    if (msix && (grx != vrx || gtx != vtx)) msix = 0; /* refused: poll */
    msix_on = msix;
    set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (get_status() & (S_NEEDS_RESET | S_FAILED)) device_fail("the device needs a reset after DRIVER_OK");

    if (m_send && size > (u64)mtu + 14) fail(STATUS_BAD_ARGS, "size is larger than the device's mtu + 14");

    nfree = 0;
    for (u32 b = NBUF; b > 0; b--) give_buf(b - 1);
    for (u16 d = 0; d < rxq.size; d++) post(&rxq, d, take_buf(), BUF_LEN, VIRTQ_DESC_F_WRITE);
    kick(&rxq);

    puts("R negotiated features=");
    put_hex(features);
    puts(" mac=");
    put_mac(mac);
    put_kv("mtu", mtu);
    put_kv("status", status);
    put_kv("queue_size", rxq.size);
    put_kv("tx_queue_size", txq.size);
    put_kv("msix", (u64)msix);
    puts(" offered=");
    put_hex(offered);
    put_kv("queues", nq);
    putc('\n');

    if (m_echo) return echo(count);
    if (m_send) return send(count, size);
    return recv(count);
}
