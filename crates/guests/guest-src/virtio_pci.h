/* The modern virtio-pci transport (virtio 1.2, 4.1) and split virtqueues
 * (2.7), shared by the virtio drivers among the bundled guests (net-probe,
 * blk-probe): PCI configuration access through 0xCF8/0xCFC, the device found
 * by vendor/device id on bus 0, its BARs read as assigned (sized, never
 * moved), the virtio vendor capabilities and the MSI-X capability walked,
 * the status/feature steps of 3.1.1, queue set-up, MSI-X vectors, notify
 * (with EVENT_IDX or NO_NOTIFY suppression), used-ring reading with every
 * id and length checked, and waiting for completions by interrupt or poll.
 *
 * One device per guest: its state is global. The driver sets `features`
 * and `event_idx` after negotiating and `msix_on` once its vectors stuck.
 * ext_irq is defined here (every interrupt on a vector aimed at ext_stub
 * counts in `irqs`), so a guest linking this file defines none of its own
 * (build.rs links it into net_probe and blk_probe only). */
#ifndef NFV_VIRTIO_PCI_H
#define NFV_VIRTIO_PCI_H

#include "runtime.h"

#define QMAX 64 /* the most descriptors a queue is given */

/* feature bits (device independent) */
#define F_EVENT_IDX 29
#define F_VERSION_1 32

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

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_USED_F_NO_NOTIFY 1

/* ------------------------------------------------------------- PCI --- */
u32 pci_read(u32 dev, u32 reg);
void pci_write(u32 dev, u32 reg, u32 v);
u8 pci_read8(u32 dev, u32 reg);

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

/* Identity-maps [addr, addr + len) uncached when it lies above 4 GiB (the
 * static tables map the low 4 GiB): 0 if it cannot. */
int map_mmio(u64 addr, u64 len);

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
extern u32 dev; /* slot on bus 0 */
extern struct bar bars[6];
extern struct region common, notify, isr, devcfg;
extern u32 notify_mult;
extern int pcicfg;
extern u32 msix_at, msix_entries;
extern u64 msix_table;
extern u64 features; /* negotiated */
extern int event_idx; /* VIRTIO_F_RING_EVENT_IDX negotiated */
extern int msix_on;   /* interrupts expected */

/* The first slot on bus 0 whose vendor/device word is vendor_device
 * (device << 16 | vendor): 1 and dev set, or 0. */
int find_device(u32 vendor_device);
/* The six BARs as assigned; then memory decoding and bus mastering on. */
void read_bars(void);
/* The virtio vendor capabilities and MSI-X; fails without common or
 * notify. Prints R caps. */
void walk_caps(void);

void set_status(u8 s);
u8 get_status(void);
/* Sets FAILED (when the common configuration is known), then fails. */
void __attribute__((noreturn)) device_fail(const char *msg);
/* Writes 0 to device_status and waits (1 s at most) for it to read back 0. */
int reset_device(void);
/* 3.1.1 steps 1-3: reset, ACKNOWLEDGE, DRIVER; the features offered (fails
 * without VERSION_1 or if the reset does not finish). */
u64 begin_init(void);
/* 3.1.1 steps 4-6: acked written, FEATURES_OK set: 1 if it read back. */
int write_features(u64 acked);

/* MSI-X table entries 0..n-1 to this CPU's LAPIC, entry 0 on vector0 and
 * the others on vector (fixed, edge, unmasked), then MSI-X on with the
 * function unmasked. */
void msix_enable(u32 n, u8 vector0, u8 vector);

/* ------------------------------------------------------ interrupts --- */
void ext_stub(void);     /* entry.S: saves, calls ext_irq, iretq */
extern volatile u64 irqs; /* interrupts taken through ext_stub */
extern u64 polled;        /* completions found by polling though MSI-X is on */

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
    int inflight[QMAX]; /* the driver's token + 1 for the chain at this head, 0 free */
    u32 posted_len[QMAX]; /* the most the device may report written (its writable bytes) */
};
extern u64 notifies, suppressed; /* every queue's kicks written / held back */

/* EVENT_IDX's two words, placed by the queue size in use (not QMAX) */
volatile u16 *used_event_of(struct vq *q);
volatile u16 *avail_event_of(struct vq *q);
/* Linux's vring_need_event: whether event lies in [old, new_idx) */
static inline int need_event(u16 event, u16 new_idx, u16 old) { return (u16)(new_idx - event - 1) < (u16)(new_idx - old); }

/* 4.1.5.1.3: queue index selected, its maximum checked (non-zero, a power of
 * two, not enabled), before_size(max) called when given (a hostile driver's
 * hook), size = min(max, QMAX) written and read back, the rings zeroed and
 * handed over (at rings_at, +0x1000, +0x2000 instead when non-zero), the
 * vector written (when not NO_VECTOR) and read back, the notify address
 * checked, the queue enabled. Prints R queue; returns the vector read back
 * (NO_VECTOR when none was written). */
u16 vq_setup(struct vq *q, u16 index, u16 vector, void (*before_size)(u16 max), u64 rings_at);
void set_desc(struct vq *q, u16 d, u64 addr, u32 len, u16 flags, u16 next);
/* Makes the chain at head available; the caller notifies. */
void publish(struct vq *q, u16 head);
/* Notifies the device of what was published since the last call, unless it
 * said it needs no notification (avail_event with EVENT_IDX, NO_NOTIFY
 * without): Linux's virtqueue_kick_prepare_split, then the notify write. 1
 * if the notify was written. */
int kick(struct vq *q);
/* EVENT_IDX: an interrupt wanted as soon as the device adds the used
 * element at last_used */
void want_next_interrupt(struct vq *q);
static inline u16 used_idx(struct vq *q) { return *(volatile u16 *)&q->used.idx; }
/* The next used element, checked (index, id in the ring and in flight,
 * length within posted_len): 1 and *d (head), *token, *len, or 0 if none. */
int next_used(struct vq *q, u16 *d, u32 *token, u32 *len);
/* Waits until q has a used element: interrupts open, spinning, the used
 * index polled too. 0 on timeout (never with timeout 0). */
int wait_used(struct vq *q, u64 timeout);

#endif
