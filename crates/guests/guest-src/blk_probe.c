/* blk-probe: a small virtio-blk driver for the modern virtio-pci transport
 * (virtio 1.x, PCI 1af4:1042), split virtqueue, requestq 0 only.
 *
 * The transport (virtio_pci.c, shared with net-probe): the device found on
 * PCI bus 0, its BARs read as assigned, the virtio vendor capabilities and
 * MSI-X walked (R caps), then 3.1.1: reset, ACKNOWLEDGE, DRIVER, features,
 * FEATURES_OK (read back), queue 0 (R queue), MSI-X vectors (read back),
 * DRIVER_OK. Features accepted, when offered: VERSION_1 (32, required),
 * SIZE_MAX (1), SEG_MAX (2), RO (5), BLK_SIZE (6), FLUSH (9), TOPOLOGY (10),
 * MQ (12, only queue 0 is used), DISCARD (13), WRITE_ZEROES (14), and
 * RING_EVENT_IDX (29) with event_idx=1 only; never any other.
 *
 * A request (5.2.6): the 16-byte header {u32 type, u32 reserved, u64 sector}
 * device-readable, the data descriptors (device-writable for IN and GET_ID,
 * device-readable otherwise; split at size_max bytes when SIZE_MAX is
 * negotiated, at most seg_max of them with SEG_MAX), the 1-byte status
 * device-writable (set to 0xff before submitting). Types used: IN 0, OUT 1,
 * FLUSH 4, GET_ID 8, DISCARD 11, WRITE_ZEROES 13; status OK 0, IOERR 1,
 * UNSUPP 2. Up to qd requests are in flight (the queue's descriptors are
 * split evenly between qd slots); completions come by MSI-X (config on
 * entry 0, the queue on entry 1; both on entry 0 when the table has one) and
 * are waited for with interrupts open, spinning; the used ring is polled
 * too (irq=poll: no MSI-X at all). Every used id and length is checked
 * before it is trusted (the id is the head of a chain in flight, the length
 * at most the chain's device-writable bytes); short_len= counts completions
 * whose length is less than those bytes (the device wrote less than asked).
 *
 * Records, always, after the header, R caps and R queue:
 *   R blk capacity=<sectors> features=<hex acked> flush=0|1 discard=0|1
 *         wz=0|1 ro=0|1 seg_max= size_max= blk_size= max_discard_sectors=
 *         max_discard_seg= max_wz_sectors= mq=<num_queues, 1 without MQ>
 *         discard_align= max_wz_seg= wz_may_unmap= phys_block_exp= min_io=
 *         opt_io= offered=<hex> queues=<num_queues in common config>
 *         queue_size= msix=0|1 event_idx=0|1
 *     (a field is 0 when its feature is not negotiated)
 *   R blkid serial=<GET_ID answer: its bytes up to the first NUL (at most
 *         20, there may be none), printable ones (0x21..0x7e) only; 'none'
 *         if the status is not OK> status=<GET_ID status>
 *
 * Modes (arguments key=value on the command line):
 *   mode=verify start=S sectors=N chunk=C (8) seed=K (1) qd=Q (1)
 *       writes pattern(seed) over sectors S..S+N in C-sector requests,
 *       FLUSH (when negotiated), reads them all back and compares; then,
 *       when DISCARD is negotiated, DISCARDs the first chunk (its content is
 *       not checked afterwards, only its status), and when WRITE_ZEROES is,
 *       WRITE_ZEROES (flags 0) the second chunk (when N > C) and reads it
 *       back: it must read zeros.
 *       R verify sectors=N bad=<sectors not matching> writes= reads=
 *         flushes= discard=<status, -1 not negotiated> wz=<status, -1>
 *         wz_bad=<sectors not zero> errors=<requests not OK> short_len=
 *         irqs= polled=
 *       status 0 only if all went right.
 *   mode=write start= sectors= chunk= passes=P (1; 0 = forever) seed=K qd=
 *       pass p = 0, 1, ...: for p > 0 first reads the range back and checks
 *       that it holds pattern(seed + p - 1), then writes pattern(seed + p),
 *       then FLUSH (when negotiated). R pass n=p bad=<sectors> errors=
 *       after each, then R write passes=P bad=<total> errors=. The image
 *       ends as pattern(seed + P - 1). Status 0 if no bad sector, no error.
 *   mode=bench op=randread|randwrite count=N (1000, at most 100000) qd=Q
 *       (1..16) bs=4096 (a multiple of 512, at most 65536) span=<sectors,
 *       default the capacity> seed=K: N requests of bs bytes at random
 *       bs-aligned offsets within span (LCG x = x * 6364136223846793005 +
 *       1442695040888963407 seeded by seed, the block index = (x >> 33) %
 *       blocks), Q kept in flight; each one's latency measured with rdtsc
 *       from its submission (just before the notify decision) to the moment
 *       its used element is seen (no grace for a late interrupt here).
 *       R bench op= count= qd= bs= ns_total= iops= p50_ns= p99_ns= max_ns=
 *         errors= irqs= kicks= kicks_suppressed=
 *       (percentiles over the sorted latencies)
 *   mode=bad case=NAME: a hostile driver. Sends the bad request (status
 *       byte set to 0xff first), waits for it 2 s at most (or until the
 *       device sets NEEDS_RESET), resets and re-initialises the device if
 *       it set NEEDS_RESET, then sends one good 1-sector read at sector 0.
 *       R bad case=NAME status=<byte the device wrote, 255 untouched, -1
 *         skipped> used=0|1 used_len= needs_reset=0|1 after_ok=0|1
 *         [skipped=1] [touched=0|1 (read_into_ro: the device-readable data
 *         buffer changed)]
 *       status 0 if after_ok (the good read returned OK). Cases:
 *     unknown_type      type 0x55, header + status
 *     past_end          IN of 1 sector at sector = capacity
 *     odd_len           IN with a 100-byte data buffer
 *     read_into_ro      IN whose 512-byte data descriptor is device-readable
 *     write_ro          OUT of sector 0 (its own content, read first): IOERR
 *                       expected on a read-only disk
 *     discard_flags     DISCARD {sector 0, 8 sectors, flags 0x80} (DISCARD)
 *     discard_too_many  DISCARD with max_discard_seg + 1 segments of 8
 *                       sectors (DISCARD; skipped if over 4096)
 *     wz_too_big        WRITE_ZEROES of max_write_zeroes_sectors + 8 sectors
 *                       at 0 (WRITE_ZEROES)
 *     no_status         a chain of the header only (an IN of sector 0): no
 *                       status descriptor
 *     all               every case above in turn, one R bad each (a case
 *                       that left its request with the device is followed
 *                       by a reset and a fresh initialisation); status 0 if
 *                       every after_ok
 *     (a case whose feature is not negotiated prints status=-1 skipped=1 and
 *     still does the good read)
 * Common: timeout_s=30 (for any request to complete), irq=msix|poll,
 * event_idx=0|1 (as net-probe: used_event written, avail_event honoured).
 * mode=verify and mode=write need a writable disk (no RO).
 *
 * pattern(seed, sector): the 512 bytes of a sector are 64 little-endian u64
 * words; word w (0..63) = mix(seed * 0x9e3779b97f4a7c15 + sector *
 * 0xbf58476d1ce4e5b9 + w), arithmetic mod 2^64, where mix is splitmix64's
 * finaliser: z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27;
 * z *= 0x94d049bb133111eb; z ^= z >> 31. (guests::blk_pattern in Rust.)
 *
 * Status: 0 ok, 1 no device / device error / timeout / a check failed,
 * 2 bad parameters, 3 bad data (verify, write). */
#include "virtio_pci.h"

#define VENDOR_DEVICE 0x10421af4u
#define BLK_VECTOR 0x53

/* feature bits */
#define F_SIZE_MAX 1
#define F_SEG_MAX 2
#define F_RO 5
#define F_BLK_SIZE 6
#define F_FLUSH 9
#define F_TOPOLOGY 10
#define F_MQ 12
#define F_DISCARD 13
#define F_WRITE_ZEROES 14
#define BIT(n) (1UL << (n))
#define ACCEPTED                                                                                                  \
    (BIT(F_SIZE_MAX) | BIT(F_SEG_MAX) | BIT(F_RO) | BIT(F_BLK_SIZE) | BIT(F_FLUSH) | BIT(F_TOPOLOGY) | BIT(F_MQ) | \
     BIT(F_DISCARD) | BIT(F_WRITE_ZEROES) | BIT(F_VERSION_1))
#define HAS(f) ((features & BIT(f)) != 0)

/* request types, status values */
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define ST_OK 0
#define ST_IOERR 1
#define ST_UNSUPP 2

#define SECTOR 512
#define MAXQD 16
#define MAXBYTES 65536 /* data per request */
#define MAXLAT 100000
#define ID_LEN 20

/* ------------------------------------------------------------ state --- */
static struct vq q;
static u64 offered, timeout_cycles, want_event_idx;
static int want_msix, irq_ready;
static u16 nq;

/* device configuration (5.2.4), as read */
static struct {
    u64 capacity;
    u32 size_max, seg_max, blk_size;
    u8 phys_block_exp, alignment_offset;
    u16 min_io;
    u32 opt_io;
    u16 num_queues;
    u32 max_discard_sectors, max_discard_seg, discard_align;
    u32 max_wz_sectors, max_wz_seg;
    u8 wz_may_unmap;
} cfg;

struct blk_hdr {
    u32 type, reserved;
    u64 sector;
};
struct dseg { /* a discard / write-zeroes segment */
    u64 sector;
    u32 num_sectors, flags;
};

/* One request slot: descriptors [slot * per, slot * per + per). */
static struct req {
    struct blk_hdr hdr;
    volatile u8 status;
    int busy, done;
    u16 head;
    u32 type, nsec, writable, used_len;
    u64 sector, t_submit, t_done;
} reqs[MAXQD];
static u8 pool[MAXQD][MAXBYTES] __attribute__((aligned(4096)));
static u32 qd = 1, per;
static u64 errors, short_len;

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

static void put_kv_i(const char *key, i64 v) {
    putc(' ');
    puts(key);
    putc('=');
    if (v < 0) {
        putc('-');
        put_u64((u64)-v);
    } else {
        put_u64((u64)v);
    }
}

/* --------------------------------------------------------- pattern --- */
static u64 mix(u64 z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9UL;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebUL;
    z ^= z >> 31;
    return z;
}

static void fill_sector(u8 *p, u64 seed, u64 sector) {
    u64 *w = (u64 *)p;
    u64 base = seed * 0x9e3779b97f4a7c15UL + sector * 0xbf58476d1ce4e5b9UL;
    for (u64 i = 0; i < SECTOR / 8; i++) w[i] = mix(base + i);
}

static int sector_ok(const u8 *p, u64 seed, u64 sector) {
    const u64 *w = (const u64 *)p;
    u64 base = seed * 0x9e3779b97f4a7c15UL + sector * 0xbf58476d1ce4e5b9UL;
    for (u64 i = 0; i < SECTOR / 8; i++)
        if (w[i] != mix(base + i)) return 0;
    return 1;
}

static int sector_zero(const u8 *p) {
    const u64 *w = (const u64 *)p;
    for (u64 i = 0; i < SECTOR / 8; i++)
        if (w[i]) return 0;
    return 1;
}

/* ------------------------------------------------------------ init --- */
static u32 cfg32(u32 off) { return mr32(devcfg.addr + off); }
static u16 cfg16(u32 off) { return mr16(devcfg.addr + off); }
static u8 cfg8(u32 off) { return mr8(devcfg.addr + off); }

/* The configuration fields of the negotiated features (0 otherwise), read
 * between two equal config_generation reads. */
static void read_config(void) {
    for (int tries = 0;; tries++) {
        if (tries == 100) device_fail("config_generation never settles");
        u8 gen = mr8(common.addr + C_GENERATION);
        cfg.capacity = cfg32(0) | (u64)cfg32(4) << 32;
        cfg.size_max = HAS(F_SIZE_MAX) ? cfg32(8) : 0;
        cfg.seg_max = HAS(F_SEG_MAX) ? cfg32(12) : 0;
        cfg.blk_size = HAS(F_BLK_SIZE) ? cfg32(20) : 0;
        cfg.phys_block_exp = HAS(F_TOPOLOGY) ? cfg8(24) : 0;
        cfg.alignment_offset = HAS(F_TOPOLOGY) ? cfg8(25) : 0;
        cfg.min_io = HAS(F_TOPOLOGY) ? cfg16(26) : 0;
        cfg.opt_io = HAS(F_TOPOLOGY) ? cfg32(28) : 0;
        cfg.num_queues = HAS(F_MQ) ? cfg16(34) : 1;
        cfg.max_discard_sectors = HAS(F_DISCARD) ? cfg32(36) : 0;
        cfg.max_discard_seg = HAS(F_DISCARD) ? cfg32(40) : 0;
        cfg.discard_align = HAS(F_DISCARD) ? cfg32(44) : 0;
        cfg.max_wz_sectors = HAS(F_WRITE_ZEROES) ? cfg32(48) : 0;
        cfg.max_wz_seg = HAS(F_WRITE_ZEROES) ? cfg32(52) : 0;
        cfg.wz_may_unmap = HAS(F_WRITE_ZEROES) ? cfg8(56) : 0;
        if (mr8(common.addr + C_GENERATION) == gen) return;
    }
}

/* 3.1.1 from reset to DRIVER_OK with requestq 0; quiet = no R blk. */
static void init_device(int quiet) {
    offered = begin_init();
    features = offered & (ACCEPTED | (want_event_idx ? BIT(F_EVENT_IDX) : 0));
    event_idx = HAS(F_EVENT_IDX);
    if (!write_features(features)) device_fail("FEATURES_OK did not read back: features refused");

    nq = mr16(common.addr + C_NUMQ);
    if (nq < 1) device_fail("no queue");
    /* the configuration space must hold every negotiated feature's field */
    u32 need = 8;
    if (HAS(F_SIZE_MAX)) need = 12;
    if (HAS(F_SEG_MAX)) need = 16;
    if (HAS(F_BLK_SIZE)) need = 24;
    if (HAS(F_TOPOLOGY)) need = 32;
    if (HAS(F_MQ)) need = 36;
    if (HAS(F_DISCARD)) need = 48;
    if (HAS(F_WRITE_ZEROES)) need = 57;
    if (!devcfg.found || devcfg.len < need) device_fail("device configuration missing or too short for the features");
    read_config();
    if (HAS(F_SEG_MAX) && !cfg.seg_max) device_fail("seg_max is 0");
    if (HAS(F_SIZE_MAX) && !cfg.size_max) device_fail("size_max is 0");

    if (!irq_ready) {
        idt_init();
        idt_set(BLK_VECTOR, ext_stub);
        lapic_enable();
        irq_ready = 1;
    }
    int msix = want_msix && msix_table;
    u16 vq0 = NO_VECTOR;
    if (msix) {
        msix_enable(msix_entries < 2 ? 1 : 2, BLK_VECTOR, BLK_VECTOR);
        vq0 = msix_entries < 2 ? 0 : 1;
        mw16(common.addr + C_MSIX, 0);
        if (mr16(common.addr + C_MSIX) != 0) msix = 0;
    }
    u16 got = vq_setup(&q, 0, msix ? vq0 : NO_VECTOR, 0, 0);
    if (msix && got != vq0) msix = 0; /* refused: poll */
    msix_on = msix;
    set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (get_status() & (S_NEEDS_RESET | S_FAILED)) device_fail("the device needs a reset after DRIVER_OK");
    per = q.size / qd;
    if (per < 3) fail(STATUS_BAD_ARGS, "qd too large for the queue size (3 descriptors a request at least)");
    for (u32 s = 0; s < MAXQD; s++) reqs[s].busy = reqs[s].done = 0;
    if (quiet) return;

    puts("R blk");
    put_kv("capacity", cfg.capacity);
    puts(" features=");
    put_hex(features);
    put_kv("flush", HAS(F_FLUSH));
    put_kv("discard", HAS(F_DISCARD));
    put_kv("wz", HAS(F_WRITE_ZEROES));
    put_kv("ro", HAS(F_RO));
    put_kv("seg_max", cfg.seg_max);
    put_kv("size_max", cfg.size_max);
    put_kv("blk_size", cfg.blk_size);
    put_kv("max_discard_sectors", cfg.max_discard_sectors);
    put_kv("max_discard_seg", cfg.max_discard_seg);
    put_kv("max_wz_sectors", cfg.max_wz_sectors);
    put_kv("mq", cfg.num_queues);
    put_kv("discard_align", cfg.discard_align);
    put_kv("max_wz_seg", cfg.max_wz_seg);
    put_kv("wz_may_unmap", cfg.wz_may_unmap);
    put_kv("phys_block_exp", cfg.phys_block_exp);
    put_kv("min_io", cfg.min_io);
    put_kv("opt_io", cfg.opt_io);
    puts(" offered=");
    put_hex(offered);
    put_kv("queues", nq);
    put_kv("queue_size", q.size);
    put_kv("msix", (u64)msix);
    put_kv("event_idx", (u64)event_idx);
    putc('\n');
}

/* -------------------------------------------------------- requests --- */
/* A timeout: the ring state, then the failure. */
static void __attribute__((noreturn)) stall(const char *msg) {
    u64 busy = 0;
    for (u32 s = 0; s < qd; s++) busy += reqs[s].busy != 0;
    puts("R stall");
    put_kv("event_idx", (u64)event_idx);
    put_kv("avail_idx", q.avail_idx);
    put_kv("used_idx", used_idx(&q));
    put_kv("last_used", q.last_used);
    put_kv("avail_event", *avail_event_of(&q));
    put_kv("used_event", *used_event_of(&q));
    put_kv("used_flags", *(volatile u16 *)&q.used.flags);
    put_kv("inflight", busy);
    put_kv("device_status", get_status());
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    putc('\n');
    device_fail(msg);
}

/* How many data descriptors nbytes take (split at size_max). */
static u32 segs_for(u32 nbytes) {
    if (!nbytes) return 0;
    if (!HAS(F_SIZE_MAX)) return 1;
    return (nbytes + cfg.size_max - 1) / cfg.size_max;
}

/* Builds slot s's chain and makes it available, then notifies: the header,
 * nbytes at data (device-writable with data_w) and, with status, the
 * status byte. The slot's t_submit is taken just before the notify. */
static void submit(u32 s, u32 type, u64 sector, u8 *data, u32 nbytes, int data_w, int status) {
    struct req *r = &reqs[s];
    u32 n = segs_for(nbytes);
    if (n + 1 + (u32)(status != 0) > per) fail(STATUS_BAD_ARGS, "a request needs more descriptors than its slot has");
    if (HAS(F_SEG_MAX) && n > cfg.seg_max) fail(STATUS_BAD_ARGS, "a request needs more data descriptors than seg_max");
    if (r->busy) fail(STATUS_FAIL, "slot busy (a driver bug)");
    u16 head = (u16)(s * per), d = head;
    r->hdr.type = type;
    r->hdr.reserved = 0;
    r->hdr.sector = sector;
    r->status = 0xff;
    r->type = type;
    r->sector = sector;
    r->nsec = nbytes / SECTOR;
    r->writable = (data_w ? nbytes : 0) + (status ? 1 : 0);
    r->used_len = 0;
    r->head = head;
    r->done = 0;
    int last = !n && !status;
    set_desc(&q, d, (u64)&r->hdr, sizeof(r->hdr), last ? 0 : VIRTQ_DESC_F_NEXT, (u16)(d + 1));
    for (u32 off = 0, i = 0; i < n; i++) {
        u32 len = nbytes - off;
        if (HAS(F_SIZE_MAX) && len > cfg.size_max) len = cfg.size_max;
        d++;
        last = i + 1 == n && !status;
        set_desc(&q, d, (u64)(data + off), len, (u16)((data_w ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT)),
                 (u16)(d + 1));
        off += len;
    }
    if (status) {
        d++;
        set_desc(&q, d, (u64)&r->status, 1, VIRTQ_DESC_F_WRITE, 0);
    }
    q.inflight[head] = (int)s + 1;
    q.posted_len[head] = r->writable;
    r->busy = 1;
    publish(&q, head);
    r->t_submit = rdtsc();
    kick(&q);
}

/* Takes every used element (each checked): its slot done. The count. */
static u32 reap(void) {
    u16 d;
    u32 s, len, n = 0;
    while (next_used(&q, &d, &s, &len)) {
        u64 now = rdtsc();
        if (s >= qd || !reqs[s].busy || reqs[s].head != d) device_fail("used element of no request in flight");
        reqs[s].busy = 0;
        reqs[s].done = 1;
        reqs[s].used_len = len;
        reqs[s].t_done = now;
        if (len < reqs[s].writable) short_len++;
        n++;
    }
    return n;
}

/* Waits for the next used element without wait_used's grace for a late
 * interrupt (mode=bench measures when a completion is seen). */
static int wait_seen(u64 timeout) {
    want_next_interrupt(&q);
    u64 t0 = rdtsc();
    __asm__ volatile("sti" ::: "memory");
    while (used_idx(&q) == q.last_used)
        if (rdtsc() - t0 > timeout) {
            __asm__ volatile("cli" ::: "memory");
            return 0;
        }
    __asm__ volatile("cli" ::: "memory");
    return 1;
}

static int fast_wait; /* mode=bench: wait_seen instead of wait_used */

static u64 waits; /* times the driver had to wait for a completion */

/* At least one more completion. */
static void wait_some(void) {
    while (!reap()) {
        waits++;
        if (!(fast_wait ? wait_seen(timeout_cycles) : wait_used(&q, timeout_cycles)))
            stall("timeout: no request completed");
    }
}

/* A free slot, waiting for a completion if all qd are busy; done slots are
 * handed to done_fn first. */
static void (*done_fn)(u32 s);

static void finish_done(void) {
    for (u32 s = 0; s < qd; s++)
        if (reqs[s].done) {
            reqs[s].done = 0;
            if (reqs[s].status != ST_OK) errors++;
            if (done_fn) done_fn(s);
        }
}

static u32 free_slot(void) {
    for (;;) {
        reap();
        finish_done();
        for (u32 s = 0; s < qd; s++)
            if (!reqs[s].busy) return s;
        wait_some();
    }
}

static void drain(void) {
    for (;;) {
        reap();
        finish_done();
        int busy = 0;
        for (u32 s = 0; s < qd; s++) busy |= reqs[s].busy;
        if (!busy) return;
        wait_some();
    }
}

/* One request on slot 0 with qd requests drained first: its status. */
static u8 one(u32 type, u64 sector, u8 *data, u32 nbytes, int data_w) {
    drain();
    void (*saved)(u32) = done_fn;
    done_fn = 0;
    u64 e = errors;
    submit(0, type, sector, data, nbytes, data_w, 1);
    while (reqs[0].busy) wait_some();
    reqs[0].done = 0;
    errors = e;
    done_fn = saved;
    return reqs[0].status;
}

/* ------------------------------------------------- range transfers --- */
static u64 range_seed, range_bad, range_zero_check;

static void check_read(u32 s) {
    struct req *r = &reqs[s];
    if (r->type != T_IN || r->status != ST_OK) return;
    for (u32 i = 0; i < r->nsec; i++) {
        u8 *p = pool[s] + (u64)i * SECTOR;
        int ok = range_zero_check ? sector_zero(p) : sector_ok(p, range_seed, r->sector + i);
        if (!ok) {
            if (!range_bad) {
                puts("R badsector");
                put_kv("sector", r->sector + i);
                put_kv("seed", range_seed);
                put_kv("zero", range_zero_check);
                putc('\n');
            }
            range_bad++;
        }
    }
}

/* IN or OUT over [start, start + n) in chunk-sector requests, qd in flight;
 * OUT writes pattern(seed), IN checks pattern(seed) (zeros with zero). The
 * requests issued; range_bad counts the sectors that did not match. */
static u64 transfer(u32 type, u64 start, u64 n, u64 chunk, u64 seed, int zero) {
    range_seed = seed;
    range_zero_check = (u64)zero;
    done_fn = check_read;
    u64 count = 0;
    for (u64 at = start; at < start + n; at += chunk) {
        u32 k = (u32)(start + n - at < chunk ? start + n - at : chunk);
        u32 s = free_slot();
        if (type == T_OUT)
            for (u32 i = 0; i < k; i++) fill_sector(pool[s] + (u64)i * SECTOR, seed, at + i);
        submit(s, type, at, pool[s], k * SECTOR, type == T_IN, 1);
        count++;
    }
    drain();
    done_fn = 0;
    return count;
}

static u64 flushes;

static void flush(void) {
    if (!HAS(F_FLUSH)) return;
    if (one(T_FLUSH, 0, 0, 0, 0) != ST_OK) errors++;
    flushes++;
}

/* ------------------------------------------------------ mode=verify --- */
static int verify(u64 start, u64 n, u64 chunk, u64 seed) {
    u64 writes = transfer(T_OUT, start, n, chunk, seed, 0);
    flush();
    range_bad = 0;
    u64 reads = transfer(T_IN, start, n, chunk, seed, 0);
    u64 bad = range_bad, wz_bad = 0;
    i64 discard = -1, wz = -1;
    u64 first = n < chunk ? n : chunk;
    if (HAS(F_DISCARD)) {
        struct dseg *g = (struct dseg *)pool[0];
        u64 k = first;
        if (cfg.max_discard_sectors && k > cfg.max_discard_sectors) k = cfg.max_discard_sectors;
        g->sector = start;
        g->num_sectors = (u32)k;
        g->flags = 0;
        discard = one(T_DISCARD, 0, pool[0], sizeof(*g), 0);
        if (discard != ST_OK) errors++;
    }
    if (HAS(F_WRITE_ZEROES) && n > chunk) {
        u64 at = start + chunk, k = n - chunk < chunk ? n - chunk : chunk;
        if (cfg.max_wz_sectors && k > cfg.max_wz_sectors) k = cfg.max_wz_sectors;
        struct dseg *g = (struct dseg *)pool[0];
        g->sector = at;
        g->num_sectors = (u32)k;
        g->flags = 0;
        wz = one(T_WRITE_ZEROES, 0, pool[0], sizeof(*g), 0);
        if (wz != ST_OK) errors++;
        range_bad = 0;
        reads += transfer(T_IN, at, k, chunk, 0, 1);
        wz_bad = range_bad;
    }
    puts("R verify");
    put_kv("sectors", n);
    put_kv("bad", bad);
    put_kv("writes", writes);
    put_kv("reads", reads);
    put_kv("flushes", flushes);
    put_kv_i("discard", discard);
    put_kv_i("wz", wz);
    put_kv("wz_bad", wz_bad);
    put_kv("errors", errors);
    put_kv("short_len", short_len);
    put_kv("waits", waits);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    putc('\n');
    if (bad || wz_bad) return STATUS_CORRUPT;
    return errors ? STATUS_FAIL : STATUS_OK;
}

/* ------------------------------------------------------- mode=write --- */
static int write_passes(u64 start, u64 n, u64 chunk, u64 seed, u64 passes) {
    u64 total = 0, p = 0;
    for (; !passes || p < passes; p++) {
        u64 e = errors;
        range_bad = 0;
        if (p > 0) transfer(T_IN, start, n, chunk, seed + p - 1, 0);
        u64 bad = range_bad;
        transfer(T_OUT, start, n, chunk, seed + p, 0);
        flush();
        total += bad;
        puts("R pass");
        put_kv("n", p);
        put_kv("bad", bad);
        put_kv("errors", errors - e);
        putc('\n');
    }
    puts("R write");
    put_kv("passes", p);
    put_kv("bad", total);
    put_kv("errors", errors);
    put_kv("short_len", short_len);
    putc('\n');
    if (total) return STATUS_CORRUPT;
    return errors ? STATUS_FAIL : STATUS_OK;
}

/* ------------------------------------------------------- mode=bench --- */
static u64 lat[MAXLAT];
static u64 nlat;

static void record_latency(u32 s) { lat[nlat++] = reqs[s].t_done - reqs[s].t_submit; }

static void sift(u64 *a, u64 i, u64 n) {
    for (;;) {
        u64 l = 2 * i + 1, m = i;
        if (l < n && a[l] > a[m]) m = l;
        if (l + 1 < n && a[l + 1] > a[m]) m = l + 1;
        if (m == i) return;
        u64 t = a[i];
        a[i] = a[m];
        a[m] = t;
        i = m;
    }
}

static void heapsort(u64 *a, u64 n) {
    for (u64 i = n / 2; i > 0; i--) sift(a, i - 1, n);
    for (u64 e = n; e > 1; e--) {
        u64 t = a[0];
        a[0] = a[e - 1];
        a[e - 1] = t;
        sift(a, 0, e - 1);
    }
}

static int bench(int write, u64 count, u64 bs, u64 span, u64 seed) {
    u64 bsec = bs / SECTOR, blocks = span / bsec, x = seed;
    if (!blocks) fail(STATUS_BAD_ARGS, "span is smaller than bs");
    if (write && HAS(F_RO)) fail(STATUS_FAIL, "the disk is read-only (VIRTIO_BLK_F_RO)");
    fast_wait = 1;
    done_fn = record_latency;
    nlat = 0;
    for (u32 s = 0; s < qd; s++)
        for (u64 i = 0; i < bsec; i++) fill_sector(pool[s] + i * SECTOR, seed, i);
    u64 t0 = rdtsc();
    for (u64 i = 0; i < count; i++) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        u64 sector = ((x >> 33) % blocks) * bsec;
        u32 s = free_slot();
        submit(s, write ? T_OUT : T_IN, sector, pool[s], (u32)bs, !write, 1);
    }
    drain();
    u64 t1 = rdtsc();
    done_fn = 0;
    fast_wait = 0;
    heapsort(lat, nlat);
    u64 ns = cycles_to_ns(t1 - t0);
    puts("R bench op=");
    puts(write ? "randwrite" : "randread");
    put_kv("count", count);
    put_kv("qd", qd);
    put_kv("bs", bs);
    put_kv("ns_total", ns);
    put_kv("iops", ns ? count * 1000000000UL / ns : 0);
    put_kv("p50_ns", cycles_to_ns(lat[(nlat - 1) * 50 / 100]));
    put_kv("p99_ns", cycles_to_ns(lat[(nlat - 1) * 99 / 100]));
    put_kv("max_ns", cycles_to_ns(lat[nlat - 1]));
    put_kv("errors", errors);
    put_kv("short_len", short_len);
    put_kv("waits", waits);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    put_kv("kicks", notifies);
    put_kv("kicks_suppressed", suppressed);
    putc('\n');
    return errors ? STATUS_FAIL : STATUS_OK;
}

/* --------------------------------------------------------- GET_ID --- */
static void get_id(void) {
    u8 *buf = pool[0];
    for (u32 i = 0; i < ID_LEN; i++) buf[i] = 0;
    u8 st = one(T_GET_ID, 0, buf, ID_LEN, 1);
    puts("R blkid serial=");
    if (st != ST_OK) {
        puts("none");
    } else {
        for (u32 i = 0; i < ID_LEN && buf[i]; i++)
            if (buf[i] > 0x20 && buf[i] < 0x7f) putc((char)buf[i]);
    }
    put_kv("status", st);
    putc('\n');
}

/* --------------------------------------------------------- mode=bad --- */
/* Waits for the bad request on slot 0: 2 s at most, or until the device
 * sets NEEDS_RESET. Its used element is read raw (the id and length are
 * recorded, not trusted). 1 if it completed. */
static int bad_wait(u32 *len, int *needs_reset) {
    u64 t0 = rdtsc();
    *needs_reset = 0;
    __asm__ volatile("sti" ::: "memory");
    while (used_idx(&q) == q.last_used) {
        if (get_status() & S_NEEDS_RESET) *needs_reset = 1;
        if (*needs_reset || rdtsc() - t0 > tsc_khz() * 2000) break;
        for (u64 t1 = rdtsc(); rdtsc() - t1 < tsc_khz(); ) cpu_relax();
    }
    __asm__ volatile("cli" ::: "memory");
    if (get_status() & S_NEEDS_RESET) *needs_reset = 1;
    if (used_idx(&q) == q.last_used) return 0;
    if ((u16)(used_idx(&q) - q.last_used) > q.size) device_fail("used index ran ahead of the ring");
    barrier();
    struct used_elem e = *(volatile struct used_elem *)&q.used.ring[q.last_used & (q.size - 1)];
    q.last_used++;
    want_next_interrupt(&q);
    if (e.id != reqs[0].head) device_fail("used element of no request in flight");
    q.inflight[e.id] = 0;
    reqs[0].busy = 0;
    *len = e.len;
    return 1;
}

static const char *const cases[] = {"unknown_type",  "past_end",         "odd_len",    "read_into_ro", "write_ro",
                                    "discard_flags", "discard_too_many", "wz_too_big", "no_status"};
#define NCASES (sizeof(cases) / sizeof(cases[0]))

/* Case c (an index in cases), its R bad record: 1 if after_ok. */
static int bad_case(u32 c) {
    const char *name = cases[c];
    u8 *buf = pool[0];
    struct dseg *g = (struct dseg *)buf;
    int skipped = 0, touched = -1, status_desc = 1;
    u32 type = T_IN, nbytes = SECTOR;
    u64 sector = 0;
    int data_w = 1;
    switch (c) {
    case 0: type = 0x55; nbytes = 0; break;
    case 1: sector = cfg.capacity; break;
    case 2: nbytes = 100; break;
    case 3:
        data_w = 0;
        for (u32 i = 0; i < SECTOR; i++) buf[i] = 0xa5;
        touched = 0;
        break;
    case 4:
        if (one(T_IN, 0, buf, SECTOR, 1) != ST_OK) device_fail("cannot read sector 0 before write_ro");
        type = T_OUT;
        data_w = 0;
        break;
    case 5:
        if (!HAS(F_DISCARD)) skipped = 1;
        type = T_DISCARD;
        data_w = 0;
        g[0].sector = 0;
        g[0].num_sectors = 8;
        g[0].flags = 0x80;
        nbytes = sizeof(*g);
        break;
    case 6: {
        if (!HAS(F_DISCARD) || cfg.max_discard_seg >= MAXBYTES / sizeof(*g)) {
            skipped = 1;
            break;
        }
        type = T_DISCARD;
        data_w = 0;
        u32 n = cfg.max_discard_seg + 1;
        for (u32 i = 0; i < n; i++) {
            u64 at = (u64)i * 8;
            g[i].sector = at + 8 <= cfg.capacity ? at : 0;
            g[i].num_sectors = 8;
            g[i].flags = 0;
        }
        nbytes = n * (u32)sizeof(*g);
        break;
    }
    case 7:
        if (!HAS(F_WRITE_ZEROES)) skipped = 1;
        type = T_WRITE_ZEROES;
        data_w = 0;
        g[0].sector = 0;
        g[0].num_sectors = cfg.max_wz_sectors > 0xffffffffu - 8 ? 0xffffffffu : cfg.max_wz_sectors + 8;
        g[0].flags = 0;
        nbytes = sizeof(*g);
        break;
    case 8: status_desc = 0; nbytes = 0; break;
    }
    u32 used = 0, used_len = 0;
    int needs_reset = 0;
    if (!skipped) {
        submit(0, type, sector, buf, nbytes, data_w, status_desc);
        used = (u32)bad_wait(&used_len, &needs_reset);
        if (touched == 0)
            for (u32 i = 0; i < SECTOR; i++) touched |= buf[i] != 0xa5;
    }
    u8 status = reqs[0].status;
    if (needs_reset) {
        if (!reset_device()) device_fail("the device does not finish its reset");
        init_device(1);
    }
    /* the good read, on slot 1 (slot 0 may still be held by the device) */
    u8 *good = pool[1];
    for (u32 i = 0; i < SECTOR; i++) good[i] = 0;
    int after_ok = 0;
    if (!needs_reset && !used) { /* the bad chain may still come back */
        submit(1, T_IN, 0, good, SECTOR, 1, 1);
        u64 t0 = rdtsc();
        while (reqs[1].busy && rdtsc() - t0 < timeout_cycles) {
            u16 d;
            u32 s, len;
            if (used_idx(&q) == q.last_used) {
                cpu_relax();
                continue;
            }
            if (!next_used(&q, &d, &s, &len)) continue;
            if (s == 1 && d == reqs[1].head) reqs[1].busy = 0;
            else if (s == 0) reqs[0].busy = 0; /* late */
            else device_fail("used element of no request in flight");
        }
        after_ok = !reqs[1].busy && reqs[1].status == ST_OK;
    } else {
        after_ok = one(T_IN, 0, good, SECTOR, 1) == ST_OK;
    }
    puts("R bad case=");
    puts(name);
    if (skipped) put_kv_i("status", -1);
    else put_kv("status", status);
    put_kv("used", used);
    put_kv("used_len", used_len);
    put_kv("needs_reset", (u64)needs_reset);
    put_kv("after_ok", (u64)after_ok);
    if (skipped) put_kv("skipped", 1);
    if (touched >= 0) put_kv("touched", (u64)touched);
    putc('\n');
    return after_ok;
}

/* One case, or all in turn (a case that left a request with the device gets
 * a reset and a fresh initialisation before the next one). */
static int bad_mode(const char *name) {
    int all = streq(name, "all"), ok = 1;
    u32 c = 0;
    while (c < NCASES && !streq(name, cases[c])) c++;
    if (c == NCASES && !all)
        fail(STATUS_BAD_ARGS, "case must be unknown_type, past_end, odd_len, read_into_ro, write_ro, discard_flags, "
                              "discard_too_many, wz_too_big, no_status or all");
    if (!all) return bad_case(c) ? STATUS_OK : STATUS_FAIL;
    for (c = 0; c < NCASES; c++) {
        if (reqs[0].busy || reqs[1].busy) {
            if (!reset_device()) device_fail("the device does not finish its reset");
            init_device(1);
        }
        ok &= bad_case(c);
    }
    return ok ? STATUS_OK : STATUS_FAIL;
}

/* ------------------------------------------------------------ main --- */
int guest_main(void) {
    char mode[8] = "verify", irq[8] = "msix", op[16] = "randread", case_name[24] = "";
    u64 start = 0, sectors = 256, chunk = 8, seed = 1, qd_arg = 1, passes = 1, count = 1000, bs = 4096, span = 0,
        timeout_s = 30;
    header("blk-probe");
    arg_str("mode", mode, sizeof(mode));
    arg_str("irq", irq, sizeof(irq));
    arg_str("op", op, sizeof(op));
    arg_str("case", case_name, sizeof(case_name));
    arg_u64("start", &start);
    arg_u64("sectors", &sectors);
    arg_u64("chunk", &chunk);
    arg_u64("seed", &seed);
    arg_u64("qd", &qd_arg);
    arg_u64("passes", &passes);
    arg_u64("count", &count);
    arg_u64("bs", &bs);
    int has_span = arg_u64("span", &span);
    arg_u64("timeout_s", &timeout_s);
    arg_u64("event_idx", &want_event_idx);
    int m_verify = streq(mode, "verify"), m_write = streq(mode, "write"), m_bench = streq(mode, "bench"),
        m_bad = streq(mode, "bad");
    if (!m_verify && !m_write && !m_bench && !m_bad) fail(STATUS_BAD_ARGS, "mode must be verify, write, bench or bad");
    if (!streq(irq, "msix") && !streq(irq, "poll")) fail(STATUS_BAD_ARGS, "irq must be msix or poll");
    if (!timeout_s || timeout_s > 3600) fail(STATUS_BAD_ARGS, "timeout_s must be 1..3600");
    if (want_event_idx > 1) fail(STATUS_BAD_ARGS, "event_idx must be 0 or 1");
    if (!qd_arg || qd_arg > MAXQD) fail(STATUS_BAD_ARGS, "qd must be 1..16");
    if (!chunk || chunk > MAXBYTES / SECTOR) fail(STATUS_BAD_ARGS, "chunk must be 1..128 sectors");
    if (m_bench && (!bs || bs % SECTOR || bs > MAXBYTES)) fail(STATUS_BAD_ARGS, "bs must be a multiple of 512, at most 65536");
    if (m_bench && (!count || count > MAXLAT)) fail(STATUS_BAD_ARGS, "count must be 1..100000");
    if (m_bench && !streq(op, "randread") && !streq(op, "randwrite")) fail(STATUS_BAD_ARGS, "op must be randread or randwrite");
    if (m_bad && !case_name[0]) fail(STATUS_BAD_ARGS, "mode=bad needs case=NAME");
    if ((m_verify || m_write) && !sectors) fail(STATUS_BAD_ARGS, "sectors must be at least 1");
    timeout_cycles = tsc_khz() * 1000 * timeout_s;
    want_msix = irq[0] == 'm';
    qd = m_bad ? 2 : (u32)qd_arg;

    if (!find_device(VENDOR_DEVICE)) fail(STATUS_FAIL, "no modern virtio-blk device (1af4:1042) on PCI bus 0");
    read_bars();
    walk_caps();
    init_device(0);
    get_id();

    if (m_bad) return bad_mode(case_name);
    if (m_bench) {
        if (!has_span) span = cfg.capacity;
        if (span > cfg.capacity) fail(STATUS_BAD_ARGS, "span is larger than the capacity");
        return bench(streq(op, "randwrite"), count, bs, span, seed);
    }
    if (start > cfg.capacity || sectors > cfg.capacity - start) fail(STATUS_BAD_ARGS, "start + sectors is past the capacity");
    if (HAS(F_RO)) fail(STATUS_FAIL, "the disk is read-only (VIRTIO_BLK_F_RO): mode=verify and mode=write write");
    if (m_verify) return verify(start, sectors, chunk, seed);
    return write_passes(start, sectors, chunk, seed, passes);
}
