/* net-probe: a small virtio-net driver for the modern virtio-pci transport
 * (virtio 1.x, PCI 1af4:1041), split virtqueues, receiveq 0 and transmitq 1.
 *
 * The transport (virtio_pci.c, shared with blk-probe): finds the device on
 * PCI bus 0 through the 0xCF8/0xCFC ports, reads its
 * BARs as the firmware or the VMM assigned them (sized, never moved), walks
 * the virtio vendor capabilities (common, notify, ISR, device config, PCI
 * cfg access) and the MSI-X capability, then initialises the device as the
 * virtio 1.2 spec (3.1) says: reset, ACKNOWLEDGE, DRIVER, features (only
 * VERSION_1, NET_F_MAC, NET_F_STATUS, NET_F_MTU accepted; MQ and CTRL_VQ
 * with pairs=N, GUEST_ANNOUNCE with announce=1, CSUM and HOST_TSO4 in
 * mode=tso, EVENT_IDX with event_idx=1), FEATURES_OK (read back), queues,
 * MSI-X vectors (read back), DRIVER_OK.
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
 *                       pairs=N (1..4): set up as mode=ping pairs=N; every
 *                       active pair served, round-robin (after a frame from
 *                       pair k the next looked at is k + 1; the wait watches
 *                       every receiveq): a frame from pair k's receiveq goes
 *                       back on pair k's transmitq, its buffer replaced on
 *                       pair k. frames= counts all pairs; R echo ... pairs=N
 *                       pair0=F0 pair1=F1 .. (frames per pair) at the end.
 *                       announce=1 (echo only): VIRTIO_NET_F_GUEST_ANNOUNCE
 *                       (21) accepted with CTRL_VQ (17) and STATUS (16) when
 *                       all three are offered (the control queue set up even
 *                       with pairs=1, MQ then not acked); else none of them
 *                       is taken for it and echo goes on (R negotiated
 *                       announce=0). The configuration vector gets MSI-X
 *                       entry 0 and CFG_VECTOR of its own (as mode=link);
 *                       the status (config offset 6, read between two equal
 *                       config_generation reads) is read at least every 10
 *                       ms and on each configuration interrupt; with
 *                       VIRTIO_NET_S_ANNOUNCE (2) set: one RARP from this
 *                       MAC on pair 0 (to ff:ff:ff:ff:ff:ff, 0x8035, htype
 *                       1, ptype 0x0800, hlen 6, plen 4, oper 3, sha = tha
 *                       = MAC, spa = tpa = 0.0.0.0, zero-padded to 60
 *                       bytes), then VIRTIO_NET_CTRL_ANNOUNCE (3)
 *                       VIRTIO_NET_CTRL_ANNOUNCE_ACK (0) on the control
 *                       queue, its one-byte answer waited for:
 *                       R announce n=K ack=A (K announces so far, A the
 *                       answer, 0 = VIRTIO_NET_OK); echo goes on.
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
 *   mode=ping count=N size=S   N frames of S bytes (ethertype 0x88b5, to
 *                       the broadcast address, from this MAC), one at a
 *                       time: each must come back (a peer that reflects
 *                       frames: testpmd in macswap or io mode, a loop)
 *                       before the next leaves; the one that comes back
 *                       must carry the same seq and a good checksum.
 *                       pairs=N (1..4): needs MQ and CTRL_VQ; every pair
 *                       the device has is set up (up to 4; the control
 *                       queue is 2 * max_virtqueue_pairs), N of them
 *                       turned on with VQ_PAIRS_SET on the control queue
 *                       (R ctrl pairs= ack=), frame n goes out and must
 *                       come back on pair n % N (R ping ... pairs=N
 *                       pair0=.. at the end of the line).
 *                       resend_ms=M: a frame not back within M ms is
 *                       sent again (resent= counts them; a late twin
 *                       counts as other), until timeout_s.
 *                       R ping frames= bad= other= resent= rtt_min_us=
 *                       rtt_avg_us= rtt_max_us= (TSC, first send to receive)
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
 *   mode=tso size=S mss=M [bad=hdr_len|csum_start]   needs CSUM (0) and
 *                       HOST_TSO4 (11) (fails without both). One frame of S
 *                       bytes (60..65549) in one chain (the 12-byte header,
 *                       then the frame, from a static buffer): to
 *                       02:00:00:00:00:01 from this MAC, IPv4 10.0.0.2 ->
 *                       10.0.0.1 (id 1, DF, ttl 64, total length S - 14,
 *                       header checksum set), TCP 1234 -> 5678, seq 1, ack
 *                       0, data offset 5, ACK|PSH, window 65535, checksum
 *                       field = the folded pseudo-header sum (not
 *                       complemented: CHECKSUM_PARTIAL), payload byte i =
 *                       (i * 7 + 3) & 0xff. virtio_net_hdr: NEEDS_CSUM,
 *                       GSO_TCPV4, hdr_len 54, gso_size M, csum_start 34,
 *                       csum_offset 16, num_buffers 0; bad=hdr_len:
 *                       hdr_len S + 100, bad=csum_start: csum_start S (both
 *                       need S <= 65435). Then one 60-byte test frame (seq
 *                       0, as mode=send). R tso size=S mss=M sent= after=
 *                       (1: the device completed the TSO chain / the test
 *                       frame within timeout_s; status 1 unless both)
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
 * notifies= and suppressed= are the same totals under their older names;
 * with pairs=N the rx_ and tx_ counters are summed over the pairs set up,
 * and the control queue's kicks count in the totals only.
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
#include "virtio_pci.h"

#define VENDOR_DEVICE 0x10411af4u
#define NET_VECTOR 0x51
#define CFG_VECTOR 0x52 /* mode=link: configuration changes only */
#define HDR_LEN 12
#define FRAME_MAX 1514
#define BUF_LEN (HDR_LEN + FRAME_MAX) /* 1526, what the spec asks for */
#define BUF_STRIDE 1536
#define MAXPAIRS 4 /* queue pairs set up at most (mode=ping|echo pairs=) */
#define NBUF (2 * QMAX * MAXPAIRS)
#define ETHERTYPE 0x88b5

/* feature bits */
#define F_CSUM 0
#define F_MTU 3
#define F_MAC 5
#define F_STATUS 16
#define F_HOST_TSO4 11
#define F_CTRL_VQ 17
#define F_GUEST_ANNOUNCE 21
#define F_MQ 22
#define ACCEPTED ((1UL << F_MTU) | (1UL << F_MAC) | (1UL << F_STATUS) | (1UL << F_VERSION_1))
#define S_ANNOUNCE 2 /* VIRTIO_NET_S_ANNOUNCE in the config status */

/* ------------------------------------------------------ interrupts --- */
/* mode=link, announce=1: configuration-change interrupts on CFG_VECTOR,
 * counted apart
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

static u8 entry0_vector = NET_VECTOR; /* CFG_VECTOR in mode=link and with announce=1 */


/* ----------------------------------------------------- virtqueues --- */
/* queue pair `cur` is the one every mode drives (pair 0 but with
 * pairs=N, where ping and echo turn through them); the control queue
 * (pairs=N, announce=1) sets how many pairs the device uses and acks
 * announces */
static struct vq rxqs[MAXPAIRS], txqs[MAXPAIRS], ctrlq;
static u32 cur, setup_pairs = 1, want_pairs = 1;
#define rxq (rxqs[cur])
#define txq (txqs[cur])
static u8 buffers[NBUF][BUF_STRIDE] __attribute__((aligned(4096)));
static u32 free_bufs[NBUF], nfree;
static u64 timeout_cycles;
static u64 want_event_idx, want_announce;
static int announce_on; /* GUEST_ANNOUNCE (and CTRL_VQ) negotiated */
static int want_tso;     /* mode=tso: CSUM and HOST_TSO4 needed */

static u32 take_buf(void) {
    if (!nfree) fail(STATUS_FAIL, "out of buffers (a driver bug)");
    return free_bufs[--nfree];
}
static void give_buf(u32 b) { free_bufs[nfree++] = b; }

/* mode=bad: what the driver does wrong (see the top of the file) */
enum { BAD_NONE, BAD_LOOP, BAD_PAST_RAM, BAD_LONG_CHAIN, BAD_QSIZE3, BAD_RING_OUTSIDE, BAD_UNOFFERED, BAD_RESET_MID };
#define RAM_HOLE 0xfff00000UL /* beyond guest RAM (and below 4 GiB) */
static u16 qsize3_read, over_max, over_max_read;

/* BAD_QSIZE3: size 3, then twice the maximum, each read back */
static void qsize3(u16 max) {
    mw16(common.addr + C_Q_SIZE, 3);
    qsize3_read = mr16(common.addr + C_Q_SIZE);
    over_max = max <= 0x4000 ? (u16)(2 * max) : 0x8000;
    mw16(common.addr + C_Q_SIZE, over_max);
    over_max_read = mr16(common.addr + C_Q_SIZE);
}

/* vq_setup (virtio_pci.c), misbehaving on receiveq as bad says */
static u16 queue_setup(struct vq *q, u16 index, u16 vector, int bad) {
    int rx = index == 0;
    return vq_setup(q, index, vector, bad == BAD_QSIZE3 && rx ? qsize3 : 0, bad == BAD_RING_OUTSIDE && rx ? RAM_HOLE : 0);
}

/* Makes descriptor d available with buffer b; the caller notifies. */
static void post(struct vq *q, u16 d, u32 b, u32 len, u16 flags) {
    set_desc(q, d, (u64)buffers[b], len, flags, 0);
    q->inflight[d] = (int)b + 1;
    q->posted_len[d] = (flags & VIRTQ_DESC_F_WRITE) ? len : ~0u; /* transmit: not checked */
    publish(q, d);
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

/* The kick counters of a result record: rx_ and tx_ summed over the
 * pairs set up (the control queue's count in the totals only). */
static void put_kicks(void) {
    u64 rk = 0, rs = 0, tk = 0, ts = 0;
    for (u32 k = 0; k < setup_pairs; k++) {
        rk += rxqs[k].kicks;
        rs += rxqs[k].kicks_suppressed;
        tk += txqs[k].kicks;
        ts += txqs[k].kicks_suppressed;
    }
    put_kv("kicks", notifies);
    put_kv("kicks_suppressed", suppressed);
    put_kv("rx_kicks", rk);
    put_kv("rx_kicks_suppressed", rs);
    put_kv("tx_kicks", tk);
    put_kv("tx_kicks_suppressed", ts);
}

static u16 free_desc(struct vq *q) {
    for (u16 d = 0; d < q->size; d++)
        if (!q->inflight[d]) return d;
    return q->size;
}

/* Reclaims every completed transmit buffer (tokens from NBUF on name
 * static buffers: mode=tso's frame, never pooled). */
static void reap_tx(void) {
    u16 d;
    u32 b, len;
    while (next_used(&txq, &d, &b, &len))
        if (b < NBUF) give_buf(b);
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

/* -------------------------------------------------- control queue --- */
/* One command on the control queue (virtio 1.2, 5.1.6.5): a chain of the
 * class/command header, the command's data (when len) and the device's
 * one-byte answer (0: VIRTIO_NET_OK), always descriptors 0..2, waited for
 * up to timeout_s; returns the answer. */
static struct {
    u8 hdr[2];
    u8 data[6];
    u8 ack;
} __attribute__((aligned(64))) ctrl_cmd;

static u8 ctrl_command(u8 class, u8 command, const u8 *data, u32 len) {
    if (len > sizeof(ctrl_cmd.data)) fail(STATUS_FAIL, "control command data too long (a driver bug)");
    ctrl_cmd.hdr[0] = class;
    ctrl_cmd.hdr[1] = command;
    for (u32 i = 0; i < len; i++) ctrl_cmd.data[i] = data[i];
    ctrl_cmd.ack = 0xff;
    u16 at = 1;
    set_desc(&ctrlq, 0, (u64)&ctrl_cmd.hdr, 2, VIRTQ_DESC_F_NEXT, 1);
    if (len) set_desc(&ctrlq, at++, (u64)&ctrl_cmd.data, len, VIRTQ_DESC_F_NEXT, 2);
    set_desc(&ctrlq, at, (u64)&ctrl_cmd.ack, 1, VIRTQ_DESC_F_WRITE, 0);
    ctrlq.inflight[0] = 1;
    ctrlq.posted_len[0] = 1;
    publish(&ctrlq, 0);
    kick(&ctrlq);
    u16 d;
    u32 token, rlen;
    while (!next_used(&ctrlq, &d, &token, &rlen))
        if (!wait_used(&ctrlq, timeout_cycles)) device_fail("timeout: no answer on the control queue");
    return *(volatile u8 *)&ctrl_cmd.ack;
}

/* VIRTIO_NET_CTRL_MQ (4) VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (0), the pair
 * count a little-endian u16. R ctrl pairs= ack= */
static void set_pairs(u32 pairs) {
    u8 n[2] = {(u8)pairs, (u8)(pairs >> 8)};
    u8 ack = ctrl_command(4, 0, n, 2);
    puts("R ctrl");
    put_kv("pairs", pairs);
    put_kv("ack", ack);
    putc('\n');
    if (ack != 0) device_fail("the device refused VQ_PAIRS_SET");
}

/* ------------------------------------------------------ config status --- */
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

/* announce=1 (GUEST_ANNOUNCE negotiated): the status is read every 10 ms
 * and on each configuration interrupt; VIRTIO_NET_S_ANNOUNCE set: one RARP
 * from this MAC on pair 0, then VIRTIO_NET_CTRL_ANNOUNCE (3)
 * VIRTIO_NET_CTRL_ANNOUNCE_ACK (0), which clears the bit.
 * R announce n= ack= */
static u64 announces, cfg_next, cfg_seen;

static void announce(void) {
    u32 keep = cur;
    cur = 0;
    u16 d = tx_slot();
    u32 b = take_buf();
    u8 *p = buffers[b], *f = p + HDR_LEN;
    clear_hdr(p);
    for (int i = 0; i < 60; i++) f[i] = 0;
    static const u8 rarp[] = {0x80, 0x35, 0, 1, 0x08, 0x00, 6, 4, 0, 3}; /* type, htype .. oper */
    for (int i = 0; i < 6; i++) {
        f[i] = 0xff;
        f[6 + i] = mac[i];
        f[22 + i] = mac[i]; /* sha; spa 0.0.0.0 */
        f[32 + i] = mac[i]; /* tha; tpa 0.0.0.0 */
    }
    for (u32 i = 0; i < sizeof(rarp); i++) f[12 + i] = rarp[i];
    post(&txq, d, b, HDR_LEN + 60, 0);
    kick(&txq);
    cur = keep;
    u8 ack = ctrl_command(3, 0, 0, 0);
    announces++;
    puts("R announce");
    put_kv("n", announces);
    put_kv("ack", ack);
    putc('\n');
}

/* The status read when 10 ms have passed or a configuration interrupt came
 * since the last read; an announce made when asked for. */
static void watch_announce(void) {
    if (!announce_on) return;
    u64 now = rdtsc();
    if (cfg_irqs == cfg_seen && now < cfg_next) return;
    cfg_seen = cfg_irqs;
    cfg_next = now + tsc_khz() * 10;
    u8 gen;
    if (read_link(&gen) & S_ANNOUNCE) announce();
}

/* ------------------------------------------------------- mode=echo --- */
/* Waits until one of the active receive queues has a used element, the
 * config status watched meanwhile (announce=1): 0 on timeout (never with
 * timeout 0). */
static int wait_rx(u64 timeout) {
    for (u32 k = 0; k < want_pairs; k++) want_next_interrupt(&rxqs[k]);
    u64 t0 = rdtsc(), seen0 = irqs;
    for (;;) {
        for (u32 k = 0; k < want_pairs; k++)
            if (used_idx(&rxqs[k]) != rxqs[k].last_used) goto found;
        watch_announce();
        if (timeout && rdtsc() - t0 > timeout) return 0;
        u64 seen = irqs, cseen = cfg_irqs, t1 = rdtsc();
        int any = 0;
        __asm__ volatile("sti" ::: "memory");
        while (!any && irqs == seen && cfg_irqs == cseen && rdtsc() - t1 < tsc_khz() * 10) {
            cpu_relax();
            for (u32 k = 0; k < want_pairs; k++) any |= used_idx(&rxqs[k]) != rxqs[k].last_used;
        }
        __asm__ volatile("cli" ::: "memory");
    }
found:
    if (irqs == seen0 && msix_on) {
        /* found by polling: the interrupt gets 1 ms (as wait_used) */
        __asm__ volatile("sti" ::: "memory");
        for (u64 t1 = rdtsc(); irqs == seen0 && rdtsc() - t1 < tsc_khz();) cpu_relax();
        __asm__ volatile("cli" ::: "memory");
        if (irqs == seen0) polled++;
    }
    return 1;
}

/* pairs=N: " pairs=N pair0=.. pair1=.." */
static void put_pairs(const u64 *per_pair) {
    if (want_pairs < 2) return;
    put_kv("pairs", want_pairs);
    for (u32 k = 0; k < want_pairs; k++) {
        puts(" pair");
        put_u64(k);
        putc('=');
        put_u64(per_pair[k]);
    }
}

/* Every active pair served, round-robin: a frame from pair k's receiveq
 * goes back on pair k's transmitq, its buffer replaced on pair k. */
static int echo(u64 count) {
    u64 frames = 0, bytes = 0, other = 0, per_pair[MAXPAIRS] = {0};
    u32 next = 0; /* the pair looked at first */
    cfg_seen = cfg_irqs;
    cfg_next = 0;
    while (!count || frames < count) {
        watch_announce();
        for (cur = 0; cur < want_pairs; cur++) reap_tx();
        u16 d;
        u32 b, len, k;
        for (k = 0; k < want_pairs; k++) {
            cur = (next + k) % want_pairs;
            if (next_used(&rxq, &d, &b, &len)) break;
        }
        if (k == want_pairs) {
            cur = next;
            if (!wait_rx(count ? timeout_cycles : 0)) stall("timeout: no frame received");
            continue;
        }
        next = (cur + 1) % want_pairs;
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
        per_pair[cur]++;
        progress++;
        bytes += flen;
    }
    for (cur = 0; cur < want_pairs; cur++) drain_tx();
    cur = 0;
    puts("R echo");
    put_kv("frames", frames);
    put_kv("bytes", bytes);
    put_kv("other", other);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    put_kv("notifies", notifies);
    put_kv("suppressed", suppressed);
    put_kicks();
    put_pairs(per_pair);
    putc('\n');
    return STATUS_OK;
}

/* mode=send and mode=ping: posts test frame n of `size` bytes (to the broadcast
 * address, from this MAC) on the transmit queue. */
static u16 send_test_frame(u64 n, u64 size) {
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
    return d;
}

static int send(u64 count, u64 size) {
    u64 bytes = 0;
    for (u64 n = 0; n < count; n++) {
        send_test_frame(n, size);
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

/* mode=ping: one frame out, the same frame back, N times; with
 * resend_ms, a frame that has not come back by then is sent again (a peer
 * that restarts loses what it held), up to timeout_s. */
static int ping(u64 count, u64 size, u64 resend_ms) {
    u64 bad = 0, other = 0, resent = 0, rtt_min = ~0UL, rtt_max = 0, rtt_sum = 0;
    u64 resend_cycles = resend_ms * tsc_khz();
    u64 per_pair[MAXPAIRS] = {0};
    for (u64 n = 0; n < count; n++) {
        cur = (u32)(n % want_pairs);
        per_pair[cur]++;
        u64 t0 = rdtsc(), sent_at = t0;
        send_test_frame(n, size);
        for (;;) {
            u16 rd;
            u32 rb, len;
            reap_tx();
            if (!next_used(&rxq, &rd, &rb, &len)) {
                u64 now = rdtsc();
                if (now - t0 >= timeout_cycles) stall("timeout: the frame did not come back");
                u64 wait = timeout_cycles - (now - t0);
                if (resend_cycles) {
                    if (now - sent_at >= resend_cycles) {
                        send_test_frame(n, size);
                        resent++;
                        sent_at = now;
                    }
                    wait = resend_cycles;
                }
                wait_used(&rxq, wait);
                continue;
            }
            u8 *g = buffers[rb] + HDR_LEN;
            u32 flen = len >= HDR_LEN ? len - HDR_LEN : 0;
            int ours = flen >= 22 && g[12] == (ETHERTYPE >> 8) && g[13] == (ETHERTYPE & 0xff);
            int match = ours && get_le32(g + 14) == (u32)n;
            if (match) {
                u64 rtt = rdtsc() - t0;
                rtt_sum += rtt;
                if (rtt < rtt_min) rtt_min = rtt;
                if (rtt > rtt_max) rtt_max = rtt;
                if (flen != size || get_le32(g + 18) != fnv1a(g + 22, flen - 22)) {
                    if (!bad) {
                        puts("R badframe");
                        put_kv("seq", n);
                        put_kv("len", flen);
                        putc('\n');
                    }
                    bad++;
                }
            } else {
                other++; /* another frame, or a resent one's late twin */
            }
            post(&rxq, rd, rb, BUF_LEN, VIRTQ_DESC_F_WRITE);
            kick(&rxq);
            if (match) break;
        }
        progress++;
    }
    for (cur = 0; cur < want_pairs; cur++) drain_tx();
    cur = 0;
    u64 khz = tsc_khz();
    puts("R ping");
    put_kv("frames", count);
    put_kv("bad", bad);
    put_kv("other", other);
    put_kv("resent", resent);
    put_kv("rtt_min_us", count ? rtt_min * 1000 / khz : 0);
    put_kv("rtt_avg_us", count ? rtt_sum / count * 1000 / khz : 0);
    put_kv("rtt_max_us", rtt_max * 1000 / khz);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    put_kicks();
    put_pairs(per_pair);
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
static int want_msix, irq_ready, features_ok_stuck;


enum { INIT_OK, INIT_FEATURES_REFUSED, INIT_NEEDS_RESET };

/* 3.1.1 from reset to DRIVER_OK, every receive buffer posted with post_rx;
 * prints R negotiated. With bad = BAD_QSIZE3, BAD_RING_OUTSIDE or
 * BAD_UNOFFERED it misbehaves on the way, and returns as soon as the device
 * has answered (features refused, needs reset). */
static int init_device(int bad, int post_rx) {
    offered = begin_init();
    u64 mq = want_pairs > 1 ? (1UL << F_MQ) | (1UL << F_CTRL_VQ) : 0;
    if ((offered & mq) != mq) device_fail("pairs= needs a device that offers MQ and CTRL_VQ");
    u64 more = mq;
    /* announce=1: GUEST_ANNOUNCE with CTRL_VQ (and STATUS, where the bit
     * lives) when all are offered, else none of it */
    u64 ann = (1UL << F_GUEST_ANNOUNCE) | (1UL << F_CTRL_VQ) | (1UL << F_STATUS);
    if (want_announce && (offered & ann) == ann) more |= ann;
    u64 tso = (1UL << F_CSUM) | (1UL << F_HOST_TSO4);
    if (want_tso && (offered & tso) != tso) device_fail("mode=tso needs a device that offers CSUM and HOST_TSO4");
    if (want_tso) more |= tso;
    features = offered & (ACCEPTED | more | (want_event_idx ? 1UL << F_EVENT_IDX : 0));
    event_idx = (features & (1UL << F_EVENT_IDX)) != 0;
    announce_on = (features & (1UL << F_GUEST_ANNOUNCE)) != 0;
    int ctrl = (features & (1UL << F_CTRL_VQ)) != 0;
    u64 acked = features;
    if (bad == BAD_UNOFFERED) acked |= 1UL << 33; /* ACCESS_PLATFORM, never offered here */
    features_ok_stuck = write_features(acked);
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
    if (mq && (!devcfg.found || devcfg.len < 10)) device_fail("device config too short for max_virtqueue_pairs");
    read_config(&link_status, &mtu);
    setup_pairs = 1;
    u16 max_pairs = 1; /* without MQ the control queue is queue 2 */
    if (mq) {
        max_pairs = cfg16(8); /* max_virtqueue_pairs */
        if (max_pairs < want_pairs || max_pairs > 0x8000) device_fail("max_virtqueue_pairs below pairs= or above 0x8000");
        setup_pairs = max_pairs < MAXPAIRS ? max_pairs : MAXPAIRS; /* the rest stay off */
    }

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
        msix_enable(msix_entries < 3 ? 1 : 3, entry0_vector, NET_VECTOR);
        vcfg = 0;
        vrx = msix_entries < 3 ? 0 : 1;
        vtx = msix_entries < 3 ? 0 : 2;
        if (entry0_vector == CFG_VECTOR && msix_entries < 3) vrx = vtx = NO_VECTOR; /* entry 0 is config's */
        mw16(common.addr + C_MSIX, vcfg);
        if (mr16(common.addr + C_MSIX) != vcfg) msix = 0;
    }
    for (cur = 0; cur < setup_pairs; cur++) {
        u16 grx = queue_setup(&rxq, (u16)(2 * cur), msix ? vrx : NO_VECTOR, bad);
        u16 gtx = queue_setup(&txq, (u16)(2 * cur + 1), msix ? vtx : NO_VECTOR, bad);
        if (msix && (grx != vrx || gtx != vtx)) msix = 0; /* refused: poll */
    }
    cur = 0;
    if (ctrl) {
        queue_setup(&ctrlq, (u16)(2 * max_pairs), NO_VECTOR, 0);
        if (ctrlq.size < 4) device_fail("the control queue is smaller than a command's chain");
    }
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
        for (cur = 0; cur < setup_pairs; cur++) {
            for (u16 d = 0; d < rxq.size; d++) post(&rxq, d, take_buf(), BUF_LEN, VIRTQ_DESC_F_WRITE);
            kick(&rxq);
        }
        cur = 0;
    }
    if (mq) set_pairs(want_pairs);

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
    put_kv("announce", (u64)announce_on);
    putc('\n');
    return INIT_OK;
}

/* ------------------------------------------------------- mode=bad --- */
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

/* ------------------------------------------------------- mode=tso --- */
#define TSO_MAX (65535 + 14) /* an IPv4 packet of 65535 bytes, framed */
#define TSO_TOKEN NBUF       /* the static frame's token (reap_tx skips it) */
static u8 tso_hdr[HDR_LEN] __attribute__((aligned(64)));
static u8 tso_frame[TSO_MAX] __attribute__((aligned(4096)));

static void put_be16(u8 *p, u32 v) {
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}
static void put_le16(u8 *p, u32 v) {
    p[0] = (u8)v;
    p[1] = (u8)(v >> 8);
}

/* The one's-complement sum of n bytes as big-endian words, folded. */
static u16 sum16(u64 sum, const u8 *p, u32 n) {
    for (u32 i = 0; i + 1 < n; i += 2) sum += (u32)p[i] << 8 | p[i + 1];
    if (n & 1) sum += (u32)p[n - 1] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (u16)sum;
}

/* Waits (up to timeout_s) for the transmit chain at head to complete,
 * reclaiming whatever else completes: 1 if it did. */
static int tx_done(u16 head) {
    u64 t0 = rdtsc();
    for (;;) {
        reap_tx();
        if (!txq.inflight[head]) return 1;
        u64 spent = rdtsc() - t0;
        if (spent >= timeout_cycles) return 0;
        wait_used(&txq, timeout_cycles - spent);
    }
}

/* One Ethernet + IPv4 + TCP frame of size bytes, header and frame in one
 * chain of two descriptors, for the device to segment by mss (see the top
 * of the file), bad as asked; then one 60-byte test frame (seq 0). */
static int tso(u64 size, u64 mss, int bad) {
    u8 *f = tso_frame;
    static const u8 dst[6] = {0x02, 0, 0, 0, 0, 0x01};
    u32 ip_len = (u32)size - 14, tcp_len = ip_len - 20;
    for (int i = 0; i < 6; i++) {
        f[i] = dst[i];
        f[6 + i] = mac[i];
    }
    put_be16(f + 12, 0x0800);
    u8 *ip = f + 14, *tcp = f + 34;
    /* id 1, DF, ttl 64, TCP, 10.0.0.2 -> 10.0.0.1 */
    static const u8 ip_fixed[] = {0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1};
    for (u32 i = 0; i < sizeof(ip_fixed); i++) ip[i] = ip_fixed[i];
    put_be16(ip + 2, ip_len);
    put_be16(ip + 10, (u16)~sum16(0, ip, 20));
    static const u8 tcp_fixed[] = {0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0};
    for (u32 i = 0; i < sizeof(tcp_fixed); i++) tcp[i] = tcp_fixed[i]; /* 1234 -> 5678, seq 1, ACK|PSH */
    for (u32 i = 0; i < tcp_len - 20; i++) tcp[20 + i] = (u8)(i * 7 + 3);
    /* CHECKSUM_PARTIAL (virtio 1.2, 5.1.6.2; Linux's tcp_v4_send_check):
     * the field holds the folded pseudo-header sum (addresses, protocol,
     * TCP length), not complemented; the device sums from csum_start and
     * stores the complement at csum_start + csum_offset */
    u8 pseudo[12] = {10, 0, 0, 2, 10, 0, 0, 1, 0, 6, (u8)(tcp_len >> 8), (u8)tcp_len};
    put_be16(tcp + 16, sum16(0, pseudo, 12));
    /* virtio_net_hdr_v1: NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size,
     * csum_start, csum_offset, num_buffers 0 */
    clear_hdr(tso_hdr);
    tso_hdr[0] = 1;
    tso_hdr[1] = 1;
    put_le16(tso_hdr + 2, bad == 1 ? (u32)size + 100 : 54);
    put_le16(tso_hdr + 4, (u32)mss);
    put_le16(tso_hdr + 6, bad == 2 ? (u32)size : 34);
    put_le16(tso_hdr + 8, 16);
    u16 d = tx_slot(); /* and a second free descriptor */
    txq.inflight[d] = 1; /* held while the second is looked for */
    u16 e = free_desc(&txq);
    txq.inflight[d] = 0;
    if (e == txq.size) fail(STATUS_FAIL, "no second free transmit descriptor (a driver bug)");
    set_desc(&txq, d, (u64)tso_hdr, HDR_LEN, VIRTQ_DESC_F_NEXT, e);
    set_desc(&txq, e, (u64)tso_frame, (u32)size, 0, 0);
    txq.inflight[d] = TSO_TOKEN + 1;
    txq.posted_len[d] = ~0u;
    publish(&txq, d);
    kick(&txq);
    int sent = tx_done(d);
    int after = tx_done(send_test_frame(0, 60));
    puts("R tso");
    put_kv("size", size);
    put_kv("mss", mss);
    put_kv("sent", (u64)sent);
    put_kv("after", (u64)after);
    putc('\n');
    return sent && after ? STATUS_OK : STATUS_FAIL;
}

int guest_main(void) {
    char mode[8] = "echo", irq[8] = "msix", bad_case[16] = "", tso_bad[16] = "";
    u64 count = 10, size = 60, timeout_s = 30, resend_ms = 0, mss = 0;
    header("net-probe");
    arg_str("mode", mode, sizeof(mode));
    arg_str("irq", irq, sizeof(irq));
    arg_str("case", bad_case, sizeof(bad_case));
    arg_u64("count", &count);
    arg_u64("size", &size);
    arg_u64("timeout_s", &timeout_s);
    arg_u64("resend_ms", &resend_ms);
    u64 pairs_arg = 1;
    arg_u64("pairs", &pairs_arg);
    arg_u64("event_idx", &want_event_idx);
    arg_u64("announce", &want_announce);
    arg_u64("mss", &mss);
    arg_str("bad", tso_bad, sizeof(tso_bad));
    int m_echo = streq(mode, "echo"), m_send = streq(mode, "send"), m_recv = streq(mode, "recv"),
        m_bad = streq(mode, "bad"), m_link = streq(mode, "link"), m_ping = streq(mode, "ping"), m_tso = streq(mode, "tso");
    if (!m_echo && !m_send && !m_recv && !m_bad && !m_link && !m_ping && !m_tso)
        fail(STATUS_BAD_ARGS, "mode must be echo, send, recv, ping, bad, link or tso");
    if (!streq(irq, "msix") && !streq(irq, "poll")) fail(STATUS_BAD_ARGS, "irq must be msix or poll");
    if ((m_send || m_ping) && (size < 60 || size > FRAME_MAX)) fail(STATUS_BAD_ARGS, "size must be 60..1514");
    if (!count && (m_send || m_recv || m_link || m_ping)) fail(STATUS_BAD_ARGS, "count=0 (forever) is for mode=echo and mode=bad");
    if (m_bad && !bad_case[0]) fail(STATUS_BAD_ARGS, "mode=bad needs case=NAME");
    if (!timeout_s || timeout_s > 3600) fail(STATUS_BAD_ARGS, "timeout_s must be 1..3600");
    if (want_event_idx > 1) fail(STATUS_BAD_ARGS, "event_idx must be 0 or 1");
    if (!pairs_arg || pairs_arg > MAXPAIRS) fail(STATUS_BAD_ARGS, "pairs must be 1..4");
    if (pairs_arg > 1 && !m_ping && !m_echo) fail(STATUS_BAD_ARGS, "pairs= is for mode=ping and mode=echo");
    if (want_announce > 1) fail(STATUS_BAD_ARGS, "announce must be 0 or 1");
    if (want_announce && !m_echo) fail(STATUS_BAD_ARGS, "announce=1 is for mode=echo");
    int tso_bad_case = !tso_bad[0] ? 0 : streq(tso_bad, "hdr_len") ? 1 : streq(tso_bad, "csum_start") ? 2 : -1;
    if (tso_bad_case < 0) fail(STATUS_BAD_ARGS, "bad must be hdr_len or csum_start");
    if (m_tso) {
        if (size < 60 || size > TSO_MAX) fail(STATUS_BAD_ARGS, "size must be 60..65549 for mode=tso");
        if (!mss || mss > 0xffff) fail(STATUS_BAD_ARGS, "mode=tso needs mss=1..65535");
        if (tso_bad_case && size + 100 > 0xffff) fail(STATUS_BAD_ARGS, "bad= needs size <= 65435 (the bad value must fit in 16 bits)");
    } else if (tso_bad_case || mss) {
        fail(STATUS_BAD_ARGS, "mss= and bad= are for mode=tso");
    }
    want_tso = m_tso;
    want_pairs = (u32)pairs_arg;
    timeout_cycles = tsc_khz() * 1000 * timeout_s;
    want_msix = irq[0] == 'm';
    if (m_link || want_announce) entry0_vector = CFG_VECTOR;

    if (!find_device(VENDOR_DEVICE)) fail(STATUS_FAIL, "no modern virtio-net device (1af4:1041) on PCI bus 0");
    read_bars();
    walk_caps();

    if (m_bad) return bad_mode(bad_case, count);
    init_device(BAD_NONE, 1);
    if ((m_send || m_ping) && size > (u64)mtu + 14) fail(STATUS_BAD_ARGS, "size is larger than the device's mtu + 14");
    if (m_echo) return echo(count);
    if (m_send) return send(count, size);
    if (m_link) return link(count);
    if (m_ping) return ping(count, size, resend_ms);
    if (m_tso) return tso(size, mss, tso_bad_case);
    return recv(count);
}

