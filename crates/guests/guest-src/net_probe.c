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
 *   mode=bad case=NAME count=N   a hostile driver: misbehaves as NAME says,
 *                       reads the device status, resets the device (status
 *                       must read back 0: survived=1), prints
 *                       R bad case=NAME status_after= survived= ..., then
 *                       initialises the device afresh (a new R negotiated)
 *                       and echoes N frames as mode=echo does. Cases:
 *     loop          a transmit chain 0 -> 1 -> 0 (NEXT set on both), then
 *                   one good frame (after_ok=1: it completed)
 *     past_ram      a transmit descriptor at 0xfff00000 (beyond RAM), one
 *                   good frame after it; then the only receive buffer posted
 *                   lies there too (R badwait: the host sends filler frames),
 *                   rx_len= what the device reported for it, then a good
 *                   receive buffer (rx_after_ok=1: a frame arrived in it)
 *     long_chain    a transmit chain of queue_size + 1 descriptors (next
 *                   pointers wrap; no INDIRECT_DESC), then one good frame
 *     queue_size3   queue_size=3 written before enabling (and twice the
 *                   maximum), each read back; then a valid size, DRIVER_OK
 *     ring_outside  receiveq's rings at 0xfff00000.., enabled, DRIVER_OK:
 *                   needs_reset= whether the device set NEEDS_RESET
 *     unoffered     feature bit 33 (not offered) acked with VERSION_1:
 *                   features_ok= whether FEATURES_OK stuck (it must not)
 *     reset_mid     R badwait, echoes 3 frames (any unicast), queues 8 more
 *                   transmit frames, kicks and resets at once (frames in
 *                   flight both ways); touched=1 if a used ring changed
 *                   after the reset read back 0
 *   mode=link count=N   needs NET_F_STATUS: the configuration vector gets
 *                       an MSI-X entry and an interrupt vector of its own
 *                       (entry 0, CFG_VECTOR; with fewer than three entries
 *                       the queues get none), R link status=S gen= vector=
 *                       msix=, then waits for configuration changes: each
 *                       time config_generation moved, the status is read
 *                       again (between two equal config_generation reads)
 *                       and R link status=S change=K via=irq|poll gen=
 *                       retries= printed (via=poll: the generation was
 *                       seen to move by polling, every 10 ms, and no
 *                       configuration interrupt came within 100 ms after);
 *                       after N of them R link changes=N irqs= (config
 *                       interrupts) late= (those that came with no new
 *                       generation) queue_irqs=, status 0 (1: timeout, no
 *                       change within timeout_s)
 *   Frames the guest builds: ethertype 0x88b7 inside bad chains, 0x88b8
 *   good ones sent during the bad part; the host's filler frames are
 *   expected to be 0x88b6.
 * timeout_s=30: how long to wait for the next frame (echo, recv, badwait) or
 * for a transmitted frame to complete; irq=msix|poll.
 * event_idx=0|1: with 1, VIRTIO_F_RING_EVENT_IDX (bit 29) is accepted when
 * offered (R negotiated event_idx=1) and the rings are driven as the virtio
 * 1.2 spec (2.7.7, 2.7.10) and Linux's virtio_ring do: after each used
 * element taken (and before each wait) the driver writes used_event (the u16
 * after the avail ring's size entries) = the next used index it will read,
 * asking for an interrupt as soon as the device adds one; and it notifies a
 * queue only when vring_need_event(avail_event, new avail idx, avail idx at
 * the previous notify decision) holds, avail_event being the u16 after the
 * used ring's size entries (the used ring's NO_NOTIFY flag is then ignored,
 * and the driver sets no VIRTQ_AVAIL_F_NO_INTERRUPT either way). Default 0:
 * EVENT_IDX is never accepted, and notifications follow NO_NOTIFY.
 * Result records (echo, send, recv) carry kicks= (notifications written)
 * and kicks_suppressed= (notifications held back, by avail_event or by
 * NO_NOTIFY), totals and per queue (rx_kicks= ... tx_kicks_suppressed=);
 * notifies= and suppressed= are the same totals under their older names.
 * A timeout on a queue prints R stall queue=rx|tx with that queue's ring
 * state (see stall()) for both queues before the ERROR line.
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
#define CFG_VECTOR 0x52 /* mode=link: configuration changes only */
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
#define F_EVENT_IDX 29
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

/* mode=link: configuration-change interrupts on CFG_VECTOR, counted apart
 * (entry.S's stubs call ext_irq and timer_irq only; this one saves the
 * same registers: the stack is 16-byte aligned at the call) */
void cfg_stub(void);
static volatile u64 cfg_irqs;

void cfg_irq(void) {
    cfg_irqs++;
    lapic_eoi();
}

__asm__(".text\n"
        ".globl cfg_stub\n"
        "cfg_stub:\n"
        "    pushq %rax\n"
        "    pushq %rcx\n"
        "    pushq %rdx\n"
        "    pushq %rsi\n"
        "    pushq %rdi\n"
        "    pushq %r8\n"
        "    pushq %r9\n"
        "    pushq %r10\n"
        "    pushq %r11\n"
        "    call cfg_irq\n"
        "    popq %r11\n"
        "    popq %r10\n"
        "    popq %r9\n"
        "    popq %r8\n"
        "    popq %rdi\n"
        "    popq %rsi\n"
        "    popq %rdx\n"
        "    popq %rcx\n"
        "    popq %rax\n"
        "    iretq\n");

static u8 entry0_vector = NET_VECTOR; /* CFG_VECTOR in mode=link */

/* MSI-X table entries 0..n-1 to this CPU's LAPIC, NET_VECTOR (entry 0:
 * entry0_vector), then MSI-X on with the function unmasked. */
static void msix_enable(u32 n) {
    volatile u32 *t = (volatile u32 *)msix_table;
    for (u32 v = 0; v < n; v++) {
        t[4 * v + 0] = 0xfee00000u | (lapic_id() << 12);
        t[4 * v + 1] = 0;
        t[4 * v + 2] = v ? NET_VECTOR : entry0_vector; /* fixed, edge */
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
    u16 kicked_idx; /* avail_idx at the last notify decision (EVENT_IDX) */
    u64 notify_addr;
    u64 kicks, kicks_suppressed; /* this queue's, every session together */
    int inflight[QMAX]; /* buffer index + 1 posted on this descriptor, 0 free */
    u32 posted_len[QMAX];
};
static struct vq rxq, txq;
static u8 buffers[NBUF][BUF_STRIDE] __attribute__((aligned(4096)));
static u32 free_bufs[NBUF], nfree;
static u64 notifies, suppressed, polled, timeout_cycles;
static int msix_on;   /* interrupts expected */
static int event_idx; /* VIRTIO_F_RING_EVENT_IDX negotiated */
static u64 want_event_idx;

/* EVENT_IDX's two words, placed by the queue size in use (not QMAX):
 * used_event after the avail ring's entries (the driver's), avail_event
 * after the used ring's (the device's) */
static volatile u16 *used_event_of(struct vq *q) { return (volatile u16 *)((u8 *)&q->avail + 4 + 2 * (u64)q->size); }
static volatile u16 *avail_event_of(struct vq *q) { return (volatile u16 *)((u8 *)&q->used + 4 + 8 * (u64)q->size); }

/* Linux's vring_need_event: whether event lies in [old, new_idx) */
static int need_event(u16 event, u16 new_idx, u16 old) { return (u16)(new_idx - event - 1) < (u16)(new_idx - old); }

static u32 take_buf(void) {
    if (!nfree) fail(STATUS_FAIL, "out of buffers (a driver bug)");
    return free_bufs[--nfree];
}
static void give_buf(u32 b) { free_bufs[nfree++] = b; }

/* mode=bad: what the driver does wrong (see the top of the file) */
enum { BAD_NONE, BAD_LOOP, BAD_PAST_RAM, BAD_LONG_CHAIN, BAD_QSIZE3, BAD_RING_OUTSIDE, BAD_UNOFFERED, BAD_RESET_MID };
#define RAM_HOLE 0xfff00000UL /* beyond guest RAM (and below 4 GiB) */
static u16 qsize3_read, over_max, over_max_read;

static u16 queue_setup(struct vq *q, u16 index, u16 vector, int bad) {
    mw16(common.addr + C_Q_SELECT, index);
    u16 max = mr16(common.addr + C_Q_SIZE);
    if (max == 0) device_fail("queue size 0: the queue is not available");
    if (max & (max - 1)) device_fail("queue size is not a power of two");
    if (mr16(common.addr + C_Q_ENABLE)) device_fail("queue enabled after reset");
    if (bad == BAD_QSIZE3 && index == 0) {
        mw16(common.addr + C_Q_SIZE, 3);
        qsize3_read = mr16(common.addr + C_Q_SIZE);
        over_max = max <= 0x4000 ? (u16)(2 * max) : 0x8000;
        mw16(common.addr + C_Q_SIZE, over_max);
        over_max_read = mr16(common.addr + C_Q_SIZE);
    }
    u16 size = max < QMAX ? max : QMAX;
    mw16(common.addr + C_Q_SIZE, size);
    if (mr16(common.addr + C_Q_SIZE) != size) device_fail("the queue size written does not read back");
    /* the rings as a driver hands them over: zeroed (a reset left the
     * previous session's indexes in them) */
    q->size = size;
    q->index = index;
    q->last_used = q->avail_idx = q->kicked_idx = 0;
    for (u32 i = 0; i < QMAX; i++) {
        q->inflight[i] = 0;
        q->posted_len[i] = 0;
        q->used.ring[i].id = q->used.ring[i].len = 0;
    }
    q->avail.flags = 0;
    q->avail.idx = 0;
    q->used.flags = 0;
    *(volatile u16 *)&q->used.idx = 0;
    *used_event_of(q) = 0; /* an interrupt for the first used element */
    *avail_event_of(q) = 0;
    if (bad == BAD_RING_OUTSIDE && index == 0) {
        mw64(common.addr + C_Q_DESC, RAM_HOLE);
        mw64(common.addr + C_Q_DRIVER, RAM_HOLE + 0x1000);
        mw64(common.addr + C_Q_DEVICE, RAM_HOLE + 0x2000);
    } else {
        mw64(common.addr + C_Q_DESC, (u64)q->desc);
        mw64(common.addr + C_Q_DRIVER, (u64)&q->avail);
        mw64(common.addr + C_Q_DEVICE, (u64)&q->used);
    }
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

static void set_desc(struct vq *q, u16 d, u64 addr, u32 len, u16 flags, u16 next) {
    q->desc[d].addr = addr;
    q->desc[d].len = len;
    q->desc[d].flags = flags;
    q->desc[d].next = next;
}

/* Makes the chain at head available; the caller notifies. */
static void publish(struct vq *q, u16 head) {
    q->avail.ring[q->avail_idx & (q->size - 1)] = head;
    barrier();
    q->avail_idx++;
    *(volatile u16 *)&q->avail.idx = q->avail_idx;
}

/* Makes descriptor d available with buffer b; the caller notifies. */
static void post(struct vq *q, u16 d, u32 b, u32 len, u16 flags) {
    set_desc(q, d, (u64)buffers[b], len, flags, 0);
    q->inflight[d] = (int)b + 1;
    q->posted_len[d] = len;
    publish(q, d);
}

/* Notifies the device of what was published since the last call, unless
 * it said it needs no notification (avail_event with EVENT_IDX, NO_NOTIFY
 * without): Linux's virtqueue_kick_prepare_split, then the notify write. */
static void kick(struct vq *q) {
    u16 old = q->kicked_idx, new_idx = q->avail_idx;
    q->kicked_idx = new_idx;
    mb(); /* the avail index out before avail_event / flags are read */
    int needed = event_idx ? need_event(*avail_event_of(q), new_idx, old)
                           : !(*(volatile u16 *)&q->used.flags & VIRTQ_USED_F_NO_NOTIFY);
    if (!needed) {
        suppressed++;
        q->kicks_suppressed++;
        return;
    }
    mw16(q->notify_addr, q->index);
    notifies++;
    q->kicks++;
}

/* EVENT_IDX: an interrupt wanted as soon as the device adds the used
 * element at last_used (the next one this driver reads); the write out
 * before the used index is read again (Linux's virtio_store_mb) */
static void want_next_interrupt(struct vq *q) {
    if (!event_idx) return;
    *used_event_of(q) = q->last_used;
    mb();
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
    want_next_interrupt(q);
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
    want_next_interrupt(q);
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

static u64 progress; /* frames echoed, sent or received so far */

static void put_queue_state(struct vq *q, const char *name) {
    u64 busy = 0;
    for (u16 d = 0; d < q->size; d++) busy += q->inflight[d] != 0;
    puts("R stall queue=");
    puts(name);
    put_kv("event_idx", (u64)event_idx);
    put_kv("avail_idx", q->avail_idx);
    put_kv("kicked_idx", q->kicked_idx);
    put_kv("used_idx", used_idx(q));
    put_kv("last_used", q->last_used);
    put_kv("avail_event", *avail_event_of(q));
    put_kv("used_event", *used_event_of(q));
    put_kv("used_flags", *(volatile u16 *)&q->used.flags);
    put_kv("inflight", busy);
    put_kv("kicks", q->kicks);
    put_kv("kicks_suppressed", q->kicks_suppressed);
    put_kv("frames", progress);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    putc('\n');
}

/* A timeout on a queue: both queues' ring state (R stall), then the
 * failure. */
static void __attribute__((noreturn)) stall(const char *msg) {
    put_queue_state(&rxq, "rx");
    put_queue_state(&txq, "tx");
    device_fail(msg);
}

/* The kick counters of a result record. */
static void put_kicks(void) {
    put_kv("kicks", notifies);
    put_kv("kicks_suppressed", suppressed);
    put_kv("rx_kicks", rxq.kicks);
    put_kv("rx_kicks_suppressed", rxq.kicks_suppressed);
    put_kv("tx_kicks", txq.kicks);
    put_kv("tx_kicks_suppressed", txq.kicks_suppressed);
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
        if (!wait_used(&txq, timeout_cycles)) stall("timeout: no transmit completion");
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
        if (!wait_used(&txq, timeout_cycles)) stall("timeout: no transmit completion");
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
            if (!wait_used(&rxq, count ? timeout_cycles : 0)) stall("timeout: no frame received");
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
        progress++;
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
    put_kicks();
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
        progress++;
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
    put_kicks();
    putc('\n');
    return STATUS_OK;
}

static int recv(u64 count) {
    u64 frames = 0, bad = 0, other = 0, bytes = 0;
    while (frames < count) {
        u16 d;
        u32 b, len;
        if (!next_used(&rxq, &d, &b, &len)) {
            if (!wait_used(&rxq, timeout_cycles)) stall("timeout: no frame received");
            continue;
        }
        u8 *f = buffers[b] + HDR_LEN;
        u32 flen = len >= HDR_LEN ? len - HDR_LEN : 0;
        if (flen < 14 || f[12] != (ETHERTYPE >> 8) || f[13] != (ETHERTYPE & 0xff)) {
            other++;
        } else {
            frames++;
            progress++;
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
    put_kicks();
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

static u64 offered;
static u16 nq, link_status, mtu;
static int want_msix, irq_ready, features_ok_stuck, link_mode;

/* Writes 0 to device_status and waits (1 s at most) for it to read back 0. */
static int reset_device(void) {
    set_status(0);
    for (u64 t = rdtsc(); get_status() != 0;)
        if (rdtsc() - t > tsc_khz() * 1000) return 0;
    return 1;
}

enum { INIT_OK, INIT_FEATURES_REFUSED, INIT_NEEDS_RESET };

/* 3.1.1 from reset to DRIVER_OK, every receive buffer posted with post_rx;
 * prints R negotiated. With bad = BAD_QSIZE3, BAD_RING_OUTSIDE or
 * BAD_UNOFFERED it misbehaves on the way, and returns as soon as the device
 * has answered (features refused, needs reset). */
static int init_device(int bad, int post_rx) {
    if (!reset_device()) fail(STATUS_FAIL, "the device does not finish its reset");
    set_status(S_ACKNOWLEDGE);
    set_status(S_ACKNOWLEDGE | S_DRIVER);

    mw32(common.addr + C_DFSELECT, 0);
    offered = mr32(common.addr + C_DF);
    mw32(common.addr + C_DFSELECT, 1);
    offered |= (u64)mr32(common.addr + C_DF) << 32;
    if (!(offered & (1UL << F_VERSION_1))) device_fail("VIRTIO_F_VERSION_1 not offered");
    features = offered & (ACCEPTED | (want_event_idx ? 1UL << F_EVENT_IDX : 0));
    event_idx = (features & (1UL << F_EVENT_IDX)) != 0;
    u64 acked = features;
    if (bad == BAD_UNOFFERED) acked |= 1UL << 33; /* ACCESS_PLATFORM, never offered here */
    mw32(common.addr + C_GFSELECT, 0);
    mw32(common.addr + C_GF, (u32)acked);
    mw32(common.addr + C_GFSELECT, 1);
    mw32(common.addr + C_GF, (u32)(acked >> 32));
    set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    features_ok_stuck = (get_status() & S_FEATURES_OK) != 0;
    /* a driver never goes on with features it made up, taken or not */
    if (bad == BAD_UNOFFERED) return INIT_FEATURES_REFUSED;
    if (!features_ok_stuck) device_fail("FEATURES_OK did not read back: features refused");

    nq = mr16(common.addr + C_NUMQ);
    if (nq < 2) device_fail("fewer than two queues");
    if (!devcfg.found && (features & ((1UL << F_MAC) | (1UL << F_STATUS) | (1UL << F_MTU))))
        device_fail("no device configuration capability");
    if (devcfg.found && devcfg.len < 12 && (features & (1UL << F_MTU))) device_fail("device config too short for mtu");
    if (devcfg.found && devcfg.len < 8 && (features & (1UL << F_STATUS))) device_fail("device config too short for status");
    if (devcfg.found && devcfg.len < 6 && (features & (1UL << F_MAC))) device_fail("device config too short for mac");
    read_config(&link_status, &mtu);

    /* interrupts: config on entry 0, receiveq 1, transmitq 2 (all on 0
     * when the table is smaller) */
    if (!irq_ready) {
        idt_init();
        idt_set(NET_VECTOR, ext_stub);
        idt_set(CFG_VECTOR, cfg_stub);
        lapic_enable();
        irq_ready = 1;
    }
    int msix = want_msix && msix_table;
    u16 vcfg = NO_VECTOR, vrx = NO_VECTOR, vtx = NO_VECTOR;
    if (msix) {
        msix_enable(msix_entries < 3 ? 1 : 3);
        vcfg = 0;
        vrx = msix_entries < 3 ? 0 : 1;
        vtx = msix_entries < 3 ? 0 : 2;
        if (link_mode && msix_entries < 3) vrx = vtx = NO_VECTOR; /* entry 0 is config's */
        mw16(common.addr + C_MSIX, vcfg);
        if (mr16(common.addr + C_MSIX) != vcfg) msix = 0;
    }
    u16 grx = queue_setup(&rxq, 0, msix ? vrx : NO_VECTOR, bad);
    u16 gtx = queue_setup(&txq, 1, msix ? vtx : NO_VECTOR, bad);
    if (msix && (grx != vrx || gtx != vtx)) msix = 0; /* refused: poll */
    msix_on = msix;
    set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (get_status() & (S_NEEDS_RESET | S_FAILED)) {
        if (bad == BAD_RING_OUTSIDE) return INIT_NEEDS_RESET;
        device_fail("the device needs a reset after DRIVER_OK");
    }
    if (bad == BAD_RING_OUTSIDE) return INIT_OK; /* taken (wrongly): never used */

    nfree = 0;
    for (u32 b = NBUF; b > 0; b--) give_buf(b - 1);
    if (post_rx) {
        for (u16 d = 0; d < rxq.size; d++) post(&rxq, d, take_buf(), BUF_LEN, VIRTQ_DESC_F_WRITE);
        kick(&rxq);
    }

    puts("R negotiated features=");
    put_hex(features);
    puts(" mac=");
    put_mac(mac);
    put_kv("mtu", mtu);
    put_kv("status", link_status);
    put_kv("queue_size", rxq.size);
    put_kv("tx_queue_size", txq.size);
    put_kv("msix", (u64)msix);
    puts(" offered=");
    put_hex(offered);
    put_kv("queues", nq);
    put_kv("event_idx", (u64)event_idx);
    putc('\n');
    return INIT_OK;
}

/* ------------------------------------------------------- mode=bad --- */
#define VIRTQ_DESC_F_NEXT 1
#define BAD_ETHERTYPE 0x88b7  /* frames built into bad chains */
#define GOOD_ETHERTYPE 0x88b8 /* good frames sent during the bad part */

/* What a case saw, printed in its R bad record. */
static struct {
    const char *key;
    u64 value;
} notes[12];
static int nnotes;

static void note(const char *key, u64 value) {
    if (nnotes == 12) fail(STATUS_FAIL, "too many notes (a driver bug)");
    notes[nnotes].key = key;
    notes[nnotes].value = value;
    nnotes++;
}

/* The next used element of q, checked for nothing but its index (the bad
 * part keeps no books), waited for up to ms: 1 and *id, *len, or 0. */
static int raw_used(struct vq *q, u64 ms, u32 *id, u32 *len) {
    if (!wait_used(q, tsc_khz() * ms)) return 0;
    if ((u16)(used_idx(q) - q->last_used) > q->size) device_fail("used index ran ahead of the ring");
    barrier();
    struct used_elem e = *(volatile struct used_elem *)&q->used.ring[q->last_used & (q->size - 1)];
    q->last_used++;
    want_next_interrupt(q);
    *id = e.id;
    *len = e.len;
    return 1;
}

/* A broadcast frame of size bytes (60..1514) behind a zeroed virtio-net
 * header at p; its length with the header. */
static u32 build_frame(u8 *p, u16 ethertype, u32 size, u32 seq) {
    clear_hdr(p);
    u8 *f = p + HDR_LEN;
    for (int i = 0; i < 6; i++) {
        f[i] = 0xff;
        f[6 + i] = mac[i];
    }
    f[12] = (u8)(ethertype >> 8);
    f[13] = (u8)ethertype;
    fill_pattern(f + 14, size - 14, seq);
    return HDR_LEN + size;
}

/* One good 60-byte frame on transmit descriptor d: 1 if the device
 * completed it within 5 s. */
static int good_tx(u16 d) {
    u32 b = take_buf(), id, len;
    set_desc(&txq, d, (u64)buffers[b], build_frame(buffers[b], GOOD_ETHERTYPE, 60, 0), 0, 0);
    publish(&txq, d);
    kick(&txq);
    return raw_used(&txq, 5000, &id, &len) && id == d;
}

/* Sends the transmit chain at head and notes whether (tx_used) and how
 * (used_id) the device gave it back, then whether a good frame on
 * descriptor good went through after it (after_ok). */
static void bad_tx(u16 head, u16 good) {
    u32 id = 0, len = 0;
    publish(&txq, head);
    kick(&txq);
    int used = raw_used(&txq, 5000, &id, &len);
    note("tx_used", (u64)used);
    note("used_id", id);
    note("after_ok", used ? (u64)good_tx(good) : 0);
}

static u8 bad_loop(void) {
    init_device(BAD_NONE, 1);
    u32 b0 = take_buf(), b1 = take_buf();
    u32 l0 = build_frame(buffers[b0], BAD_ETHERTYPE, 60, 1);
    fill_pattern(buffers[b1], 60, 2);
    set_desc(&txq, 0, (u64)buffers[b0], l0, VIRTQ_DESC_F_NEXT, 1);
    set_desc(&txq, 1, (u64)buffers[b1], 60, VIRTQ_DESC_F_NEXT, 0);
    bad_tx(0, 2);
    return get_status();
}

static u8 bad_long_chain(void) {
    init_device(BAD_NONE, 1);
    u16 n = txq.size;
    u32 b0 = take_buf(), b1 = take_buf();
    build_frame(buffers[b0], BAD_ETHERTYPE, 60, 3);
    fill_pattern(buffers[b1], 16, 4);
    /* 0 -> 1 -> ... -> n-1 -> 0: n + 1 descriptors and on */
    set_desc(&txq, 0, (u64)buffers[b0], HDR_LEN + 16, VIRTQ_DESC_F_NEXT, 1);
    for (u16 d = 1; d < n; d++) set_desc(&txq, d, (u64)buffers[b1], 16, VIRTQ_DESC_F_NEXT, (u16)((d + 1) & (n - 1)));
    note("chain", (u64)n + 1);
    bad_tx(0, 0);
    return get_status();
}

static u8 bad_past_ram(void) {
    init_device(BAD_NONE, 0); /* no receive buffer yet */
    set_desc(&txq, 0, RAM_HOLE, 64, 0, 0);
    bad_tx(0, 1);
    /* the only receive buffer lies beyond RAM: the first frame is for it */
    u32 id = 0, len = 0;
    set_desc(&rxq, 0, RAM_HOLE, BUF_LEN, VIRTQ_DESC_F_WRITE, 0);
    publish(&rxq, 0);
    kick(&rxq);
    puts("R badwait case=past_ram\n");
    int used = raw_used(&rxq, timeout_cycles / tsc_khz(), &id, &len);
    note("rx_used", (u64)used);
    note("rx_id", id);
    note("rx_len", len);
    /* then a good one: the next frame must arrive in it */
    u32 b = take_buf();
    set_desc(&rxq, 1, (u64)buffers[b], BUF_LEN, VIRTQ_DESC_F_WRITE, 0);
    publish(&rxq, 1);
    kick(&rxq);
    used = raw_used(&rxq, timeout_cycles / tsc_khz(), &id, &len);
    note("rx_after_ok", (u64)(used && id == 1 && len > HDR_LEN));
    return get_status();
}

static u8 bad_queue_size3(void) {
    init_device(BAD_QSIZE3, 1);
    note("wrote", 3);
    note("read_back", qsize3_read);
    note("over_max", over_max);
    note("over_max_read_back", over_max_read);
    note("size", rxq.size);
    return get_status();
}

static u8 bad_ring_outside(void) {
    int r = init_device(BAD_RING_OUTSIDE, 0);
    u8 st = get_status();
    note("needs_reset", (st & S_NEEDS_RESET) != 0);
    note("taken", r == INIT_OK);
    return st;
}

static u8 bad_unoffered(void) {
    init_device(BAD_UNOFFERED, 0);
    u8 st = get_status();
    note("features_ok", (u64)features_ok_stuck);
    return st;
}

static u8 bad_reset_mid(void) {
    init_device(BAD_NONE, 1);
    puts("R badwait case=reset_mid\n");
    u64 echoed = 0;
    while (echoed < 3) { /* any unicast frame, echoed */
        reap_tx();
        u16 d;
        u32 b, len;
        if (!next_used(&rxq, &d, &b, &len)) {
            if (!wait_used(&rxq, timeout_cycles)) stall("timeout: no frame received");
            continue;
        }
        u8 *p = buffers[b], *f = p + HDR_LEN;
        if (len < HDR_LEN + 14 || (f[0] & 1)) {
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
        echoed++;
    }
    /* eight more frames, one kick, and the reset at once */
    for (u32 i = 0; i < 8; i++) {
        u16 t = tx_slot();
        u32 b = take_buf();
        post(&txq, t, b, build_frame(buffers[b], GOOD_ETHERTYPE, 60, i), 0);
    }
    kick(&txq);
    set_status(0);
    int reset_ok = 1;
    for (u64 t = rdtsc(); get_status() != 0;)
        if (rdtsc() - t > tsc_khz() * 1000) {
            reset_ok = 0;
            break;
        }
    u8 st = get_status();
    /* once the reset read back 0 the device touches the rings no more */
    u16 rx_used = used_idx(&rxq), tx_used = used_idx(&txq);
    for (u64 t = rdtsc(); rdtsc() - t < tsc_khz() * 50;) cpu_relax();
    note("touched", used_idx(&rxq) != rx_used || used_idx(&txq) != tx_used);
    note("echoed", echoed);
    note("tx_posted", txq.avail_idx);
    note("tx_completed", tx_used);
    note("rx_posted", rxq.avail_idx);
    note("rx_completed", rx_used);
    note("reset_ok", (u64)reset_ok);
    return st;
}

static const struct {
    const char *name;
    u8 (*run)(void);
} bad_cases[] = {
    {"loop", bad_loop},
    {"past_ram", bad_past_ram},
    {"long_chain", bad_long_chain},
    {"queue_size3", bad_queue_size3},
    {"ring_outside", bad_ring_outside},
    {"unoffered", bad_unoffered},
    {"reset_mid", bad_reset_mid},
};

/* The case's misbehaviour, the device reset (survived: status read back 0),
 * R bad, then a fresh initialisation and count frames echoed. */
static int bad_mode(const char *name, u64 count) {
    u32 i = 0;
    while (i < sizeof(bad_cases) / sizeof(bad_cases[0]) && !streq(name, bad_cases[i].name)) i++;
    if (i == sizeof(bad_cases) / sizeof(bad_cases[0]))
        fail(STATUS_BAD_ARGS, "case must be loop, past_ram, long_chain, queue_size3, ring_outside, unoffered or reset_mid");
    u8 status_after = bad_cases[i].run();
    int survived = reset_device();
    puts("R bad case=");
    puts(name);
    for (int n = 0; n < nnotes; n++) put_kv(notes[n].key, notes[n].value);
    put_kv("status_after", status_after);
    put_kv("survived", (u64)survived);
    putc('\n');
    if (!survived) device_fail("the device does not finish its reset after the bad part");
    init_device(BAD_NONE, 1);
    return echo(count);
}

/* ------------------------------------------------------ mode=link --- */
static u64 link_retries;

/* The link status, read between two equal config_generation reads; *gen
 * the generation it belongs to. */
static u16 read_link(u8 *gen) {
    for (int tries = 0;; tries++) {
        if (tries == 100) device_fail("config_generation never settles");
        u8 g = mr8(common.addr + C_GENERATION);
        u16 s = cfg16(6);
        if (mr8(common.addr + C_GENERATION) == g) {
            *gen = g;
            return s;
        }
        link_retries++;
    }
}

static u8 generation(void) { return mr8(common.addr + C_GENERATION); }

/* Waits for count configuration changes (see the top of the file). */
static int link(u64 count) {
    if (!(features & (1UL << F_STATUS))) device_fail("VIRTIO_NET_F_STATUS not negotiated: no link status");
    u8 gen;
    u16 st = read_link(&gen);
    puts("R link");
    put_kv("status", st);
    put_kv("gen", gen);
    put_kv("vector", mr16(common.addr + C_MSIX));
    put_kv("msix", (u64)msix_on);
    putc('\n');
    u64 changes = 0, late = 0, slice = tsc_khz() * 10, grace = tsc_khz() * 100;
    while (changes < count) {
        u64 t0 = rdtsc(), seen = cfg_irqs;
        int via_irq = 0;
        for (;;) {
            if (cfg_irqs != seen) {
                if (generation() != gen) {
                    via_irq = 1;
                    break;
                }
                /* no new generation: late (an earlier change's) or spurious */
                late += cfg_irqs - seen;
                seen = cfg_irqs;
            }
            if (generation() != gen) {
                /* seen by polling: the interrupt gets grace before the
                 * change counts as one without */
                __asm__ volatile("sti" ::: "memory");
                for (u64 t1 = rdtsc(); cfg_irqs == seen && rdtsc() - t1 < grace;) cpu_relax();
                __asm__ volatile("cli" ::: "memory");
                via_irq = cfg_irqs != seen;
                break;
            }
            if (rdtsc() - t0 > timeout_cycles) device_fail("timeout: no configuration change");
            __asm__ volatile("sti" ::: "memory");
            for (u64 t1 = rdtsc(); cfg_irqs == seen && rdtsc() - t1 < slice;) cpu_relax();
            __asm__ volatile("cli" ::: "memory");
        }
        u64 retries = link_retries;
        st = read_link(&gen);
        changes++;
        puts("R link");
        put_kv("status", st);
        put_kv("change", changes);
        puts(via_irq ? " via=irq" : " via=poll");
        put_kv("gen", gen);
        put_kv("retries", link_retries - retries);
        putc('\n');
    }
    puts("R link");
    put_kv("changes", changes);
    put_kv("irqs", cfg_irqs);
    put_kv("late", late);
    put_kv("queue_irqs", irqs);
    putc('\n');
    return STATUS_OK;
}

int guest_main(void) {
    char mode[8] = "echo", irq[8] = "msix", bad_case[16] = "";
    u64 count = 10, size = 60, timeout_s = 30;
    header("net-probe");
    arg_str("mode", mode, sizeof(mode));
    arg_str("irq", irq, sizeof(irq));
    arg_str("case", bad_case, sizeof(bad_case));
    arg_u64("count", &count);
    arg_u64("size", &size);
    arg_u64("timeout_s", &timeout_s);
    arg_u64("event_idx", &want_event_idx);
    int m_echo = streq(mode, "echo"), m_send = streq(mode, "send"), m_recv = streq(mode, "recv"),
        m_bad = streq(mode, "bad"), m_link = streq(mode, "link");
    if (!m_echo && !m_send && !m_recv && !m_bad && !m_link)
        fail(STATUS_BAD_ARGS, "mode must be echo, send, recv, bad or link");
    if (!streq(irq, "msix") && !streq(irq, "poll")) fail(STATUS_BAD_ARGS, "irq must be msix or poll");
    if (m_send && (size < 60 || size > FRAME_MAX)) fail(STATUS_BAD_ARGS, "size must be 60..1514");
    if (!count && (m_send || m_recv || m_link)) fail(STATUS_BAD_ARGS, "count=0 (forever) is for mode=echo and mode=bad");
    if (m_bad && !bad_case[0]) fail(STATUS_BAD_ARGS, "mode=bad needs case=NAME");
    if (!timeout_s || timeout_s > 3600) fail(STATUS_BAD_ARGS, "timeout_s must be 1..3600");
    if (want_event_idx > 1) fail(STATUS_BAD_ARGS, "event_idx must be 0 or 1");
    timeout_cycles = tsc_khz() * 1000 * timeout_s;
    want_msix = irq[0] == 'm';
    link_mode = m_link;
    if (m_link) entry0_vector = CFG_VECTOR;

    for (dev = 0; dev < 32; dev++)
        if (pci_read(dev, 0) == VENDOR_DEVICE) break;
    if (dev == 32) fail(STATUS_FAIL, "no modern virtio-net device (1af4:1041) on PCI bus 0");
    read_bars();
    walk_caps();

    if (m_bad) return bad_mode(bad_case, count);
    init_device(BAD_NONE, 1);
    if (m_send && size > (u64)mtu + 14) fail(STATUS_BAD_ARGS, "size is larger than the device's mtu + 14");
    if (m_echo) return echo(count);
    if (m_send) return send(count, size);
    if (m_link) return link(count);
    return recv(count);
}
