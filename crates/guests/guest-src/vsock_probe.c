/* vsock-probe: a small virtio-vsock driver (virtio 1.2, 5.10) for the
 * modern virtio-pci transport (PCI 1af4:1053, device id 19), split
 * virtqueues rx 0, tx 1 and event 2; and a virtio-rng reader (mode=rng,
 * 5.4: PCI 1af4:1044, device id 4, requestq 0) that does not touch vsock.
 *
 * The transport (virtio_pci.c, shared with net-probe and blk-probe): the
 * device found on PCI bus 0, its BARs read as assigned, the virtio vendor
 * capabilities and MSI-X walked (R caps), then 3.1.1: reset, ACKNOWLEDGE,
 * DRIVER, features, FEATURES_OK (read back), the queues (R queue each),
 * MSI-X vectors (read back), buffers posted, DRIVER_OK, then the first
 * notify. Features accepted, when offered: VERSION_1 (32, required),
 * VIRTIO_VSOCK_F_STREAM (0; vsock only) and RING_EVENT_IDX (29) with
 * event_idx=1 only; never any other (SEQPACKET, bit 1, is not accepted).
 * MSI-X: configuration changes on entry 0, every queue on entry 1 (all on
 * entry 0 when the table has one entry), one interrupt vector; completions
 * are waited for with interrupts open, spinning, the used rings polled too
 * (irq=poll: no MSI-X at all). Every used id and length is checked by
 * next_used (a bad one fails the run: R ... then ERROR).
 *
 * vsock. Configuration: guest_cid, u64 le at offset 0, read between two
 * equal config_generation reads; it must be 3..0xfffffffe (the upper 32
 * bits are reserved, zero). Buffers: rx: min(32, queue size) buffers of one
 * device-writable descriptor each, 44 + 4096 bytes (header and payload);
 * each is re-posted as soon as its packet is handled. event: min(8, queue
 * size) device-writable 4-byte buffers. tx: min(32, queue size) slots of
 * one device-readable descriptor each (header and payload, payload <= 4096
 * bytes), a slot reused only after its used element came back (the tx used
 * length is not checked: some devices report the bytes they read).
 *
 * Packet: a 44-byte header, all little-endian: u64 src_cid, u64 dst_cid,
 * u32 src_port, u32 dst_port, u32 len, u16 type (STREAM 1), u16 op, u32
 * flags, u32 buf_alloc, u32 fwd_cnt; then len payload bytes. Ops: REQUEST 1,
 * RESPONSE 2, RST 3, SHUTDOWN 4 (flags bit 0 RCV: no more receiving, bit 1
 * SEND: no more sending), RW 5, CREDIT_UPDATE 6, CREDIT_REQUEST 7. The host
 * is CID 2. Every packet the guest sends: src_cid = guest_cid, dst_cid = 2,
 * type STREAM, buf_alloc = 262144 (256 KiB), fwd_cnt = the bytes this
 * connection's receiver consumed so far (mod 2^32).
 *
 * A received packet is bad (counted in bad_pkts=, ignored, the first 8
 * printed as R badpkt why=... used_len= [op= type= len= src_cid= dst_cid=
 * src_port= dst_port=]) when: the used length is under 44 (short), len is
 * more than the used length - 44 (len), type is not STREAM (type), src_cid
 * is not 2 (src_cid), dst_cid is not guest_cid (dst_cid), op is not 1..7
 * (op), a non-RW packet carries payload (payload), a REQUEST arrives on an
 * open connection (dup_request), a RESPONSE on a connection not waiting for
 * one (response), RW or SHUTDOWN before the RESPONSE (early), RW after the
 * host's SHUTDOWN with SEND (rw_after_shutdown). An event whose used length
 * is under 4 or whose id is not TRANSPORT_RESET (0) counts in bad_events=
 * (the first 8 printed as R badevent used_len= id=).
 *
 * Credit (5.10.6.3): the host's buf_alloc and fwd_cnt are taken from every
 * packet of the connection; a fwd_cnt that claims more bytes consumed than
 * were sent (or goes backwards) is not taken and counts in bad_credit=. The
 * guest sends at most buf_alloc - (tx_cnt - fwd_cnt) bytes beyond what the
 * host acknowledged (u32 arithmetic mod 2^32; 0 when the host's buf_alloc
 * shrank below what is in flight), except the first connection of
 * mode=overrun. Blocked by credit with bytes to send for 100 ms, it sends
 * CREDIT_REQUEST (again every 100 ms; credit_requests=). It answers the
 * host's CREDIT_REQUEST with CREDIT_UPDATE, and sends CREDIT_UPDATE when it
 * consumed 32 KiB or more since the fwd_cnt it last sent. Received bytes
 * beyond the guest's own buf_alloc (the host ignoring the guest's credit)
 * are dropped and counted in over_credit= (mode=echo, mode=reset).
 *
 * Connections: up to 32 at once, each found by (local port, host port).
 * A listening mode answers a REQUEST to port with RESPONSE, and a REQUEST
 * to another port (or with 32 connections open: refused_full=) with RST;
 * any other non-RST packet of no connection is answered with RST
 * (stray_rst=). When a connection ends it prints
 *   R conn local=<port> peer=<port> rx=<bytes received> tx=<bytes sent>
 *     end=closed|peer_rst|refused|transport_reset|gave_up [bad=<recv>]
 * closed: the guest sent RST after the close (listening modes: after the
 * host's SHUTDOWN and the flush; send: after its own SHUTDOWN and the
 * host's SHUTDOWN); peer_rst: the host sent RST (counted in resets= when
 * neither side had sent SHUTDOWN); refused: RST answered REQUEST;
 * transport_reset: dropped by a TRANSPORT_RESET event (no RST sent);
 * gave_up: the guest sent RST for another reason (echo/recv: the flush after
 * the host's SHUTDOWN was blocked by credit for 1 s, the bytes counted in
 * unflushed=; send: the host shut down RCV with bytes left to send;
 * overrun: no RST 1 s after the flood).
 *
 * Records, after the header, R caps and R queue (x3):
 *   R vsock cid=<guest_cid> features=<hex acked> event_idx=0|1 msix=0|1
 *     offered=<hex> queues=<num_queues> queue_size=<rx queue's> rx_bufs=
 *     tx_slots= event_bufs=
 *   R reset n=<k> cid=<guest_cid re-read>: each TRANSPORT_RESET event (every
 *     connection dropped without RST; pending RSTs forgotten). In mode=send
 *     and mode=overrun it ends the run (status 1). The event queue is served
 *     before the rx queue, and a packet whose dst_cid is not guest_cid makes
 *     the driver take the events first, then check it again (a new CID's
 *     packets may be seen before the event that announced it).
 *   COMMON below, in every result record of a vsock mode: bad_pkts=
 *     resets=<host RSTs on a connection before either side sent SHUTDOWN>
 *     bad_events= bad_credit= credit_requests=<CREDIT_REQUESTs sent>
 *     credit_updates_sent=<CREDIT_UPDATEs sent> irqs= kicks=
 *     kicks_suppressed=
 *
 * Modes (arguments key=value on the command line):
 *   mode=echo port=P (1234) conns=N (1; 0 = forever): listen on P; every
 *       byte received on a connection is sent back on it (a 256 KiB ring per
 *       connection, the guest's buf_alloc, consumed as it is echoed). On the
 *       host's SHUTDOWN (any flags) the guest sends what is left (within
 *       credit), then RST, and drops the connection. After N connections
 *       ended (any way but transport_reset):
 *       R echo conns=N bytes=<echoed by the ended connections> COMMON
 *         over_credit= unflushed= refused_full= stray_rst=
 *       status 0.
 *   mode=recv port=P bytes=B (65536) conns=N (1; 0 = forever): listen; each
 *       connection's first B bytes are checked against pattern(i), i the
 *       byte's offset in the connection; bytes beyond B are bad. When B
 *       bytes arrived, or at the host's SHUTDOWN if fewer did (the missing
 *       ones counted bad), the guest sends "GOOD\n" (no bad byte) or
 *       "BAD <n>\n" (n bad bytes, decimal) once; bytes arriving after that
 *       are bad too. At the host's SHUTDOWN (and the reply sent) it sends
 *       RST and drops the connection; a connection that ends before its
 *       reply counts its missing bytes bad. After N connections ended:
 *       R recv conns=N bytes=<received> bad=<bad bytes> COMMON
 *         over_credit= refused_full= stray_rst=
 *       status 0 if bad=0, else 3.
 *   mode=send port=P bytes=B (65536) conns=N (1, 1..32) expect_refused=0|1:
 *       connects to CID 2 port P N times at once, local ports 1024 + k
 *       (k = 0..N-1), sends B bytes of pattern(i) on each within the host's
 *       credit, then SHUTDOWN(SEND), and ends each connection at the host's
 *       RST or SHUTDOWN (answered with RST). R send conns=N bytes=<sent>
 *       refused=<RST answered REQUEST> complete=<connections that sent B
 *       bytes, shut down and were answered> COMMON stray_rst=
 *       status 0 if complete=N and refused=0; with expect_refused=1,
 *       status 0 if refused=N.
 *   mode=overrun port=P: connection 1 (local port 1024): after the RESPONSE
 *       sends 4096-byte RW packets of pattern(i) ignoring the host's credit
 *       until 4 x the host's buf_alloc in the RESPONSE (at least 16 KiB) is
 *       out, stopping early at the host's RST (reset=1); without an RST 1 s
 *       after the last one completed, it sends RST itself (reset=0).
 *       Connection 2 (local port 1025): within credit, 4096 bytes of
 *       pattern(i), SHUTDOWN(RCV|SEND), ended by the host's RST or
 *       SHUTDOWN: after_ok=1 if it got its RESPONSE, sent all and no RST
 *       came before its SHUTDOWN was out.
 *       R overrun reset=0|1 after_ok=0|1 sent=<connection 1's bytes>
 *         limit=<4 x buf_alloc> host_buf_alloc= refused=<connection 1
 *         answered RST> COMMON
 *       status 0 if reset=1 and after_ok=1.
 *   mode=reset port=P resets=K (1) after=M (1): listens and echoes as
 *       mode=echo (connections unlimited), and after the K-th TRANSPORT_RESET
 *       event waits for M more connections to end (any way but
 *       transport_reset): R reset_done resets=K after_conns=M bytes=<echoed
 *       by those> COMMON over_credit= conns=<all ended>, status 0. (A packet still in the rx queue from before a reset
 *       that changed guest_cid counts as bad: dst_cid.)
 *   mode=rng bytes=N (4096) chunk=C (512, 1..4096): posts min(16, queue
 *       size) device-writable buffers of C bytes (each zeroed first), takes
 *       each used one (its length checked <= C), re-posts it, until N bytes
 *       came back.
 *       R rngdev features=<hex acked> offered=<hex> event_idx= msix=
 *         queue_size= bufs=
 *       R rng bytes=<got> requests=<used elements> zero_buffers=<non-empty
 *         buffers that came back all zero> distinct=<distinct byte values
 *         seen> empty=<used length 0> short=<0 < used length < C> irqs=
 *         polled=
 *       status 0 if got >= N and (N < 4096 or distinct >= 200); 3 if the
 *       bytes are too uniform; 1 after 1000 empty buffers.
 * Common: timeout_s=30: the longest the guest waits with nothing happening
 * on any queue (mode=rng: for the next buffer) before it prints R stall
 * queue=... (each queue's ring state) and fails; mode=echo conns=0 waits
 * without limit while no connection is open. irq=msix|poll, event_idx=0|1
 * (as net-probe: used_event written, avail_event honoured).
 *
 * pattern(i), byte i (0, 1, ...) of a connection's stream:
 *   (i * 31 + 7 + (i >> 8)) & 0xff
 * (checked and written 8 bytes at a time: for i a multiple of 8, bytes
 * i..i+7 are (pattern(i) + 31 k) & 0xff, k = 0..7).
 *
 * Status: 0 ok, 1 no device / device error / timeout / a check failed,
 * 2 bad parameters, 3 bad data (recv, rng). */
#include "virtio_pci.h"

#define VSOCK_ID 0x10531af4u
#define RNG_ID 0x10441af4u
#define VSOCK_VECTOR 0x54

#define F_STREAM 0
#define BIT(n) (1UL << (n))

#define HOST_CID 2
#define TYPE_STREAM 1
enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
#define SHUT_RCV 1
#define SHUT_SEND 2
#define EVENT_TRANSPORT_RESET 0

#define HDR 44
#define PAYLOAD 4096
#define BUF_OFF 4 /* the header at +4: the payload 8-byte aligned */
#define BUF_STRIDE 4160
#define RX_LEN (HDR + PAYLOAD)
#define NRX_MAX 32
#define NTX_MAX 32
#define NEV_MAX 8
#define MAXCONN 32
#define BUF_ALLOC (256u << 10) /* the guest's receive buffer per connection */
#define CREDIT_STEP (32u << 10)
#define NSTRAY 64
#define FIRST_LOCAL_PORT 1024
#define MAX_BADPKT_PRINTS 8

struct pkt_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct pkt_hdr) == HDR, "the vsock packet header is 44 bytes");

/* the same, unpacked, as read */
struct hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
};

typedef u64 ua64 __attribute__((aligned(1), may_alias)); /* an unaligned word */

/* ------------------------------------------------------------ state --- */
static struct vq rxq, txq, evq;
static u8 rxbuf[NRX_MAX][BUF_STRIDE] __attribute__((aligned(64)));
static u8 txbuf[NTX_MAX][BUF_STRIDE] __attribute__((aligned(64)));
static volatile u32 evbuf[NEV_MAX];
static u32 nrx, ntx, nev;
static u16 tx_free[NTX_MAX];
static u32 ntx_free;
static u64 guest_cid, offered;
static u64 timeout_cycles, want_event_idx, ms;
static int want_msix, irq_ready;

enum { M_ECHO, M_RECV, M_SEND, M_OVERRUN, M_RESET, M_RNG };
static int mode;
static int listening;
static u32 listen_port;
static u64 conns_arg, bytes_arg;

enum { C_FREE, C_CONNECTING, C_OPEN };
enum { K_ECHO, K_RECV, K_SEND, K_FLOOD };
enum { END_CLOSED, END_PEER_RST, END_REFUSED, END_TRANSPORT, END_GAVE_UP };
static const char *const end_names[] = {"closed", "peer_rst", "refused", "transport_reset", "gave_up"};

struct conn {
    u64 st, kind;
    u64 lport, pport;
    u64 peer_buf_alloc, peer_fwd_cnt; /* u32 values */
    u64 tx_total;  /* payload bytes sent (the u32 tx_cnt is its low half) */
    u64 rx_total;  /* payload bytes received and accepted */
    u64 fwd_total; /* payload bytes consumed (echo: the ring's read end) */
    u64 fwd_sent;  /* the fwd_cnt last sent (u32) */
    u64 peer_shut; /* SHUTDOWN flags from the host */
    u64 req_sent, want_resp, want_credit, want_creq, want_rst, end_why;
    u64 shut_flags, shut_sent;
    u64 stuck_since, stuck_first; /* blocked by credit with bytes to send */
    u64 idle_since;               /* K_FLOOD: all out, tx queue idle */
    u64 want;                     /* K_SEND, K_FLOOD: bytes to send; K_RECV: to receive */
    u64 bad;                      /* K_RECV: bad bytes */
    u64 reply_queued, reply_len, reply_off;
    u8 reply[24];
    u8 *ring; /* K_ECHO: BUF_ALLOC bytes */
};
_Static_assert(sizeof(struct conn) % 8 == 0, "struct conn is cleared a word at a time");
static struct conn conns[MAXCONN];
static u8 echo_ring[MAXCONN][BUF_ALLOC] __attribute__((aligned(4096)));

static struct {
    u32 lport, pport;
} stray[NSTRAY];
static u32 stray_head, stray_n;

/* counters */
static u64 bad_pkts, bad_events, bad_credit, over_credit, unflushed, resets_unexpected, refused_full, stray_rst,
    stray_dropped, credit_requests, credit_updates, transport_resets;
static u64 ended, echoed, received, sent_bytes, total_bad, refused, complete;
static u64 ended_at_reset, echoed_at_reset, resets_wanted;
/* mode=overrun, connection 1 */
static u64 flood_reset, flood_refused, flood_sent, flood_limit, flood_peer_ba;

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

static void zero_words(void *p, u64 bytes) {
    u64 *w = (u64 *)p;
    for (u64 i = 0; i < bytes / 8; i++) w[i] = 0;
}

static void copy(u8 *d, const u8 *s, u32 n) {
    u32 j = 0;
    for (; j + 8 <= n; j += 8) *(ua64 *)(d + j) = *(const ua64 *)(s + j);
    for (; j < n; j++) d[j] = s[j];
}

/* --------------------------------------------------------- pattern --- */
static u64 pat_word[256]; /* pat_word[b]: byte k = (b + 31 k) & 0xff */

static void pattern_init(void) {
    for (u32 b = 0; b < 256; b++) {
        u64 w = 0;
        for (u32 k = 0; k < 8; k++) w |= (u64)((b + 31 * k) & 0xff) << (8 * k);
        pat_word[b] = w;
    }
}

static inline u8 pat_byte(u64 i) { return (u8)(i * 31 + 7 + (i >> 8)); }

/* The bytes of p[0..n) that differ from pattern(pos..pos+n). */
static u64 pattern_bad(const u8 *p, u64 pos, u32 n) {
    u64 bad = 0;
    u32 j = 0;
    for (; j < n && ((pos + j) & 7); j++) bad += p[j] != pat_byte(pos + j);
    for (; j + 8 <= n; j += 8) {
        u64 x = *(const ua64 *)(p + j) ^ pat_word[pat_byte(pos + j)];
        if (x)
            for (u32 k = 0; k < 8; k++) bad += ((x >> (8 * k)) & 0xff) != 0;
    }
    for (; j < n; j++) bad += p[j] != pat_byte(pos + j);
    return bad;
}

static void pattern_fill(u8 *p, u64 pos, u32 n) {
    u32 j = 0;
    for (; j < n && ((pos + j) & 7); j++) p[j] = pat_byte(pos + j);
    for (; j + 8 <= n; j += 8) *(ua64 *)(p + j) = pat_word[pat_byte(pos + j)];
    for (; j < n; j++) p[j] = pat_byte(pos + j);
}

/* ------------------------------------------------------- the device --- */
/* guest_cid between two equal config_generation reads, checked */
static u64 read_cid(void) {
    for (int tries = 0;; tries++) {
        if (tries == 100) device_fail("config_generation never settles");
        u8 gen = mr8(common.addr + C_GENERATION);
        u64 cid = mr32(devcfg.addr) | (u64)mr32(devcfg.addr + 4) << 32;
        if (mr8(common.addr + C_GENERATION) != gen) continue;
        if (cid < 3 || cid > 0xfffffffeUL) {
            puts("R badcid");
            puts(" cid=");
            put_hex(cid);
            putc('\n');
            device_fail("guest_cid is not a guest CID (3..0xfffffffe)");
        }
        return cid;
    }
}

/* Interrupts (once) and MSI-X: entry 0 configuration, entry 1 the queues
 * (0 with a one-entry table). The queue vector to use, NO_VECTOR to poll. */
static u16 setup_msix(void) {
    if (!irq_ready) {
        idt_init();
        idt_set(VSOCK_VECTOR, ext_stub);
        lapic_enable();
        irq_ready = 1;
    }
    if (!want_msix || !msix_table) return NO_VECTOR;
    u32 n = msix_entries < 2 ? 1 : 2;
    msix_enable(n, VSOCK_VECTOR, VSOCK_VECTOR);
    mw16(common.addr + C_MSIX, 0);
    if (mr16(common.addr + C_MSIX) != 0) return NO_VECTOR;
    return (u16)(n - 1);
}

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
    put_kv("irqs", irqs);
    putc('\n');
}

static void __attribute__((noreturn)) stall(const char *msg) {
    put_queue_state(&rxq, "rx");
    put_queue_state(&txq, "tx");
    put_queue_state(&evq, "event");
    u64 open = 0;
    for (u32 i = 0; i < MAXCONN; i++) open += conns[i].st != C_FREE;
    puts("R stall conns_open=");
    put_u64(open);
    put_kv("ended", ended);
    put_kv("device_status", get_status());
    putc('\n');
    device_fail(msg);
}

/* ------------------------------------------------------------ rings --- */
static void post_rx(u32 i) {
    set_desc(&rxq, (u16)i, (u64)(rxbuf[i] + BUF_OFF), RX_LEN, VIRTQ_DESC_F_WRITE, 0);
    rxq.inflight[i] = (int)i + 1;
    rxq.posted_len[i] = RX_LEN;
    publish(&rxq, (u16)i);
}

static void post_ev(u32 i) {
    evbuf[i] = 0xffffffffu;
    set_desc(&evq, (u16)i, (u64)&evbuf[i], 4, VIRTQ_DESC_F_WRITE, 0);
    evq.inflight[i] = (int)i + 1;
    evq.posted_len[i] = 4;
    publish(&evq, (u16)i);
}

static u8 *tx_payload(u32 s) { return txbuf[s] + BUF_OFF + HDR; }

/* A free tx slot (the caller checked ntx_free). */
static u32 tx_take(void) {
    if (!ntx_free) fail(STATUS_FAIL, "no free tx slot (a driver bug)");
    return tx_free[--ntx_free];
}

/* Slot s's packet (its payload already in place) made available; pump()
 * notifies. */
static void tx_packet(u32 s, u32 lport, u32 pport, u16 op, u32 flags, u32 len, u32 fwd) {
    struct pkt_hdr *h = (struct pkt_hdr *)(txbuf[s] + BUF_OFF);
    h->src_cid = guest_cid;
    h->dst_cid = HOST_CID;
    h->src_port = lport;
    h->dst_port = pport;
    h->len = len;
    h->type = TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = BUF_ALLOC;
    h->fwd_cnt = fwd;
    set_desc(&txq, (u16)s, (u64)h, HDR + len, 0, 0);
    txq.inflight[s] = (int)s + 1;
    txq.posted_len[s] = ~0u; /* device-readable: the used length is not checked */
    publish(&txq, (u16)s);
}

static int tx_busy(void) { return ntx_free != ntx; }

static int reap_tx(void) {
    u16 d;
    u32 tok, len;
    int n = 0;
    while (next_used(&txq, &d, &tok, &len)) {
        if (tok != d || tok >= ntx) device_fail("tx used element of no slot in flight");
        tx_free[ntx_free++] = (u16)tok;
        n++;
    }
    return n;
}

static int any_used(void) {
    return used_idx(&rxq) != rxq.last_used || used_idx(&txq) != txq.last_used || used_idx(&evq) != evq.last_used;
}

/* Up to cycles for an interrupt or a used element on any queue. */
static void wait_any(u64 cycles) {
    want_next_interrupt(&rxq);
    want_next_interrupt(&txq);
    want_next_interrupt(&evq);
    u64 t0 = rdtsc(), seen = irqs;
    __asm__ volatile("sti" ::: "memory");
    while (irqs == seen && !any_used() && rdtsc() - t0 < cycles) cpu_relax();
    __asm__ volatile("cli" ::: "memory");
}

/* ------------------------------------------------------ connections --- */
static u32 credit(const struct conn *c) {
    u32 inflight = (u32)c->tx_total - (u32)c->peer_fwd_cnt;
    u32 ba = (u32)c->peer_buf_alloc;
    return inflight >= ba ? 0 : ba - inflight;
}

/* Bytes this connection has ready to send. */
static u64 out_pending(const struct conn *c) {
    switch (c->kind) {
    case K_ECHO: return c->rx_total - c->fwd_total;
    case K_RECV: return c->reply_queued ? c->reply_len - c->reply_off : 0;
    default: return c->shut_sent || c->tx_total >= c->want ? 0 : c->want - c->tx_total;
    }
}

static struct conn *conn_alloc(u64 kind, u32 lport, u32 pport) {
    for (u32 i = 0; i < MAXCONN; i++) {
        struct conn *c = &conns[i];
        if (c->st != C_FREE) continue;
        zero_words(c, sizeof(*c));
        c->kind = kind;
        c->lport = lport;
        c->pport = pport;
        c->ring = echo_ring[i];
        return c;
    }
    return 0;
}

static struct conn *lookup(u32 lport, u32 pport) {
    for (u32 i = 0; i < MAXCONN; i++)
        if (conns[i].st != C_FREE && conns[i].lport == lport && conns[i].pport == pport) return &conns[i];
    return 0;
}

static u64 open_conns(void) {
    u64 n = 0;
    for (u32 i = 0; i < MAXCONN; i++) n += conns[i].st != C_FREE;
    return n;
}

/* The connection is gone: its accounting, R conn, the slot freed. */
static void conn_end(struct conn *c, u64 why) {
    if (why == END_PEER_RST && !c->peer_shut && !c->shut_sent && c->kind != K_FLOOD) resets_unexpected++;
    if (c->kind == K_RECV && !c->reply_queued && c->rx_total < c->want) c->bad += c->want - c->rx_total;
    if (why != END_TRANSPORT) ended++;
    switch (c->kind) {
    case K_ECHO: echoed += c->tx_total; break;
    case K_RECV: total_bad += c->bad; break;
    case K_SEND:
        sent_bytes += c->tx_total;
        if (why == END_REFUSED) refused++;
        else if (c->tx_total == c->want && c->shut_sent && (why == END_CLOSED || why == END_PEER_RST)) complete++;
        break;
    case K_FLOOD:
        flood_sent = c->tx_total;
        flood_reset = why == END_PEER_RST;
        flood_refused = why == END_REFUSED;
        break;
    }
    puts("R conn");
    put_kv("local", c->lport);
    put_kv("peer", c->pport);
    put_kv("rx", c->rx_total);
    put_kv("tx", c->tx_total);
    puts(" end=");
    puts(end_names[why]);
    if (c->kind == K_RECV) put_kv("bad", c->bad);
    putc('\n');
    c->st = C_FREE;
}

static void queue_reply(struct conn *c) {
    if (c->reply_queued) return;
    if (c->rx_total < c->want) c->bad += c->want - c->rx_total; /* missing */
    u8 *r = c->reply;
    u32 n = 0;
    if (!c->bad) {
        const char *g = "GOOD\n";
        while (*g) r[n++] = (u8)*g++;
    } else {
        char digits[21];
        int i = 20;
        u64 v = c->bad;
        do {
            digits[--i] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        r[n++] = 'B';
        r[n++] = 'A';
        r[n++] = 'D';
        r[n++] = ' ';
        while (i < 20) r[n++] = (u8)digits[i++];
        r[n++] = '\n';
    }
    c->reply_len = n;
    c->reply_off = 0;
    c->reply_queued = 1;
}

/* Received payload for an open connection. */
static void deliver(struct conn *c, const u8 *data, u32 n) {
    received += n;
    if (c->kind == K_ECHO) {
        u32 room = BUF_ALLOC - (u32)(c->rx_total - c->fwd_total);
        if (n > room) {
            over_credit += n - room;
            n = room;
        }
        u32 at = (u32)c->rx_total & (BUF_ALLOC - 1), first = BUF_ALLOC - at < n ? BUF_ALLOC - at : n;
        copy(c->ring + at, data, first);
        copy(c->ring, data + first, n - first);
        c->rx_total += n;
        return;
    }
    if (c->kind == K_RECV) {
        if (c->reply_queued) {
            c->bad += n; /* after the verdict */
        } else {
            u64 left = c->want > c->rx_total ? c->want - c->rx_total : 0;
            u32 k = left < n ? (u32)left : n;
            c->bad += pattern_bad(data, c->rx_total, k) + (n - k);
        }
    }
    /* consumed at once (recv, send, overrun) */
    c->rx_total += n;
    c->fwd_total += n;
    if (c->kind == K_RECV && c->rx_total >= c->want) queue_reply(c);
}

static void stray_push(u32 lport, u32 pport) {
    if (stray_n == NSTRAY) {
        stray_dropped++;
        return;
    }
    stray[(stray_head + stray_n) % NSTRAY].lport = lport;
    stray[(stray_head + stray_n) % NSTRAY].pport = pport;
    stray_n++;
}

static void bad_packet(const char *why, const struct hdr *h, u32 used_len) {
    bad_pkts++;
    if (bad_pkts > MAX_BADPKT_PRINTS) return;
    puts("R badpkt why=");
    puts(why);
    put_kv("used_len", used_len);
    if (h) {
        put_kv("op", h->op);
        put_kv("type", h->type);
        put_kv("len", h->len);
        put_kv("src_cid", h->src_cid);
        put_kv("dst_cid", h->dst_cid);
        put_kv("src_port", h->src_port);
        put_kv("dst_port", h->dst_port);
    }
    putc('\n');
}

/* The host's credit fields, from any packet of the connection. */
static void take_credit(struct conn *c, const struct hdr *h) {
    u32 out = (u32)c->tx_total - (u32)c->peer_fwd_cnt;
    u32 adv = h->fwd_cnt - (u32)c->peer_fwd_cnt;
    if (adv > out) {
        bad_credit++;
        if (bad_credit <= MAX_BADPKT_PRINTS) {
            puts("R badcredit");
            put_kv("local", c->lport);
            put_kv("fwd_cnt", h->fwd_cnt);
            put_kv("was", c->peer_fwd_cnt);
            put_kv("tx_cnt", (u32)c->tx_total);
            putc('\n');
        }
    } else {
        c->peer_fwd_cnt = h->fwd_cnt;
    }
    c->peer_buf_alloc = h->buf_alloc;
}

/* A packet of no connection. */
static void no_conn(const struct hdr *h) {
    if (h->op == OP_RST) return; /* never answer an RST */
    if (h->op == OP_REQUEST && listening && h->dst_port == listen_port) {
        struct conn *c = conn_alloc(mode == M_RECV ? K_RECV : K_ECHO, h->dst_port, h->src_port);
        if (c) {
            c->st = C_OPEN;
            c->want = bytes_arg;
            take_credit(c, h);
            c->want_resp = 1;
            if (c->kind == K_RECV && !c->want) queue_reply(c);
            return;
        }
        refused_full++;
    } else {
        stray_rst++;
    }
    stray_push(h->dst_port, h->src_port);
}

static int reap_events(void);

static void rx_packet(const u8 *b, u32 used_len) {
    if (used_len < HDR) {
        bad_packet("short", 0, used_len);
        return;
    }
    const struct pkt_hdr *p = (const struct pkt_hdr *)b;
    struct hdr h;
    h.src_cid = p->src_cid;
    h.dst_cid = p->dst_cid;
    h.src_port = p->src_port;
    h.dst_port = p->dst_port;
    h.len = p->len;
    h.type = p->type;
    h.op = p->op;
    h.flags = p->flags;
    h.buf_alloc = p->buf_alloc;
    h.fwd_cnt = p->fwd_cnt;
    /* a device that changed guest_cid said so on the event queue, maybe
     * just after this packet's rx buffer was seen: the event first */
    if (h.dst_cid != guest_cid && used_idx(&evq) != evq.last_used) reap_events();
    const char *why = 0;
    if (h.len > used_len - HDR) why = "len";
    else if (h.type != TYPE_STREAM) why = "type";
    else if (h.src_cid != HOST_CID) why = "src_cid";
    else if (h.dst_cid != guest_cid) why = "dst_cid";
    else if (h.op < OP_REQUEST || h.op > OP_CREDIT_REQUEST) why = "op";
    else if (h.op != OP_RW && h.len) why = "payload";
    if (why) {
        bad_packet(why, &h, used_len);
        return;
    }
    struct conn *c = lookup(h.dst_port, h.src_port);
    if (!c) {
        no_conn(&h);
        return;
    }
    /* a REQUEST on an open connection, or a packet before the RESPONSE
     * other than RESPONSE / RST, says nothing about credit */
    if (h.op == OP_REQUEST) {
        bad_packet("dup_request", &h, used_len);
        return;
    }
    if (c->st == C_CONNECTING && h.op != OP_RESPONSE && h.op != OP_RST) {
        bad_packet("early", &h, used_len);
        return;
    }
    take_credit(c, &h);
    switch (h.op) {
    case OP_RESPONSE:
        if (c->st != C_CONNECTING || !c->req_sent) {
            bad_packet("response", &h, used_len);
            break;
        }
        c->st = C_OPEN;
        if (c->kind == K_FLOOD) {
            flood_peer_ba = h.buf_alloc;
            c->want = 4 * (u64)h.buf_alloc;
            if (c->want < 16384) c->want = 16384;
            flood_limit = c->want;
        }
        break;
    case OP_RST: conn_end(c, c->st == C_CONNECTING ? END_REFUSED : END_PEER_RST); break;
    case OP_SHUTDOWN:
        c->peer_shut |= h.flags & (SHUT_RCV | SHUT_SEND);
        if (c->kind == K_RECV && (h.flags & (SHUT_RCV | SHUT_SEND))) queue_reply(c);
        break;
    case OP_RW:
        if (c->peer_shut & SHUT_SEND) bad_packet("rw_after_shutdown", &h, used_len);
        else deliver(c, b + HDR, h.len);
        break;
    case OP_CREDIT_UPDATE: break;
    case OP_CREDIT_REQUEST: c->want_credit = 1; break;
    }
}

static int reap_rx(void) {
    u16 d;
    u32 tok, len;
    int n = 0;
    while ((u32)n < nrx && next_used(&rxq, &d, &tok, &len)) {
        if (tok != d || tok >= nrx) device_fail("rx used element of no posted buffer");
        rx_packet(rxbuf[tok] + BUF_OFF, len);
        post_rx(tok);
        n++;
    }
    if (n) kick(&rxq);
    return n;
}

/* TRANSPORT_RESET: every connection gone (no RST), guest_cid re-read. */
static void transport_reset(void) {
    transport_resets++;
    for (u32 i = 0; i < MAXCONN; i++)
        if (conns[i].st != C_FREE) conn_end(&conns[i], END_TRANSPORT);
    stray_n = 0;
    guest_cid = read_cid();
    puts("R reset");
    put_kv("n", transport_resets);
    put_kv("cid", guest_cid);
    putc('\n');
    if (mode == M_SEND || mode == M_OVERRUN) fail(STATUS_FAIL, "transport reset: the connections are gone");
    if (mode == M_RESET && transport_resets == resets_wanted) {
        ended_at_reset = ended;
        echoed_at_reset = echoed;
    }
}

static int reap_events(void) {
    u16 d;
    u32 tok, len;
    int n = 0;
    while (next_used(&evq, &d, &tok, &len)) {
        if (tok != d || tok >= nev) device_fail("event used element of no posted buffer");
        u32 id = evbuf[tok];
        if (len < 4 || id != EVENT_TRANSPORT_RESET) {
            if (++bad_events <= MAX_BADPKT_PRINTS) {
                puts("R badevent");
                put_kv("used_len", len);
                put_kv("id", id);
                putc('\n');
            }
        } else {
            transport_reset();
        }
        post_ev(tok);
        n++;
    }
    if (n) kick(&evq);
    return n;
}

/* One control packet (no payload) on slot s of connection c. */
static void conn_tx(struct conn *c, u32 s, u16 op, u32 flags, u32 len) {
    tx_packet(s, (u32)c->lport, (u32)c->pport, op, flags, len, (u32)c->fwd_total);
    c->fwd_sent = (u32)c->fwd_total;
}

static int send_rst(struct conn *c) {
    conn_tx(c, tx_take(), OP_RST, 0, 0);
    conn_end(c, c->end_why);
    return 1;
}

/* The next packet connection c has to send, sent (a tx slot is free): 1,
 * or 0 if it has none now. */
static int conn_step(struct conn *c) {
    if (c->want_rst) return send_rst(c);
    if (c->st == C_CONNECTING) {
        if (c->req_sent) return 0;
        conn_tx(c, tx_take(), OP_REQUEST, 0, 0);
        c->req_sent = 1;
        return 1;
    }
    if (c->want_resp) {
        conn_tx(c, tx_take(), OP_RESPONSE, 0, 0);
        c->want_resp = 0;
        return 1;
    }
    if (c->kind == K_SEND && !c->shut_sent && (c->peer_shut & SHUT_RCV) && out_pending(c)) {
        c->end_why = END_GAVE_UP; /* the host takes no more */
        return send_rst(c);
    }
    u64 pend = out_pending(c);
    if (pend) {
        u32 cr = c->kind == K_FLOOD ? PAYLOAD : credit(c);
        if (cr) {
            u32 k = pend < cr ? (u32)pend : cr;
            if (k > PAYLOAD) k = PAYLOAD;
            u32 s = tx_take();
            u8 *p = tx_payload(s);
            if (c->kind == K_ECHO) {
                u32 at = (u32)c->fwd_total & (BUF_ALLOC - 1), first = BUF_ALLOC - at < k ? BUF_ALLOC - at : k;
                copy(p, c->ring + at, first);
                copy(p + first, c->ring, k - first);
                c->fwd_total += k; /* consumed: the fwd_cnt in this packet counts it */
            } else if (c->kind == K_RECV) {
                copy(p, c->reply + c->reply_off, k);
                c->reply_off += k;
            } else {
                pattern_fill(p, c->tx_total, k);
            }
            c->tx_total += k;
            conn_tx(c, s, OP_RW, 0, k);
            return 1;
        }
    }
    if (c->want_credit || (u32)c->fwd_total - (u32)c->fwd_sent >= CREDIT_STEP) {
        conn_tx(c, tx_take(), OP_CREDIT_UPDATE, 0, 0);
        c->want_credit = 0;
        credit_updates++;
        return 1;
    }
    if (c->want_creq) {
        conn_tx(c, tx_take(), OP_CREDIT_REQUEST, 0, 0);
        c->want_creq = 0;
        return 1;
    }
    if ((c->kind == K_ECHO || c->kind == K_RECV) && c->peer_shut && !out_pending(c)) {
        c->end_why = END_CLOSED; /* flushed after the host's SHUTDOWN */
        return send_rst(c);
    }
    if (c->kind == K_SEND) {
        if (!c->shut_sent && c->tx_total >= c->want) {
            conn_tx(c, tx_take(), OP_SHUTDOWN, (u32)c->shut_flags, 0);
            c->shut_sent = 1;
            return 1;
        }
        if (c->shut_sent && c->peer_shut) {
            c->end_why = END_CLOSED; /* the host answered our SHUTDOWN */
            return send_rst(c);
        }
    }
    return 0;
}

/* Credit stalls (CREDIT_REQUEST every 100 ms; a listening connection's
 * flush after the host's SHUTDOWN given up after 1 s) and the flood's end. */
static void conn_timers(struct conn *c, u64 now) {
    if (c->st != C_OPEN || c->want_rst) return;
    if (c->kind == K_FLOOD) {
        if (c->tx_total < c->want || tx_busy()) {
            c->idle_since = 0;
        } else if (!c->idle_since) {
            c->idle_since = now;
        } else if (now - c->idle_since > 1000 * ms) {
            c->end_why = END_GAVE_UP; /* no RST came */
            c->want_rst = 1;
        }
        return;
    }
    if (!out_pending(c) || credit(c)) {
        c->stuck_since = c->stuck_first = 0;
        return;
    }
    if (!c->stuck_first) {
        c->stuck_since = c->stuck_first = now;
        return;
    }
    if (now - c->stuck_since >= 100 * ms) {
        c->want_creq = 1;
        credit_requests++;
        c->stuck_since = now;
    }
    if (c->peer_shut && (c->kind == K_ECHO || c->kind == K_RECV) && now - c->stuck_first >= 1000 * ms) {
        unflushed += out_pending(c);
        if (c->kind == K_ECHO) c->fwd_total = c->rx_total;
        else c->reply_off = c->reply_len;
        c->end_why = END_GAVE_UP;
        c->want_rst = 1;
    }
}

static u32 rr; /* round robin */

/* Sends what is pending while tx slots are free: RSTs of no connection
 * first, then one packet per connection per pass. */
static void pump(void) {
    int sent = 0;
    while (stray_n && ntx_free) {
        u32 s = tx_take();
        tx_packet(s, stray[stray_head].lport, stray[stray_head].pport, OP_RST, 0, 0, 0);
        stray_head = (stray_head + 1) % NSTRAY;
        stray_n--;
        sent = 1;
    }
    while (ntx_free) {
        int any = 0;
        for (u32 k = 0; k < MAXCONN && ntx_free; k++) {
            struct conn *c = &conns[(rr + k) % MAXCONN];
            if (c->st != C_FREE && conn_step(c)) any = sent = 1;
        }
        if (!any) break;
    }
    rr++;
    if (sent) kick(&txq);
}

/* Everything that came back handled, timers run, what is pending sent:
 * whether any queue had a used element. */
static int service(void) {
    int prog = reap_tx();
    prog |= reap_events(); /* a TRANSPORT_RESET before the packets after it */
    prog |= reap_rx();
    u64 now = rdtsc();
    for (u32 i = 0; i < MAXCONN; i++)
        if (conns[i].st != C_FREE) conn_timers(&conns[i], now);
    pump();
    return prog;
}

/* mode=echo conns=0 with nothing open waits without limit */
static int idle_forever(void) { return mode == M_ECHO && !conns_arg && !open_conns() && !tx_busy(); }

static void run_until(int (*done)(void)) {
    u64 last = rdtsc();
    for (;;) {
        if (service()) last = rdtsc();
        if (done()) return;
        if (any_used()) continue;
        u64 now = rdtsc();
        if (now - last > timeout_cycles) {
            if (!idle_forever()) stall("timeout: nothing happened on any queue for timeout_s");
            last = now;
        }
        wait_any(10 * ms);
    }
}

static int tx_drained(void) { return !tx_busy() && !stray_n; }
static int no_conns(void) { return !open_conns(); }
static int n_ended(void) { return conns_arg && ended >= conns_arg; }
static int reset_done(void) { return transport_resets >= resets_wanted && ended - ended_at_reset >= conns_arg; }

/* The run's end: no new connections, every packet sent completed. */
static void finish(void) {
    listening = 0;
    run_until(tx_drained);
}

static struct conn *conn_connect(u64 kind, u32 lport, u32 pport, u64 bytes, u32 shut_flags) {
    struct conn *c = conn_alloc(kind, lport, pport);
    if (!c) fail(STATUS_FAIL, "no free connection (a driver bug)");
    c->st = C_CONNECTING;
    c->want = bytes;
    c->shut_flags = shut_flags;
    return c;
}

static void put_common(void) {
    put_kv("bad_pkts", bad_pkts);
    put_kv("resets", resets_unexpected);
    put_kv("bad_events", bad_events);
    put_kv("bad_credit", bad_credit);
}

static void put_irqs(void) {
    put_kv("credit_requests", credit_requests);
    put_kv("credit_updates_sent", credit_updates);
    put_kv("irqs", irqs);
    put_kv("kicks", notifies);
    put_kv("kicks_suppressed", suppressed);
}

/* ------------------------------------------------------------ modes --- */
static int echo_mode(void) {
    listening = 1;
    run_until(n_ended);
    finish();
    puts("R echo");
    put_kv("conns", ended);
    put_kv("bytes", echoed);
    put_common();
    put_kv("over_credit", over_credit);
    put_kv("unflushed", unflushed);
    put_kv("refused_full", refused_full);
    put_kv("stray_rst", stray_rst);
    put_irqs();
    putc('\n');
    return STATUS_OK;
}

static int recv_mode(void) {
    listening = 1;
    run_until(n_ended);
    finish();
    puts("R recv");
    put_kv("conns", ended);
    put_kv("bytes", received);
    put_kv("bad", total_bad);
    put_common();
    put_kv("over_credit", over_credit);
    put_kv("refused_full", refused_full);
    put_kv("stray_rst", stray_rst);
    put_irqs();
    putc('\n');
    return total_bad ? STATUS_CORRUPT : STATUS_OK;
}

static int send_mode(int expect_refused) {
    for (u32 k = 0; k < conns_arg; k++) conn_connect(K_SEND, FIRST_LOCAL_PORT + k, listen_port, bytes_arg, SHUT_SEND);
    run_until(no_conns);
    finish();
    puts("R send");
    put_kv("conns", conns_arg);
    put_kv("bytes", sent_bytes);
    put_kv("refused", refused);
    put_kv("complete", complete);
    put_common();
    put_kv("stray_rst", stray_rst);
    put_irqs();
    putc('\n');
    if (expect_refused) return refused == conns_arg ? STATUS_OK : STATUS_FAIL;
    return complete == conns_arg && !refused ? STATUS_OK : STATUS_FAIL;
}

static int overrun_mode(void) {
    conn_connect(K_FLOOD, FIRST_LOCAL_PORT, listen_port, 0, 0);
    run_until(no_conns);
    conn_connect(K_SEND, FIRST_LOCAL_PORT + 1, listen_port, 4096, SHUT_RCV | SHUT_SEND);
    run_until(no_conns);
    finish();
    u64 after_ok = complete == 1;
    puts("R overrun");
    put_kv("reset", flood_reset);
    put_kv("after_ok", after_ok);
    put_kv("sent", flood_sent);
    put_kv("limit", flood_limit);
    put_kv("host_buf_alloc", flood_peer_ba);
    put_kv("refused", flood_refused);
    put_common();
    put_irqs();
    putc('\n');
    return flood_reset && after_ok ? STATUS_OK : STATUS_FAIL;
}

static int reset_mode(void) {
    listening = 1;
    run_until(reset_done);
    finish();
    puts("R reset_done");
    put_kv("resets", transport_resets);
    put_kv("after_conns", ended - ended_at_reset);
    put_kv("bytes", echoed - echoed_at_reset);
    put_common();
    put_kv("over_credit", over_credit);
    put_kv("conns", ended);
    put_irqs();
    putc('\n');
    return STATUS_OK;
}

/* 3.1.1 from reset to DRIVER_OK with the three queues, buffers posted. */
static void vsock_init(void) {
    if (!find_device(VSOCK_ID)) fail(STATUS_FAIL, "no modern virtio-vsock device (1af4:1053) on PCI bus 0");
    read_bars();
    walk_caps();
    offered = begin_init();
    features = offered & (BIT(F_VERSION_1) | BIT(F_STREAM) | (want_event_idx ? BIT(F_EVENT_IDX) : 0));
    event_idx = (features & BIT(F_EVENT_IDX)) != 0;
    if (!write_features(features)) device_fail("FEATURES_OK did not read back: features refused");
    u16 nq = mr16(common.addr + C_NUMQ);
    if (nq < 3) device_fail("fewer than 3 queues (rx, tx, event)");
    if (!devcfg.found || devcfg.len < 8) device_fail("device configuration missing or too short for guest_cid");
    guest_cid = read_cid();

    u16 vec = setup_msix();
    u16 g0 = vq_setup(&rxq, 0, vec, 0, 0);
    u16 g1 = vq_setup(&txq, 1, vec, 0, 0);
    u16 g2 = vq_setup(&evq, 2, vec, 0, 0);
    msix_on = vec != NO_VECTOR && g0 == vec && g1 == vec && g2 == vec;

    nrx = rxq.size < NRX_MAX ? rxq.size : NRX_MAX;
    ntx = txq.size < NTX_MAX ? txq.size : NTX_MAX;
    nev = evq.size < NEV_MAX ? evq.size : NEV_MAX;
    for (u32 i = 0; i < nrx; i++) post_rx(i);
    for (u32 i = 0; i < nev; i++) post_ev(i);
    ntx_free = 0;
    for (u32 i = ntx; i > 0; i--) tx_free[ntx_free++] = (u16)(i - 1);
    for (u32 i = 0; i < MAXCONN; i++) conns[i].st = C_FREE;

    set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (get_status() & (S_NEEDS_RESET | S_FAILED)) device_fail("the device needs a reset after DRIVER_OK");
    kick(&rxq);
    kick(&evq);

    puts("R vsock");
    put_kv("cid", guest_cid);
    puts(" features=");
    put_hex(features);
    put_kv("event_idx", (u64)event_idx);
    put_kv("msix", (u64)msix_on);
    puts(" offered=");
    put_hex(offered);
    put_kv("queues", nq);
    put_kv("queue_size", rxq.size);
    put_kv("rx_bufs", nrx);
    put_kv("tx_slots", ntx);
    put_kv("event_bufs", nev);
    putc('\n');
}

/* --------------------------------------------------------- mode=rng --- */
#define RNG_BUFS 16
#define RNG_MAXCHUNK 4096
static struct vq rngq;
static u8 rngbuf[RNG_BUFS][RNG_MAXCHUNK] __attribute__((aligned(64)));

static void post_rng(u32 i, u32 chunk) {
    zero_words(rngbuf[i], (chunk + 7) & ~7u);
    set_desc(&rngq, (u16)i, (u64)rngbuf[i], chunk, VIRTQ_DESC_F_WRITE, 0);
    rngq.inflight[i] = (int)i + 1;
    rngq.posted_len[i] = chunk;
    publish(&rngq, (u16)i);
}

static int rng_mode(u64 want, u32 chunk) {
    if (!find_device(RNG_ID)) fail(STATUS_FAIL, "no modern virtio-rng device (1af4:1044) on PCI bus 0");
    read_bars();
    walk_caps();
    offered = begin_init();
    features = offered & (BIT(F_VERSION_1) | (want_event_idx ? BIT(F_EVENT_IDX) : 0));
    event_idx = (features & BIT(F_EVENT_IDX)) != 0;
    if (!write_features(features)) device_fail("FEATURES_OK did not read back: features refused");
    if (mr16(common.addr + C_NUMQ) < 1) device_fail("no queue");
    u16 vec = setup_msix();
    u16 got_vec = vq_setup(&rngq, 0, vec, 0, 0);
    msix_on = vec != NO_VECTOR && got_vec == vec;
    u32 nb = rngq.size < RNG_BUFS ? rngq.size : RNG_BUFS;
    for (u32 i = 0; i < nb; i++) post_rng(i, chunk);
    set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (get_status() & (S_NEEDS_RESET | S_FAILED)) device_fail("the device needs a reset after DRIVER_OK");
    kick(&rngq);
    puts("R rngdev features=");
    put_hex(features);
    puts(" offered=");
    put_hex(offered);
    put_kv("event_idx", (u64)event_idx);
    put_kv("msix", (u64)msix_on);
    put_kv("queue_size", rngq.size);
    put_kv("bufs", nb);
    putc('\n');

    static u8 seen[256];
    u64 got = 0, requests = 0, zero_bufs = 0, empty = 0, short_len = 0;
    while (got < want) {
        u16 d;
        u32 tok, len;
        if (!next_used(&rngq, &d, &tok, &len)) {
            if (!wait_used(&rngq, timeout_cycles)) {
                put_queue_state(&rngq, "rng");
                device_fail("timeout: no entropy buffer came back");
            }
            continue;
        }
        if (tok != d || tok >= nb) device_fail("used element of no posted buffer");
        requests++;
        const u8 *p = rngbuf[tok];
        if (!len) {
            if (++empty >= 1000) fail(STATUS_FAIL, "1000 buffers came back empty");
        } else {
            if (len < chunk) short_len++;
            u64 any = 0;
            u32 j = 0;
            for (; j + 8 <= len; j += 8) any |= *(const u64 *)(p + j);
            for (; j < len; j++) any |= p[j];
            zero_bufs += !any;
            for (j = 0; j < len; j++) seen[p[j]] = 1;
            got += len;
        }
        if (got < want) {
            post_rng(tok, chunk);
            kick(&rngq);
        }
    }
    u64 distinct = 0;
    for (u32 i = 0; i < 256; i++) distinct += seen[i];
    puts("R rng");
    put_kv("bytes", got);
    put_kv("requests", requests);
    put_kv("zero_buffers", zero_bufs);
    put_kv("distinct", distinct);
    put_kv("empty", empty);
    put_kv("short", short_len);
    put_kv("irqs", irqs);
    put_kv("polled", polled);
    putc('\n');
    if (want >= 4096 && distinct < 200) return STATUS_CORRUPT;
    return STATUS_OK;
}

/* ------------------------------------------------------------ main --- */
int guest_main(void) {
    char mode_s[12] = "echo", irq[8] = "msix";
    u64 port = 1234, conns_n = 1, bytes = 65536, expect_refused = 0, resets = 1, after = 1, timeout_s = 30,
        chunk = 512;
    header("vsock-probe");
    arg_str("mode", mode_s, sizeof(mode_s));
    arg_str("irq", irq, sizeof(irq));
    arg_u64("port", &port);
    arg_u64("conns", &conns_n);
    int has_bytes = arg_u64("bytes", &bytes);
    arg_u64("expect_refused", &expect_refused);
    arg_u64("resets", &resets);
    arg_u64("after", &after);
    arg_u64("timeout_s", &timeout_s);
    arg_u64("event_idx", &want_event_idx);
    arg_u64("chunk", &chunk);
    if (streq(mode_s, "echo")) mode = M_ECHO;
    else if (streq(mode_s, "recv")) mode = M_RECV;
    else if (streq(mode_s, "send")) mode = M_SEND;
    else if (streq(mode_s, "overrun")) mode = M_OVERRUN;
    else if (streq(mode_s, "reset")) mode = M_RESET;
    else if (streq(mode_s, "rng")) mode = M_RNG;
    else fail(STATUS_BAD_ARGS, "mode must be echo, recv, send, overrun, reset or rng");
    if (!streq(irq, "msix") && !streq(irq, "poll")) fail(STATUS_BAD_ARGS, "irq must be msix or poll");
    if (!timeout_s || timeout_s > 3600) fail(STATUS_BAD_ARGS, "timeout_s must be 1..3600");
    if (want_event_idx > 1) fail(STATUS_BAD_ARGS, "event_idx must be 0 or 1");
    if (port > 0xffffffffUL) fail(STATUS_BAD_ARGS, "port must fit in 32 bits");
    if (expect_refused > 1) fail(STATUS_BAD_ARGS, "expect_refused must be 0 or 1");
    if (mode == M_SEND && (!conns_n || conns_n > MAXCONN)) fail(STATUS_BAD_ARGS, "mode=send: conns must be 1..32");
    if (mode == M_RESET && !resets) fail(STATUS_BAD_ARGS, "resets must be at least 1");
    if (mode == M_RNG && (!chunk || chunk > RNG_MAXCHUNK)) fail(STATUS_BAD_ARGS, "chunk must be 1..4096");
    timeout_cycles = tsc_khz() * 1000 * timeout_s;
    ms = tsc_khz();
    want_msix = irq[0] == 'm';
    listen_port = (u32)port;
    conns_arg = mode == M_RESET ? after : conns_n;
    bytes_arg = bytes;
    resets_wanted = resets;

    if (mode == M_RNG) return rng_mode(has_bytes ? bytes : 4096, (u32)chunk);
    pattern_init();
    vsock_init();
    switch (mode) {
    case M_ECHO: return echo_mode();
    case M_RECV: return recv_mode();
    case M_SEND: return send_mode((int)expect_refused);
    case M_OVERRUN: return overrun_mode();
    default: return reset_mode();
    }
}
