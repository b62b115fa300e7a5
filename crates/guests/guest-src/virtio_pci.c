/* The modern virtio-pci transport and split virtqueues, shared by the
 * virtio drivers among the bundled guests: see virtio_pci.h. */
#include "virtio_pci.h"

/* ------------------------------------------------------------- PCI --- */
u32 pci_read(u32 dev, u32 reg) {
    outl(0xcf8, 0x80000000u | (dev << 11) | (reg & 0xfc));
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"((u16)0xcfc));
    return v;
}

void pci_write(u32 dev, u32 reg, u32 v) {
    outl(0xcf8, 0x80000000u | (dev << 11) | (reg & 0xfc));
    outl(0xcfc, v);
}

u8 pci_read8(u32 dev, u32 reg) { return (u8)(pci_read(dev, reg) >> (8 * (reg & 3))); }

/* --------------------------------------------------- page tables --- */
/* The static tables map the low 4 GiB; a 64-bit BAR above it is mapped here
 * (identity, 2 MiB pages, uncached) under PML4 entry 0 (the first 512 GiB). */
static u64 extra_pd[4][512] __attribute__((aligned(4096)));
static int extra_pds;

int map_mmio(u64 addr, u64 len) {
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
u32 dev;
struct bar bars[6];
struct region common, notify, isr, devcfg;
u32 notify_mult;
int pcicfg;
u32 msix_at, msix_entries;
u64 msix_table;
u64 features;
int event_idx;
int msix_on;

int find_device(u32 vendor_device) {
    for (dev = 0; dev < 32; dev++)
        if (pci_read(dev, 0) == vendor_device) return 1;
    return 0;
}

void set_status(u8 s) { mw8(common.addr + C_STATUS, s); }
u8 get_status(void) { return mr8(common.addr + C_STATUS); }

void __attribute__((noreturn)) device_fail(const char *msg) {
    if (common.found) set_status((u8)(get_status() | S_FAILED));
    fail(STATUS_FAIL, msg);
}

/* Reads the six BARs as assigned, sizing each with decoding off (the BAR
 * is written back unchanged: nothing moves). */
void read_bars(void) {
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

void walk_caps(void) {
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

/* Writes 0 to device_status and waits (1 s at most) for it to read back 0. */
int reset_device(void) {
    set_status(0);
    for (u64 t = rdtsc(); get_status() != 0;)
        if (rdtsc() - t > tsc_khz() * 1000) return 0;
    return 1;
}

u64 begin_init(void) {
    if (!reset_device()) fail(STATUS_FAIL, "the device does not finish its reset");
    set_status(S_ACKNOWLEDGE);
    set_status(S_ACKNOWLEDGE | S_DRIVER);

    mw32(common.addr + C_DFSELECT, 0);
    u64 offered = mr32(common.addr + C_DF);
    mw32(common.addr + C_DFSELECT, 1);
    offered |= (u64)mr32(common.addr + C_DF) << 32;
    if (!(offered & (1UL << F_VERSION_1))) device_fail("VIRTIO_F_VERSION_1 not offered");
    return offered;
}

int write_features(u64 acked) {
    mw32(common.addr + C_GFSELECT, 0);
    mw32(common.addr + C_GF, (u32)acked);
    mw32(common.addr + C_GFSELECT, 1);
    mw32(common.addr + C_GF, (u32)(acked >> 32));
    set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    return (get_status() & S_FEATURES_OK) != 0;
}

void msix_enable(u32 n, u8 vector0, u8 vector) {
    volatile u32 *t = (volatile u32 *)msix_table;
    for (u32 v = 0; v < n; v++) {
        t[4 * v + 0] = 0xfee00000u | (lapic_id() << 12);
        t[4 * v + 1] = 0;
        t[4 * v + 2] = v ? vector : vector0; /* fixed, edge */
        t[4 * v + 3] = 0;                    /* unmasked */
    }
    u32 head = pci_read(dev, msix_at);
    pci_write(dev, msix_at, (head & ~(1u << 30)) | (1u << 31));
}

/* ------------------------------------------------------ interrupts --- */
volatile u64 irqs;
u64 polled;

void ext_irq(void) {
    irqs++;
    lapic_eoi();
}

/* ----------------------------------------------------- virtqueues --- */
u64 notifies, suppressed;

/* used_event after the avail ring's entries (the driver's), avail_event
 * after the used ring's (the device's) */
volatile u16 *used_event_of(struct vq *q) { return (volatile u16 *)((u8 *)&q->avail + 4 + 2 * (u64)q->size); }
volatile u16 *avail_event_of(struct vq *q) { return (volatile u16 *)((u8 *)&q->used + 4 + 8 * (u64)q->size); }

u16 vq_setup(struct vq *q, u16 index, u16 vector, void (*before_size)(u16 max), u64 rings_at) {
    mw16(common.addr + C_Q_SELECT, index);
    u16 max = mr16(common.addr + C_Q_SIZE);
    if (max == 0) device_fail("queue size 0: the queue is not available");
    if (max & (max - 1)) device_fail("queue size is not a power of two");
    if (mr16(common.addr + C_Q_ENABLE)) device_fail("queue enabled after reset");
    if (before_size) before_size(max);
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
    if (rings_at) {
        mw64(common.addr + C_Q_DESC, rings_at);
        mw64(common.addr + C_Q_DRIVER, rings_at + 0x1000);
        mw64(common.addr + C_Q_DEVICE, rings_at + 0x2000);
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

void set_desc(struct vq *q, u16 d, u64 addr, u32 len, u16 flags, u16 next) {
    q->desc[d].addr = addr;
    q->desc[d].len = len;
    q->desc[d].flags = flags;
    q->desc[d].next = next;
}

void publish(struct vq *q, u16 head) {
    q->avail.ring[q->avail_idx & (q->size - 1)] = head;
    barrier();
    q->avail_idx++;
    *(volatile u16 *)&q->avail.idx = q->avail_idx;
}

int kick(struct vq *q) {
    u16 old = q->kicked_idx, new_idx = q->avail_idx;
    q->kicked_idx = new_idx;
    mb(); /* the avail index out before avail_event / flags are read */
    int needed = event_idx ? need_event(*avail_event_of(q), new_idx, old)
                           : !(*(volatile u16 *)&q->used.flags & VIRTQ_USED_F_NO_NOTIFY);
    if (!needed) {
        suppressed++;
        q->kicks_suppressed++;
        return 0;
    }
    mw16(q->notify_addr, q->index);
    notifies++;
    q->kicks++;
    return 1;
}

/* EVENT_IDX: an interrupt wanted as soon as the device adds the used
 * element at last_used (the next one this driver reads); the write out
 * before the used index is read again (Linux's virtio_store_mb) */
void want_next_interrupt(struct vq *q) {
    if (!event_idx) return;
    *used_event_of(q) = q->last_used;
    mb();
}

int next_used(struct vq *q, u16 *d, u32 *token, u32 *len) {
    u16 idx = used_idx(q);
    if (idx == q->last_used) return 0;
    if ((u16)(idx - q->last_used) > q->size) device_fail("used index ran ahead of the ring");
    barrier();
    struct used_elem e = *(volatile struct used_elem *)&q->used.ring[q->last_used & (q->size - 1)];
    q->last_used++;
    want_next_interrupt(q);
    if (e.id >= q->size) device_fail("used ring id outside the ring");
    if (!q->inflight[e.id]) device_fail("used ring id of a descriptor not in flight");
    if (e.len > q->posted_len[e.id]) device_fail("used length larger than the buffer");
    *d = (u16)e.id;
    *token = (u32)q->inflight[e.id] - 1;
    *len = e.len;
    q->inflight[e.id] = 0;
    return 1;
}

int wait_used(struct vq *q, u64 timeout) {
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
