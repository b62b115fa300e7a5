//! `nfvisor switch` against a hostile frontend of the test's own (the
//! `vhost` crate's frontend over rings it writes by hand in a memfd it
//! shares): transmit chains that point outside its memory, that the
//! switch would have to write, that never end; receive buffers outside its
//! memory or not writable. Each connection that hands one over is cut
//! off, counted and logged (once a port); the port takes the next
//! frontend, and the other ports forward all the while (DPDK's testpmd on
//! two of them, its counters and the switch's agreeing). Malformed
//! vhost-user messages are tests/switch.rs's.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use bench::vhost_frontend::{
    avail, buf, desc_table, used, F_PROTOCOL_FEATURES, F_VERSION_1, MEM, QSIZE, RX, TX,
};
use common::*;

const T: Duration = Duration::from_secs(30);

/// The switch tests' lock: testpmd's hugepages, and the CPUs a polling
/// switch takes.
static SERIAL: Mutex<()> = Mutex::new(());

/// VHOST_F_LOG_ALL: the frontend migrates; the backend logs its writes.
const F_LOG_ALL: u64 = 1 << 26;
/// The dirty log's page: one bit for each (guest-physical).
const PAGE: u64 = 4096;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// The virtio-net header before each frame (VERSION_1).
const HDR: usize = 12;
/// A guest-physical address far outside the frontend's memory.
const NOWHERE: u64 = 0x4000_0000_0000;
/// What the switch logs when it cuts a frontend off.
const CUT: &str = "its frontend is cut off";

/// A 60-byte Ethernet frame (`seq` in its payload), virtio-net header
/// first.
fn frame(dst: [u8; 6], src: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(HDR + 60, 0xa5);
    f
}

/// A memfd mapped shared here: the frontend's memory, which the switch
/// maps too.
struct Memfd {
    file: File,
    ptr: *mut u8,
    len: usize,
}

impl Memfd {
    fn new() -> Memfd {
        Memfd::sized(c"nfv-hostile", MEM)
    }

    /// A memfd of `len` bytes (a multiple of the page size), mapped.
    fn sized(name: &std::ffi::CStr, len: usize) -> Memfd {
        let (file, ptr) =
            bench::vhost_frontend::shared_memfd(name, len).unwrap_or_else(|e| panic!("{e}"));
        Memfd { file, ptr, len }
    }

    /// Where this process maps guest-physical `gpa`.
    fn host(&self, gpa: u64) -> u64 {
        assert!(gpa < self.len as u64);
        self.ptr as u64 + gpa
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(
            gpa as usize + bytes.len() <= self.len,
            "{gpa:#x} is not ours"
        );
        // SAFETY: the destination lies inside the mapping (checked above),
        // which lives as long as self; the switch reads it only once the
        // available index published it.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len())
        };
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= self.len, "{gpa:#x} is not ours");
        (0..len)
            // SAFETY: each byte lies inside the mapping (checked above);
            // volatile, as the other process writes there.
            .map(|i| unsafe { self.ptr.add(gpa as usize + i).read_volatile() })
            .collect()
    }

    /// The ring index at `gpa` (the available or used ring's `idx`).
    fn index(&self, gpa: u64) -> &AtomicU16 {
        assert!(gpa as usize + 2 <= self.len && gpa.is_multiple_of(2));
        // SAFETY: the u16 lies inside the mapping and is aligned (checked
        // above); the mapping lives as long as the reference's self; both
        // processes access it only atomically.
        unsafe { AtomicU16::from_ptr(self.ptr.add(gpa as usize) as *mut u16) }
    }
}

impl Drop for Memfd {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, which nothing uses after this.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// A vhost-user frontend of the test's own, with both rings set up and
/// enabled, every request answered (REPLY_ACK): the driver whose rings
/// the test writes descriptor by descriptor.
struct Guest {
    frontend: Frontend,
    /// The connection itself (the frontend's socket), to see it end.
    watch: UnixStream,
    mem: Memfd,
    kick: [EventFd; 2],
    _call: [EventFd; 2],
    /// Chains posted on each ring.
    posted: [u16; 2],
}

impl Guest {
    fn connect(sock: &Path) -> Guest {
        Guest::connect_with(sock, VhostUserProtocolFeatures::empty())
    }

    /// A frontend that also negotiates the protocol features `extra`
    /// (each of which the switch must offer).
    fn connect_with(sock: &Path, extra: VhostUserProtocolFeatures) -> Guest {
        let what = sock.display();
        let stream = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{what}: {e}"));
        let watch = stream.try_clone().unwrap();
        let mut fe = Frontend::from_stream(stream, 2);
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        let wanted = F_VERSION_1 | F_PROTOCOL_FEATURES;
        assert_eq!(offered & wanted, wanted, "features {offered:#x}");
        let protocol = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let protocol_wanted = VhostUserProtocolFeatures::REPLY_ACK | extra;
        assert!(
            protocol.contains(protocol_wanted),
            "protocol features {protocol:?}"
        );
        fe.set_protocol_features(protocol_wanted)
            .expect("SET_PROTOCOL_FEATURES");
        // every request from here on is answered once the switch did it
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(wanted).expect("SET_FEATURES");
        let mem = Memfd::new();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: mem.host(0),
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        }])
        .expect("SET_MEM_TABLE");
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = [eventfd(), eventfd()];
        let call = [eventfd(), eventfd()];
        for q in [RX, TX] {
            fe.set_vring_num(q, QSIZE).expect("SET_VRING_NUM");
            // (the ring addresses are the frontend's own, as QEMU's are)
            let config = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: mem.host(desc_table(q)),
                used_ring_addr: mem.host(used(q)),
                avail_ring_addr: mem.host(avail(q)),
                log_addr: None,
            };
            fe.set_vring_addr(q, &config).expect("SET_VRING_ADDR");
            fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
            fe.set_vring_call(q, &call[q]).expect("SET_VRING_CALL");
            fe.set_vring_kick(q, &kick[q]).expect("SET_VRING_KICK");
        }
        for q in [RX, TX] {
            fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
        }
        watch
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        Guest {
            frontend: fe,
            watch,
            mem,
            kick,
            _call: call,
            posted: [0; 2],
        }
    }

    /// The descriptor slot the next chain posted on ring `q` takes.
    fn next_slot(&self, q: usize) -> u16 {
        self.posted[q] % QSIZE
    }

    /// Posts chains of one descriptor each (address, length, flags, next)
    /// on ring `q`, all at once: one store of the available index, one
    /// kick. Chain i takes descriptor slot `next_slot(q) + i`.
    fn post(&mut self, q: usize, chains: &[(u64, u32, u16, u16)]) {
        let mut idx = self.posted[q];
        let busy = idx.wrapping_sub(self.used(q)) as usize;
        assert!(busy + chains.len() <= QSIZE as usize, "ring {q} is full");
        for &(addr, len, flags, next) in chains {
            let slot = idx % QSIZE;
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write(desc_table(q) + 16 * slot as u64, &d);
            self.mem
                .write(avail(q) + 4 + 2 * slot as u64, &slot.to_le_bytes());
            idx = idx.wrapping_add(1);
        }
        self.mem.index(avail(q) + 2).store(idx, Ordering::Release);
        self.posted[q] = idx;
        self.kick[q].write(1).unwrap();
    }

    /// A frame (header first) sent on the transmit ring.
    fn send(&mut self, f: &[u8]) {
        let slot = self.next_slot(TX);
        self.mem.write(buf(TX, slot), f);
        self.post(TX, &[(buf(TX, slot), f.len() as u32, 0, 0)]);
    }

    /// The used ring's index.
    fn used(&self, q: usize) -> u16 {
        self.mem.index(used(q) + 2).load(Ordering::Acquire)
    }

    /// Used entry `n` of ring `q`: (head, length written).
    fn used_entry(&self, q: usize, n: u16) -> (u32, u32) {
        let e = self.mem.read(used(q) + 4 + 8 * (n % QSIZE) as u64, 8);
        (
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
        )
    }

    /// Waits (10 s at most) until the switch used `n` chains of ring `q`.
    fn wait_used(&self, q: usize, n: u16, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used(q) != n {
            assert!(
                Instant::now() < deadline,
                "{what}: the switch used {} of ring {q}'s chains, not {n}",
                self.used(q)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits (10 s at most) until the switch maps both rings (and polls
    /// them): it sets NO_NOTIFY in each used ring's flags. Then 50 ms more,
    /// for the other PMDs, which map them in their next round.
    fn wait_polled(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let flags = |q: usize| self.mem.index(used(q)).load(Ordering::Acquire);
        while flags(RX) != 1 || flags(TX) != 1 {
            assert!(
                Instant::now() < deadline,
                "{what}: the switch did not map the rings within 10 s (used flags {} and {})",
                flags(RX),
                flags(TX)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Waits (10 s at most) for the switch to end the connection: the
    /// socket reads its end (or an error); the next request fails.
    fn wait_cut(mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut byte = [0u8; 1];
        loop {
            match self.watch.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => panic!("{what}: the switch sent a message no request asked for"),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    assert!(
                        Instant::now() < deadline,
                        "{what}: the switch did not cut the frontend off within 10 s"
                    );
                }
                Err(_) => break,
            }
        }
        assert!(
            self.frontend.get_features().is_err(),
            "{what}: a request answered after the connection was cut"
        );
    }
}

/// `nfvisor switch` on `ports` in `dir`, with a control socket; serving.
fn switch(dir: &Path, ports: &str) -> (Running, PathBuf) {
    let ctl = dir.join("ctl.sock");
    let mut s = Running::start(&[
        "switch",
        "--socket-dir",
        dir.to_str().unwrap(),
        "--ports",
        ports,
        "--control-socket",
        ctl.to_str().unwrap(),
        "--json",
    ]);
    s.wait_for("ports, serving");
    (s, ctl)
}

/// The switch's counters now (its control socket).
fn stats(ctl: &Path) -> serde_json::Value {
    switch::control::request(ctl, &switch::control::Request::Stats)
        .unwrap_or_else(|e| panic!("stats: {e}"))
}

fn counter(doc: &serde_json::Value, port: &str, name: &str) -> u64 {
    doc["ports"][port][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {port}.{name}: {doc}"))
}

/// Waits (20 s at most) until the switch's counters pass `ok`.
fn wait_stats(ctl: &Path, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let doc = stats(ctl);
        if ok(&doc) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}, within 20 s: {doc}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The log's cut-off lines: those of port `port`, and all of them.
fn cut_lines(log: &str, port: &str) -> (Vec<String>, usize) {
    let all: Vec<&str> = log.lines().filter(|l| l.contains(CUT)).collect();
    let mine = all
        .iter()
        .filter(|l| l.contains(&format!("port {port}:")))
        .map(|l| l.to_string())
        .collect();
    (mine, all.len())
}

/// testpmd forwards between ports a and b (MAC mode, each the other's
/// peer) while a frontend of the test's own on port `bad` hands over bad
/// transmit chains: first two at once (a buffer far outside its memory,
/// a write-only buffer), then, on a new connection, a chain that never
/// ends (its descriptor its own next). Each connection is cut off (its
/// socket reads its end), counted once, logged once for the port; the
/// port then takes a well-behaved frontend whose frames it takes; and a
/// and b forward all the while, testpmd's counters and the switch's
/// agreeing.
#[test]
fn bad_transmit_chains_cut_the_frontend_off_while_the_other_ports_forward() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-hostile-tx");
    let (sw, ctl) = switch(&dir, "a,b,bad");
    let tp = bench::testpmd::Testpmd::virtio_user_mac_loop(
        &dir,
        "nfv-switch-hostile",
        &dir.join("a.sock"),
        &dir.join("b.sock"),
        false,
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    tp.wait_forwarding().unwrap_or_else(|e| panic!("{e}"));
    let both = |doc: &serde_json::Value| {
        (
            counter(doc, "a", "rx_frames"),
            counter(doc, "b", "rx_frames"),
        )
    };
    wait_stats(&ctl, "a and b forward before the hostile frontend", |d| {
        let (a, b) = both(d);
        a > 1000 && b > 1000
    });
    let bad = dir.join("bad.sock");

    // two bad chains at once: one burst, one cut
    let mut g = Guest::connect(&bad);
    g.post(
        TX,
        &[(NOWHERE, 64, 0, 0), (buf(TX, 1), 64, DESC_F_WRITE, 0)],
    );
    g.wait_used(TX, 2, "a buffer outside memory, a write-only one");
    g.wait_cut("a buffer outside memory, a write-only one");
    // (counted before the cut)
    let doc = stats(&ctl);
    assert_eq!(counter(&doc, "bad", "cut_off"), 1, "{doc}");
    assert_eq!(counter(&doc, "bad", "drop_bad_chain"), 2, "{doc}");

    // the port takes the next frontend; a chain that loops cuts it too
    let mut g = Guest::connect(&bad);
    let slot = g.next_slot(TX);
    g.post(TX, &[(buf(TX, slot), 16, DESC_F_NEXT, slot)]);
    g.wait_used(TX, 1, "a chain that loops");
    g.wait_cut("a chain that loops");
    let doc = stats(&ctl);
    assert_eq!(counter(&doc, "bad", "cut_off"), 2, "{doc}");
    assert_eq!(counter(&doc, "bad", "drop_bad_chain"), 3, "{doc}");
    assert_eq!(counter(&doc, "bad", "connects"), 2, "{doc}");

    // a and b forward on
    let (a0, b0) = both(&doc);
    wait_stats(&ctl, "a and b forward after the cuts", |d| {
        let (a, b) = both(d);
        a > a0 + 1000 && b > b0 + 1000
    });

    // a well-behaved frontend on the port after all: its frames (to its
    // own address: they go nowhere) are taken, and it keeps its connection
    let mut g = Guest::connect(&bad);
    let me = [0x02, 0, 0, 0, 0, 0x0c];
    for seq in 0..10 {
        g.send(&frame(me, me, seq));
    }
    g.wait_used(TX, 10, "a well-behaved frontend");
    g.frontend
        .get_features()
        .expect("the well-behaved frontend keeps its connection");
    drop(g);

    let log = tp.log();
    let pmd = tp.finish_ports(2).unwrap_or_else(|e| panic!("{e}\n{log}"));
    let (doc, stderr) = stop_switch(sw);
    let port = |p: &str, k: &str| counter(&doc, p, k);
    assert_eq!(port("bad", "cut_off"), 2, "{doc}");
    assert_eq!(port("bad", "drop_bad_chain"), 3, "{doc}");
    assert_eq!(port("bad", "connects"), 3, "{doc}");
    assert_eq!(port("bad", "rx_frames"), 10, "{doc}");
    let fdb = doc["fdb"].as_array().unwrap();
    assert!(
        fdb.iter()
            .any(|e| e["mac"] == "02:00:00:00:00:0c" && e["port"] == "bad"),
        "{doc}"
    );
    for p in ["a", "b"] {
        assert_eq!(port(p, "cut_off"), 0, "{doc}");
        assert_eq!(port(p, "drop_bad_chain"), 0, "{doc}");
        assert_eq!(port(p, "connects"), 1, "{doc}");
    }
    // each side counts what the other counts, but for the bursts in the
    // rings when testpmd stopped (at most two of 32 either way)
    for (i, p) in ["a", "b"].iter().enumerate() {
        let (received, sent) = pmd[i];
        let (put, taken) = (port(p, "tx_frames"), port(p, "rx_frames"));
        assert!(
            received <= put && put - received <= 64,
            "port {p}: the switch put {put} frames there, testpmd received {received}\n{doc}"
        );
        assert!(
            taken <= sent && sent - taken <= 64,
            "port {p}: testpmd sent {sent}, the switch took {taken}\n{doc}"
        );
        assert!(received > 2000, "frames loop for seconds: {pmd:?}");
    }
    // two cuts, one warning
    let (mine, all) = cut_lines(&stderr, "bad");
    assert_eq!(mine.len(), 1, "the cut-off is logged once:\n{stderr}");
    assert_eq!(all, 1, "only port bad was cut off:\n{stderr}");
    assert!(
        mine[0].contains("WARN") && mine[0].contains("transmit chain"),
        "{}",
        mine[0]
    );
}

/// A frontend of the test's own on port `bad` posts a receive buffer far
/// outside its memory, then (a new connection) one the switch may not
/// write; another frontend's broadcast frames reach each, and each
/// connection is cut off, counted, the port's warning logged once. Then a
/// well-behaved frontend on the port receives the frame intact.
#[test]
fn bad_receive_buffers_cut_the_frontend_off() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-hostile-rx");
    let (sw, ctl) = switch(&dir, "src,bad");
    let mut src = Guest::connect(&dir.join("src.sock"));
    let bad = dir.join("bad.sock");
    let from = [0x02, 0, 0, 0, 0, 0x01];
    let mut seq = 0;
    // broadcast frames from port src (one each 20 ms: the first ones may
    // go before the switch polls port bad's rings) until port bad's
    // receive ring used `n` chains
    let mut feed = |g: &Guest, n: u16, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            src.send(&frame([0xff; 6], from, seq));
            seq += 1;
            let until = Instant::now() + Duration::from_millis(20);
            while Instant::now() < until {
                if g.used(RX) == n {
                    return seq;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no frame reached port bad's receive ring within 10 s"
            );
        }
    };

    let g = {
        let mut g = Guest::connect(&bad);
        g.post(RX, &[(NOWHERE, 2048, DESC_F_WRITE, 0)]);
        g
    };
    feed(&g, 1, "a receive buffer outside memory");
    assert_eq!(g.used_entry(RX, 0), (0, 0));
    g.wait_cut("a receive buffer outside memory");
    // (the drop is counted once the burst is delivered, after the cut)
    wait_stats(&ctl, "one cut, one bad buffer", |d| {
        counter(d, "bad", "cut_off") == 1 && counter(d, "bad", "drop_bad_buffer") == 1
    });

    let g = {
        let mut g = Guest::connect(&bad);
        g.post(RX, &[(buf(RX, 0), 2048, 0, 0)]);
        g
    };
    feed(&g, 1, "a receive buffer not writable");
    assert_eq!(g.used_entry(RX, 0), (0, 0));
    g.wait_cut("a receive buffer not writable");
    wait_stats(&ctl, "two cuts, two bad buffers", |d| {
        counter(d, "bad", "cut_off") == 2 && counter(d, "bad", "drop_bad_buffer") == 2
    });

    // a well-behaved frontend on the port: the frame arrives intact
    let g = {
        let mut g = Guest::connect(&bad);
        g.post(RX, &[(buf(RX, 0), 2048, DESC_F_WRITE, 0)]);
        g
    };
    let sent = feed(&g, 1, "a well-behaved frontend");
    let len = HDR + 60;
    assert_eq!(g.used_entry(RX, 0), (0, len as u32));
    let got = g.mem.read(buf(RX, 0), len);
    // (one of the frames sent: the last may have gone after it)
    let s = u32::from_le_bytes(got[HDR + 14..HDR + 18].try_into().unwrap());
    assert!(s < sent, "frame {s} was never sent");
    assert_eq!(
        got[HDR..],
        frame([0xff; 6], from, s)[HDR..],
        "frame {s} differs"
    );
    // (no offloads; num_buffers 1)
    assert_eq!(got[..HDR], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    g.frontend
        .get_features()
        .expect("the well-behaved frontend keeps its connection");
    // every frame port src sent was taken
    let sent = src.posted[TX];
    assert_eq!(sent as u32, seq);
    src.wait_used(TX, sent, "port src's frames");
    drop(g);

    let (doc, stderr) = stop_switch(sw);
    let port = |p: &str, k: &str| counter(&doc, p, k);
    assert_eq!(port("bad", "cut_off"), 2, "{doc}");
    assert_eq!(port("bad", "drop_bad_buffer"), 2, "{doc}");
    assert_eq!(port("bad", "connects"), 3, "{doc}");
    assert_eq!(port("bad", "tx_frames"), 1, "{doc}");
    assert_eq!(port("src", "rx_frames"), sent as u64, "{doc}");
    assert_eq!(port("src", "cut_off"), 0, "{doc}");
    assert_eq!(port("src", "connects"), 1, "{doc}");
    let (mine, all) = cut_lines(&stderr, "bad");
    assert_eq!(mine.len(), 1, "the cut-off is logged once:\n{stderr}");
    assert_eq!(all, 1, "only port bad was cut off:\n{stderr}");
    assert!(
        mine[0].contains("WARN") && mine[0].contains("receive buffer"),
        "{}",
        mine[0]
    );
}

/// The pages whose bits are set in a dirty log over the frontend's
/// memory (bit p of byte p / 8: guest-physical page p).
fn dirty_pages(log: &Memfd) -> Vec<u64> {
    let bytes = log.read(0, MEM / PAGE as usize / 8);
    (0..MEM as u64 / PAGE)
        .filter(|&p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

/// The pages the bytes `at..at + len` lie on.
fn pages(at: u64, len: usize) -> std::ops::RangeInclusive<u64> {
    at / PAGE..=(at + len as u64 - 1) / PAGE
}

/// A migrating frontend of the test's own on port `logged` (LOG_SHMFD,
/// VHOST_F_LOG_ALL) hands its dirty log over once the switch polls its
/// rings; port src's broadcast frames then land in its receive buffers
/// (on pages 100 to 104, one across a page boundary), and the log has
/// the bits of exactly the pages the switch wrote: those buffers' and the
/// used ring's (not the descriptor table's, the available ring's, the
/// transmit ring's or a posted buffer still unfilled). The frames arrive
/// intact. The frontend clears its log (a migration round) and the next
/// frame's pages are logged again. A new connection without a log on the
/// port receives frames too, and the old log stays clear.
#[test]
fn a_frontend_s_dirty_log_gets_the_pages_the_switch_writes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-hostile-log");
    let (sw, ctl) = switch(&dir, "src,logged");
    let mut src = Guest::connect(&dir.join("src.sock"));
    let from = [0x02, 0, 0, 0, 0, 0x01];
    let len = HDR + 60;
    // a delivered frame: (no offloads; num_buffers 1) then the frame
    let delivered = |seq: u32| {
        let mut f = frame([0xff; 6], from, seq);
        f[..HDR].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        f
    };
    let sock = dir.join("logged.sock");
    let mut g = Guest::connect_with(&sock, VhostUserProtocolFeatures::LOG_SHMFD);
    let offered = g.frontend.get_features().expect("GET_FEATURES");
    assert_ne!(offered & F_LOG_ALL, 0, "features {offered:#x}: no LOG_ALL");
    // receive buffers: pages 100, 101 (its second half), 102, one across
    // pages 103 and 104, and one on page 110 no frame reaches at first
    let bufs = [
        100 * PAGE,
        101 * PAGE + 0x800,
        102 * PAGE,
        104 * PAGE - 32,
        110 * PAGE,
    ];
    let chains: Vec<_> = bufs.iter().map(|&a| (a, 2048, DESC_F_WRITE, 0)).collect();
    g.post(RX, &chains);
    g.wait_polled("port logged");

    // the migration starts: the log (a bit a page of the 2 MiB: 64
    // bytes, a page of memfd), then LOG_ALL (QEMU's order)
    let log = Memfd::sized(c"nfv-dirty-log", PAGE as usize);
    g.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: PAGE,
                mmap_offset: 0,
                mmap_handle: log.file.as_raw_fd(),
            }),
        )
        .expect("SET_LOG_BASE");
    g.frontend
        .set_features(F_VERSION_1 | F_PROTOCOL_FEATURES | F_LOG_ALL)
        .expect("SET_FEATURES with LOG_ALL");
    assert_eq!(
        dirty_pages(&log),
        [0u64; 0],
        "pages logged before any frame"
    );

    for seq in 0..4 {
        src.send(&frame([0xff; 6], from, seq));
    }
    g.wait_used(RX, 4, "four frames to port logged");
    src.wait_used(TX, 4, "port src's frames");
    wait_stats(&ctl, "four frames to port logged", |d| {
        counter(d, "logged", "tx_frames") == 4
    });
    for (i, &at) in bufs[..4].iter().enumerate() {
        assert_eq!(g.used_entry(RX, i as u16), (i as u32, len as u32));
        assert_eq!(
            g.mem.read(at, len),
            delivered(i as u32),
            "frame {i} at {at:#x}"
        );
    }
    assert_eq!(g.mem.read(bufs[4], len), vec![0; len], "a buffer unfilled");
    let used_page = used(RX) / PAGE;
    let mut want: Vec<u64> = bufs[..4].iter().flat_map(|&a| pages(a, len)).collect();
    want.push(used_page);
    want.sort();
    assert_eq!(want, [2, 100, 101, 102, 103, 104]);
    let got = dirty_pages(&log);
    assert_eq!(
        got,
        want,
        "the pages logged (the descriptor table's is {}, the available ring's {}, the transmit \
         ring's {}..={})",
        desc_table(RX) / PAGE,
        avail(RX) / PAGE,
        desc_table(TX) / PAGE,
        used(TX) / PAGE
    );

    // a migration round: the frontend clears its log (nothing in flight);
    // the next frame's pages (the buffer on page 110, the used ring) are
    // logged again
    log.write(0, &vec![0; MEM / PAGE as usize / 8]);
    src.send(&frame([0xff; 6], from, 4));
    g.wait_used(RX, 5, "a fifth frame to port logged");
    assert_eq!(g.used_entry(RX, 4), (4, len as u32));
    assert_eq!(g.mem.read(bufs[4], len), delivered(4), "frame 4");
    assert_eq!(
        dirty_pages(&log),
        [used_page, 110],
        "the pages logged again"
    );
    g.frontend
        .get_features()
        .expect("the migrating frontend keeps its connection");

    // the migration done, the frontend goes; the next one on the port
    // hands no log over: it receives frames, and the old log stays clear
    drop(g);
    log.write(0, &vec![0; MEM / PAGE as usize / 8]);
    let mut g = Guest::connect(&sock);
    g.post(RX, &[(bufs[0], 2048, DESC_F_WRITE, 0)]);
    g.wait_polled("port logged, a frontend without a log");
    src.send(&frame([0xff; 6], from, 5));
    g.wait_used(RX, 1, "a frame to a frontend without a log");
    assert_eq!(g.used_entry(RX, 0), (0, len as u32));
    assert_eq!(g.mem.read(bufs[0], len), delivered(5), "frame 5");
    src.wait_used(TX, 6, "port src's frames");
    assert_eq!(dirty_pages(&log), [0u64; 0], "the old log written to");
    g.frontend
        .get_features()
        .expect("the frontend without a log keeps its connection");
    drop(g);

    let (doc, _) = stop_switch(sw);
    let port = |p: &str, k: &str| counter(&doc, p, k);
    assert_eq!(port("logged", "tx_frames"), 6, "{doc}");
    assert_eq!(port("logged", "drop_no_buffer"), 0, "{doc}");
    assert_eq!(port("logged", "connects"), 2, "{doc}");
    assert_eq!(port("src", "rx_frames"), 6, "{doc}");
    for p in ["src", "logged"] {
        assert_eq!(port(p, "cut_off"), 0, "{doc}");
        assert_eq!(port(p, "drop_bad_buffer"), 0, "{doc}");
    }
}

/// A frame whose first buffer is sound but whose second lies outside its
/// sender's memory (the addresses and the broadcast destination read
/// fine): its sender is cut off, never the port it was flooded to, which
/// takes the next frame intact.
#[test]
fn a_frame_with_a_buffer_outside_memory_cuts_its_sender_not_its_receivers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-hostile-seg");
    let (sw, ctl) = switch(&dir, "bad,dst");
    let mut dst = Guest::connect(&dir.join("dst.sock"));
    dst.post(
        RX,
        &[
            (buf(RX, 0), 2048, DESC_F_WRITE, 0),
            (buf(RX, 1), 2048, DESC_F_WRITE, 0),
        ],
    );
    dst.wait_polled("port dst");
    let mut bad = Guest::connect(&dir.join("bad.sock"));
    bad.wait_polled("port bad");
    // descriptor 1: the frame's tail, far outside memory
    let mut tail = [0u8; 16];
    tail[0..8].copy_from_slice(&NOWHERE.to_le_bytes());
    tail[8..12].copy_from_slice(&46u32.to_le_bytes());
    bad.mem.write(desc_table(TX) + 16, &tail);
    // descriptor 0 (chained to 1): the header and the Ethernet header
    let f = frame([0xff; 6], [0x02, 0, 0, 0, 0, 0x0b], 0);
    bad.mem.write(buf(TX, 0), &f[..HDR + 14]);
    bad.post(TX, &[(buf(TX, 0), (HDR + 14) as u32, DESC_F_NEXT, 1)]);
    bad.wait_used(TX, 1, "the bad frame's chain");
    bad.wait_cut("a frame with a buffer outside memory");
    wait_stats(&ctl, "the sender cut off", |d| {
        counter(d, "bad", "cut_off") == 1 && counter(d, "bad", "drop_bad_chain") == 1
    });
    // nothing reached port dst, which keeps its connection and takes the
    // next frame (from a well-behaved frontend on the port) intact
    assert_eq!(dst.used(RX), 0);
    dst.frontend
        .get_features()
        .expect("port dst keeps its connection");
    let mut good = Guest::connect(&dir.join("bad.sock"));
    good.wait_polled("port bad again");
    let f = frame([0xff; 6], [0x02, 0, 0, 0, 0, 0x0c], 1);
    good.send(&f);
    dst.wait_used(RX, 1, "the good frame");
    let len = f.len();
    assert_eq!(dst.used_entry(RX, 0), (0, len as u32));
    assert_eq!(dst.mem.read(buf(RX, 0), len)[HDR..], f[HDR..]);
    drop((good, dst));
    let (doc, stderr) = stop_switch(sw);
    assert_eq!(counter(&doc, "dst", "cut_off"), 0, "{doc}");
    assert_eq!(counter(&doc, "dst", "drop_bad_buffer"), 0, "{doc}");
    assert_eq!(counter(&doc, "dst", "tx_frames"), 1, "{doc}");
    assert_eq!(counter(&doc, "bad", "cut_off"), 1, "{doc}");
    let (mine, all) = cut_lines(&stderr, "bad");
    assert_eq!((mine.len(), all), (1, 1), "only port bad, once:\n{stderr}");
    assert!(mine[0].contains("transmit chain"), "{}", mine[0]);
}

/// A memory table whose region runs past the end of its file (a frontend
/// that would have the switch's first touch there raise SIGBUS and end
/// every port with it) is refused and its frontend cut off; the switch
/// serves on, and a sound frontend on the port afterwards.
#[test]
fn a_memory_region_past_its_file_s_end_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-hostile-short");
    let (sw, ctl) = switch(&dir, "bad,other");
    let sock = dir.join("bad.sock");
    let stream = UnixStream::connect(&sock).unwrap();
    let mut fe = Frontend::from_stream(stream, 2);
    fe.set_owner().expect("SET_OWNER");
    let wanted = F_VERSION_1 | F_PROTOCOL_FEATURES;
    fe.get_features().expect("GET_FEATURES");
    fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_features(wanted).expect("SET_FEATURES");
    // a file of 1 MiB said to hold 2 MiB
    let short = Memfd::sized(c"nfv-short", MEM / 2);
    let refused = fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: short.host(0),
        mmap_offset: 0,
        mmap_handle: short.file.as_raw_fd(),
    }]);
    assert!(refused.is_err(), "a region past its file's end was taken");
    wait_stats(&ctl, "the frontend cut off", |d| {
        counter(d, "bad", "connects") == 1 && !d["ports"]["bad"].is_null()
    });
    // the next request finds the connection gone
    let t0 = Instant::now();
    while fe.get_features().is_ok() {
        assert!(t0.elapsed() < T, "the connection was not cut");
        std::thread::sleep(Duration::from_millis(10));
    }
    // a sound frontend on the port after it
    let good = Guest::connect(&sock);
    good.wait_polled("a sound frontend after the short one");
    drop(good);
    let (doc, stderr) = stop_switch(sw);
    assert_eq!(counter(&doc, "bad", "connects"), 2, "{doc}");
    assert!(
        stderr.contains("past its file") || stderr.contains("a memory region of"),
        "{stderr}"
    );
}

/// A ring of more than the switch's 1024 entries (the 32768 and
/// more), of none, or at a queue index the device lacks: each request
/// is refused, and the other ports keep forwarding.
#[test]
fn impossible_rings_are_refused_and_the_other_ports_forward() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-hostile-rings");
    let (sw, _ctl) = switch(&dir, "bad,a,b");
    let stream = UnixStream::connect(dir.join("bad.sock")).unwrap();
    let mut fe = Frontend::from_stream(stream, 2);
    fe.set_owner().expect("SET_OWNER");
    fe.get_features().expect("GET_FEATURES");
    fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_features(F_VERSION_1 | F_PROTOCOL_FEATURES)
        .expect("SET_FEATURES");
    for (queue, num) in [(0usize, 32768u16), (0, 65535), (1, 0)] {
        assert!(
            fe.set_vring_num(queue, num).is_err(),
            "a ring of {num} entries on queue {queue} was taken"
        );
    }
    // (a queue index the device lacks: the request's own check, or the
    // switch's; either way refused)
    assert!(fe.set_vring_num(7, 256).is_err(), "queue 7 was taken");
    // two sound frontends on the other ports exchange a frame meanwhile
    let mut a = Guest::connect(&dir.join("a.sock"));
    let mut b = Guest::connect(&dir.join("b.sock"));
    b.post(RX, &[(buf(RX, 0), 2048, DESC_F_WRITE, 0)]);
    a.wait_polled("port a");
    b.wait_polled("port b");
    let f = frame([0xff; 6], [0x02, 0, 0, 0, 0, 0x0a], 7);
    a.send(&f);
    b.wait_used(RX, 1, "a frame from port a");
    assert_eq!(b.mem.read(buf(RX, 0), f.len())[HDR..], f[HDR..]);
    drop((a, b, fe));
    let (doc, _) = stop_switch(sw);
    assert_eq!(counter(&doc, "b", "tx_frames"), 1, "{doc}");
}
