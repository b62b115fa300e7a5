//! `nfvisor switch`: the polling L2 switch whose ports are vhost-user
//! backends. Someone else's frontend first: DPDK's testpmd with two
//! virtio-user ports forwarding to each other through the switch (MAC
//! mode, each port's peer the other's MAC), the counters of both sides
//! agreeing and the MAC table learnt; then two nfvisor VMs (vhost-user
//! NICs, the bundled net-probe) exchanging verified frames through it;
//! then the bad settings.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// The vhost-user tests' lock (testpmd's hugepages, its file prefixes).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn switch(dir: &Path, ports: &str, seconds: u64) -> Running {
    let mut s = Running::start(&[
        "switch",
        "--socket-dir",
        dir.to_str().unwrap(),
        "--ports",
        ports,
        "--duration-s",
        &seconds.to_string(),
        "--json",
    ]);
    s.wait_for("ports, serving");
    s
}

/// A VM on port `from` sends 400 verified frames; one on port `to`,
/// started first, must take 200 of them intact (the sender sends twice
/// what the receiver takes: the receiver's driver may post its buffers
/// after the first frames went). `what` names the exchange in failures.
fn exchange(dir: &Path, to: &str, from: &str, what: &str) {
    let net = |p: &str, mac: &str| {
        format!(
            "vhost-user={},mac={mac}",
            dir.join(format!("{p}.sock")).display()
        )
    };
    let mut recv = Running::start(&[
        "run",
        "--guest",
        "net-probe",
        "--net",
        &net(to, "52:54:00:00:00:01"),
        "--cmdline",
        "mode=recv count=200",
    ]);
    // (the guest's console is stdout: its vCPU's start, then time for the
    // driver to post its buffers)
    recv.wait_for("runs on host thread");
    std::thread::sleep(Duration::from_secs(2));
    let send = nfvisor(
        &[
            "run",
            "--guest",
            "net-probe",
            "--net",
            &net(from, "52:54:00:00:00:02"),
            "--cmdline",
            "mode=send count=400 size=300",
        ],
        T,
    );
    assert_eq!(send.code, 0, "{what}: {}", send.stderr);
    let got = recv.finish(T);
    assert_eq!(got.code, 0, "{what}: {}", got.stderr);
    assert!(
        got.stdout.contains("R recv frames=200 bad=0"),
        "{what}: {}",
        got.stdout
    );
}

#[test]
fn testpmd_forwards_through_the_switch_and_both_sides_count_alike() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-tp");
    let sw = switch(&dir, "a,b", 0);
    let tp = bench::testpmd::Testpmd::virtio_user_mac_loop(
        &dir,
        "nfv-switch-tp",
        &dir.join("a.sock"),
        &dir.join("b.sock"),
        false,
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    tp.wait_forwarding().unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(2));
    let log = tp.log();
    let stats = tp.finish_ports(2).unwrap_or_else(|e| panic!("{e}\n{log}"));
    // SIGTERM: the switch stops, then says what it counted
    let (doc, _) = stop_switch(sw);
    let port = |p: &str, k: &str| doc["ports"][p][k].as_u64().unwrap();
    // each side counts what the other counts, but for the bursts in the
    // rings when testpmd stopped (at most two of 32 either way)
    for (i, p) in ["a", "b"].iter().enumerate() {
        let (received, sent) = stats[i];
        let (put, taken) = (port(p, "tx_frames"), port(p, "rx_frames"));
        assert!(
            received <= put && put - received <= 64,
            "port {p}: the switch put {put} frames there, testpmd received {received}\n{doc}"
        );
        assert!(
            taken <= sent && sent - taken <= 64,
            "port {p}: testpmd sent {sent}, the switch took {taken}\n{doc}"
        );
    }
    assert!(stats[0].0 > 1000, "frames loop for seconds: {stats:?}");
    // every thread under its filter: the main thread, the PMD, both
    // ports' protocol threads (and the crate's threads under them)
    assert_eq!(doc["seccomp"]["mode"], "on", "{doc}");
    assert!(
        doc["seccomp"]["filtered_threads"].as_u64().unwrap() >= 4,
        "{doc}"
    );
    // flooded only until both MACs were learnt, and the table says where
    assert!(port("a", "flooded") + port("b", "flooded") <= 64, "{doc}");
    let fdb = doc["fdb"].as_array().unwrap();
    for (mac, p) in [("02:00:00:00:00:0a", "a"), ("02:00:00:00:00:0b", "b")] {
        assert!(
            fdb.iter().any(|e| e["mac"] == mac && e["port"] == p),
            "{mac} on {p}: {doc}"
        );
    }
}

/// Two nfvisor VMs on the switch (vhost-user NICs, net-probe): 200
/// frames from one to the other, each verified by the guest; then the
/// receiving VM goes and a new one takes its port (a new frontend on the
/// same socket) and frames flow again; the sockets are the user's alone.
#[test]
fn two_vms_exchange_frames_through_the_switch() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-vms");
    let sw = switch(&dir, "vm1,vm2", 0);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("vm1.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    for round in 0..2 {
        exchange(&dir, "vm1", "vm2", &format!("round {round}"));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(sw.pid() as i32, libc::SIGTERM) };
    let out = sw.finish(T);
    let doc = json(&out);
    assert_eq!(doc["ports"]["vm1"]["connects"], 2, "{doc}");
    assert!(
        doc["ports"]["vm1"]["tx_frames"].as_u64().unwrap() >= 400,
        "{doc}"
    );
}

/// A hostile frontend on one port (garbage instead of vhost-user
/// messages, then a header that claims more than it sends, then a
/// message too short for its request) loses that connection only: the
/// port takes the next frontend, and two VMs on the other ports exchange
/// verified frames meanwhile.
#[test]
fn a_hostile_frontend_loses_its_port_only() {
    use std::io::Write;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-hostile");
    let sw = switch(&dir, "vm1,vm2,bad", 0);
    let bad = dir.join("bad.sock");
    let hostile = std::thread::spawn(move || {
        let junk: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\n\r\n garbage garbage garbage",
            // GET_FEATURES (1), version 1, a size of 4096 and no payload
            &[1, 0, 0, 0, 1, 0, 0, 0, 0, 16, 0, 0],
            // SET_VRING_NUM (8) with a 2-byte payload (it needs 8)
            &[8, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xff],
        ];
        for j in junk {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&bad) {
                let _ = s.write_all(j);
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    });
    exchange(&dir, "vm1", "vm2", "beside the hostile frontend");
    hostile.join().unwrap();
    // the port that was attacked still takes a real frontend
    let bad_net = format!(
        "vhost-user={},mac=52:54:00:00:00:03",
        dir.join("bad.sock").display()
    );
    let probe = nfvisor(
        &[
            "run",
            "--guest",
            "net-probe",
            "--net",
            &bad_net,
            "--cmdline",
            "mode=recv count=1 timeout_s=1",
        ],
        T,
    );
    assert!(
        probe.stdout.contains("R negotiated"),
        "a frontend after the hostile ones: {}\n{}",
        probe.stdout,
        probe.stderr
    );
    let (doc, _) = stop_switch(sw);
    assert!(
        doc["ports"]["bad"]["connects"].as_u64().unwrap() >= 1,
        "{doc}"
    );
}

#[test]
fn bad_switch_settings_are_refused_by_name() {
    let dir = scratch("switch-bad");
    let d = dir.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--socket-dir", "/nonexistent/sw", "--ports", "a,b"],
            "not a directory",
        ),
        (
            vec!["--socket-dir", d, "--ports", "a,a"],
            "port \"a\" twice",
        ),
        (
            vec!["--socket-dir", d, "--ports", "a"],
            "two ports at least",
        ),
        (
            vec!["--socket-dir", d, "--ports", "a,b", "--cpus", "4096"],
            "4096",
        ),
        (
            vec!["--socket-dir", d, "--ports", "a,b", "--cpus", "0,0"],
            "listed twice",
        ),
        (
            vec!["--socket-dir", d, "--ports", "a,b=tap:"],
            "NAME=tap:DEVICE",
        ),
        (
            vec!["--socket-dir", d, "--ports", "a,b", "--rt-priority", "50"],
            "needs --cpus",
        ),
    ] {
        let mut all = vec!["switch"];
        all.extend(args.iter().copied());
        let r = nfvisor(&all, T);
        assert_ne!(r.code, 0, "{all:?}");
        assert!(
            r.stderr.contains(needle),
            "{all:?}: expected {needle:?}:\n{}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
}

/// `switch-ctl` on the control socket: the ports as started, a port added
/// at run time that carries verified frames between two VMs, bad requests
/// refused by name, the port removed (its socket gone, the table's entries
/// on it forgotten), the switch serving on.
#[test]
fn switch_ctl_adds_and_removes_ports_at_run_time() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-ctl");
    let ctl = dir.join("ctl.sock");
    let ctl_s = ctl.to_str().unwrap().to_string();
    let mut sw = Running::start(&[
        "switch",
        "--socket-dir",
        dir.to_str().unwrap(),
        "--ports",
        "a,b",
        "--control-socket",
        &ctl_s,
        "--cpus",
        "0-1",
        "--json",
    ]);
    sw.wait_for("ports, serving");
    let ask = |args: &[&str]| {
        let mut all = vec!["switch-ctl", "--control-socket", &ctl_s];
        all.extend_from_slice(args);
        nfvisor(&all, T)
    };
    let ports = json(&ask(&["ports", "--json"]));
    let names: Vec<&str> = ports
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"], "{ports}");
    // two PMDs (one per CPU), pinned, the ports shared out between them
    let pmds: Vec<u64> = ports
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pmd"].as_u64().unwrap())
        .collect();
    assert_eq!(pmds, [0, 1], "{ports}");
    let stats = json(&ask(&["stats", "--json"]));
    let placed: Vec<String> = stats["pmds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["cpus"].to_string())
        .collect();
    assert_eq!(placed, ["[0]", "[1]"], "{stats}");
    let added = ask(&["add-port", "c"]);
    assert_eq!(added.code, 0, "{}", added.stderr);
    assert!(dir.join("c.sock").exists());
    for (args, needle) in [
        (vec!["add-port", "c"], "a port of that name exists"),
        (vec!["add-port", "d=bogus:x"], "NAME=client:PATH"),
        (vec!["del-port", "zz"], "no such port"),
    ] {
        let r = ask(&args);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    }
    // a request that is not one, straight on the socket
    {
        use std::io::{BufRead, Write};
        let s = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
        (&s).write_all(b"{\"request\":\"reboot\"}\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":false"), "{line}");
    }
    // the added port forwards: a VM on it takes verified frames from one
    // on a
    exchange(&dir, "c", "a", "to the added port");
    let fdb = json(&ask(&["fdb", "--json"]));
    assert!(
        fdb.as_array()
            .unwrap()
            .iter()
            .any(|e| e["port"] == "a" && e["mac"] == "52:54:00:00:00:02"),
        "{fdb}"
    );
    let removed = ask(&["del-port", "c"]);
    assert_eq!(removed.code, 0, "{}", removed.stderr);
    assert!(!dir.join("c.sock").exists());
    let fdb = json(&ask(&["fdb", "--json"]));
    assert!(
        !fdb.as_array().unwrap().iter().any(|e| e["port"] == "c"),
        "{fdb}"
    );
    let stats = json(&ask(&["stats", "--json"]));
    assert!(stats["ports"]["c"].is_null(), "{stats}");
    assert!(
        stats["ports"]["a"]["rx_frames"].as_u64().unwrap() >= 400,
        "{stats}"
    );
    // the same name again: a fresh port
    assert_eq!(ask(&["add-port", "c"]).code, 0);
    stop_switch(sw);
    assert!(!ctl.exists(), "the control socket goes with the switch");
}

/// A TAP port in a namespace of the test's own: a VM's frames to an
/// unknown address are flooded to the TAP (the host's stack sees them);
/// the host's frames to the VM's address, learnt on its port, go to that
/// port alone (not flooded).
#[test]
fn a_tap_port_joins_the_host_stack_and_learnt_addresses_are_not_flooded() {
    use common::net::*;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-tap");
    let ns = Netns::new();
    ns.add_mq_tap("swtap0");
    let sock = packet_socket(&ns, "swtap0");
    let mut cmd = ns.exec(NFVISOR);
    cmd.args([
        "switch",
        "--socket-dir",
        dir.to_str().unwrap(),
        "--ports",
        "a,b",
        "--tap",
        "swtap0",
        "--json",
    ]);
    let mut sw = Running::start_command(cmd);
    sw.wait_for("ports, serving");
    let net = format!(
        "vhost-user={},mac=52:54:00:00:00:02",
        dir.join("a.sock").display()
    );
    let send = nfvisor(
        &[
            "run",
            "--guest",
            "net-probe",
            "--net",
            &net,
            "--cmdline",
            "mode=send count=100 size=300",
        ],
        T,
    );
    assert_eq!(send.code, 0, "{}", send.stderr);
    let vm_mac = [0x52, 0x54, 0, 0, 0, 2];
    let mut seen = 0;
    while let Some(f) = recv_frame(&sock) {
        if f.len() >= 14 && f[6..12] == vm_mac {
            seen += 1;
        }
    }
    assert!(seen >= 90, "the TAP saw {seen} of the VM's 100 frames");
    // the host answers the VM's address: a unicast the switch learnt
    let host = [0x02, 0, 0, 0, 0, 0x77];
    for seq in 0..20 {
        send_frame(&sock, &test_frame(vm_mac, host, seq, 100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (doc, _) = stop_switch(sw);
    let c = |p: &str, k: &str| doc["ports"][p][k].as_u64().unwrap();
    assert_eq!(c("swtap0", "rx_frames"), 20, "{doc}");
    assert_eq!(c("swtap0", "flooded"), 0, "{doc}");
    assert!(c("swtap0", "tx_frames") >= 100, "{doc}");
    // to port a (its VM gone: no buffer), none to b
    assert_eq!(c("a", "tx_frames") + c("a", "drop_no_buffer"), 20, "{doc}");
    assert_eq!(c("b", "drop_no_buffer") + c("b", "tx_frames"), 100, "{doc}");
}

/// Client ports (the switch connects, as OVS's dpdkvhostuserclient does)
/// to testpmd's virtio-user ports in server mode: frames flow through
/// them; the switch is stopped and started again, and its client ports
/// connect to testpmd again. (Frames do not flow after that reconnection
/// yet: DPDK 22.11's reconnection sends SET_VRING_ENABLE without
/// PROTOCOL_FEATURES acked, which the `vhost` crate refuses; see the
/// README.)
#[test]
fn client_ports_connect_to_testpmd_servers_and_again_after_a_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-client");
    let (p0, p1) = (dir.join("tp0.sock"), dir.join("tp1.sock"));
    let vdev = |i: u32, p: &Path, mac: &str| {
        format!("net_virtio_user{i},path={},server=1,mac={mac}", p.display())
    };
    // (server mode: testpmd waits for the switch before it forwards;
    // txonly: it sends whether or not it receives)
    let tp = bench::testpmd::Testpmd::start_with(
        &dir,
        "nfv-switch-client",
        &[],
        &[
            vdev(0, &p0, "02:00:00:00:00:0a"),
            vdev(1, &p1, "02:00:00:00:00:0b"),
        ],
        &[
            "--forward-mode=txonly".into(),
            "--eth-peer=0,02:00:00:00:00:0b".into(),
            "--eth-peer=1,02:00:00:00:00:0a".into(),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ports = format!("a=client:{},b=client:{}", p0.display(), p1.display());
    let mut rounds = Vec::new();
    for round in 0..2 {
        let sw = switch(&dir, &ports, 0);
        std::thread::sleep(Duration::from_secs(if round == 0 { 4 } else { 2 }));
        rounds.push(stop_switch(sw).0);
    }
    let log = tp.log();
    let _ = tp.finish_ports(2);
    for p in ["a", "b"] {
        let first = &rounds[0]["ports"][p];
        assert_eq!(first["connects"], 1, "{first}\n{log}");
        assert!(
            first["rx_frames"].as_u64().unwrap() > 1000,
            "{first}\n{log}"
        );
        assert!(first["tx_frames"].as_u64().unwrap() > 0, "{first}\n{log}");
        assert_eq!(rounds[1]["ports"][p]["connects"], 1, "{}\n{log}", rounds[1]);
    }
}

/// A VM on the switch migrates from one port to another mid-traffic: its
/// pings, reflected by testpmd (macswap) on a third port, go on from the
/// new port, every one answered and verified, and the switch's MAC table
/// followed the VM to the new port. (The migration hands the switch a
/// dirty log, LOG_SHMFD; whether a page lands in it depends on a ping
/// reply arriving in the few milliseconds the migration takes here, so
/// the log's pages are checked in tests/switch_hostile.rs, with a
/// frontend of the test's own.)
#[test]
fn a_vm_migrating_between_ports_is_followed_by_the_mac_table() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("switch-migrate");
    let sw_ctl = dir.join("sw.sock");
    let sw_ctl_s = sw_ctl.to_str().unwrap().to_string();
    let mut sw = Running::start(&[
        "switch",
        "--socket-dir",
        dir.to_str().unwrap(),
        "--ports",
        "vm1,vm2,peer",
        "--control-socket",
        &sw_ctl_s,
        "--json",
    ]);
    sw.wait_for("ports, serving");
    let tp = bench::testpmd::Testpmd::start_with(
        &dir,
        "nfv-switch-migrate",
        &[],
        &[format!(
            "net_virtio_user0,path={},mac=02:00:00:00:00:0e",
            dir.join("peer.sock").display()
        )],
        &["--forward-mode=macswap".into()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    tp.wait_forwarding().unwrap_or_else(|e| panic!("{e}"));
    let (ctl, inbound) = (dir.join("src.sock"), dir.join("in.sock"));
    let listen = format!("unix:{}", inbound.display());
    let net = |p: &str| format!("vhost-user={}", dir.join(format!("{p}.sock")).display());
    let mut dst = Running::start(&[
        "receive",
        "--listen",
        &listen,
        "--net",
        &net("vm2"),
        "--json",
    ]);
    dst.wait_for("waiting for a migration");
    let ctl_arg = ctl.to_str().unwrap();
    let mut src = Running::start(&[
        "run",
        "--guest",
        "net-probe",
        "--cmdline",
        "mode=ping count=2000 size=64 timeout_s=30 resend_ms=100",
        "--net",
        &net("vm1"),
        "--control-socket",
        ctl_arg,
        "--json",
    ]);
    src.wait_for("R negotiated");
    // the pings flowing (testpmd's replies reaching the VM) when the
    // migration runs: the switch writes into the VM's memory meanwhile
    let t0 = std::time::Instant::now();
    loop {
        let stats = switch::control::request(&sw_ctl, &switch::Request::Stats)
            .unwrap_or_else(|e| panic!("{e}"));
        if stats["ports"]["vm1"]["tx_frames"].as_u64().unwrap_or(0) >= 200 {
            break;
        }
        assert!(t0.elapsed() < T, "no pings through the switch: {stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = migrate(ctl_arg, &listen, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let src = src.finish(Duration::from_secs(60));
    let dst = dst.finish(Duration::from_secs(90));
    let _ = tp.finish();
    let (doc, log) = stop_switch(sw);
    assert_eq!(src.code, 0, "{}", src.stderr);
    assert_eq!(dst.code, 0, "{}", dst.stderr);
    assert!(
        dst.stderr.contains("R ping frames=2000 bad=0"),
        "{}\n{doc}",
        dst.stderr
    );
    assert!(
        log.contains("handed its dirty log over"),
        "the migration did not log through the switch: {log}"
    );
    let guest: Vec<&serde_json::Value> = doc["fdb"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["port"] == "vm2")
        .collect();
    assert_eq!(guest.len(), 1, "the guest's MAC on vm2: {doc}");
    assert!(
        !doc["fdb"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["port"] == "vm1"),
        "{doc}"
    );
    assert!(doc["fdb_moves"].as_u64().unwrap() >= 1, "{doc}");
    assert!(
        doc["ports"]["vm2"]["tx_frames"].as_u64().unwrap() > 0,
        "{doc}"
    );
}
