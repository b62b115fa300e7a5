//! The REST API (Cloud Hypervisor's) on the real /dev/kvm: Kata
//! Containers' boot sequence replayed with Kata's bodies (the TAP handed
//! over by SCM_RIGHTS, as Kata sends it), every route's state rules and
//! errors, many clients and a stalled one, and migration and snapshot
//! through the API ending as they do through the CLI.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::net::{self, Netns};
use common::*;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const T: Duration = Duration::from_secs(60);

/// An HTTP/1.1 exchange on the API socket: (status, body).
fn call_with(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    fds: &[RawFd],
) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if fds.is_empty() {
        // (a server that answers before the request is all in, as it does
        // a body over the limit or one client too many, may have closed
        // its end: the answer is read all the same)
        let _ = s.write_all(req.as_bytes());
    } else {
        // as Kata does it: the whole request in one sendmsg with the fds
        s.send_with_fds(&[req.as_bytes()], fds).unwrap();
    }
    read_response(&mut s)
}

fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    call_with(sock, method, path, body, &[])
}

fn read_response(s: &mut UnixStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if status != 204 {
                assert!(
                    len == 0
                        || head.contains("Content-Type: application/json")
                        || head.contains("text/plain"),
                    "a body without its type: {head}"
                );
            }
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "the server closed mid-response");
                buf.extend_from_slice(&chunk[..n]);
            }
            return (
                status,
                String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string(),
            );
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the server closed without answering");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An empty VMM: `nfvisor run --api-socket DIR/api.sock`.
struct Api {
    child: Child,
    sock: PathBuf,
}

impl Api {
    fn start(dir: &Path, extra: &[&str]) -> Api {
        let sock = dir.join("api.sock");
        let child = Command::new(NFVISOR)
            .args(["run", "--api-socket", sock.to_str().unwrap()])
            .args(extra)
            .env("NFVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kata's way: ping every 10 ms until it answers (10 s at most)
        let t = Instant::now();
        loop {
            if sock.exists() && UnixStream::connect(&sock).is_ok() {
                let (code, body) = call(&sock, "GET", "vmm.ping", None);
                assert_eq!(code, 200, "{body}");
                let ping: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(ping["pid"].as_u64(), Some(child.id() as u64), "{ping}");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "vmm.ping never answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Api { child, sock }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        call(&self.sock, method, path, body)
    }

    fn state(&self) -> String {
        let (code, body) = self.call("GET", "vm.info", None);
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    /// vmm.shutdown, then the process's end (exit code, stdout).
    fn shutdown(mut self) -> (i32, String) {
        let (code, body) = self.call("PUT", "vmm.shutdown", None);
        assert_eq!(code, 200, "{body}");
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "nfvisor did not end within Kata's 3 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        let _ = self.child.stdout.take().unwrap().read_to_string(&mut out);
        (status.code().unwrap_or(-1), out)
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Times a call against a limit (Kata allows 1 s, 10 s for create and boot).
fn within<R>(limit: Duration, what: &str, f: impl FnOnce() -> R) -> R {
    let t = Instant::now();
    let r = f();
    assert!(
        t.elapsed() < limit,
        "{what} took {:?} (Kata allows {limit:?})",
        t.elapsed()
    );
    r
}

/// The guests, exported as files (Kata hands a kernel path).
fn guests(dir: &Path) -> PathBuf {
    let r = nfvisor(&["guests", "export", dir.to_str().unwrap()], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    dir.to_path_buf()
}

/// Kata's vm.create body (clh.go with its defaults,
/// static_sandbox_resource_mgmt=true, shared_fs="none"), with the kernel,
/// its command line, the memory and the rootfs image set for this test.
/// The vsock device's host socket is `vsock`.
fn kata_create_body(kernel: &Path, cmdline: &str, rootfs: &Path, vsock: &Path) -> String {
    let mut v = serde_json::json!({
        "console": {"iommu": false, "mode": "Off"},
        "cpus": {"boot_vcpus": 1, "kvm_hyperv": false, "max_vcpus": 1, "nested": true,
                 "topology": {"cores_per_die": 1, "dies_per_package": 1, "packages": 1, "threads_per_core": 1}},
        "disks": [{"backing_files": false, "direct": false, "image_type": "Raw", "iommu": false,
                   "num_queues": 1, "path": rootfs, "queue_size": 128, "readonly": true,
                   "sparse": true, "vhost_user": false}],
        "iommu": false,
        "landlock_enable": false,
        "memory": {"hotplug_method": "Acpi", "hugepages": false, "mergeable": false,
                   "prefault": false, "shared": false, "size": 67108864, "thp": true},
        "payload": {"cmdline": cmdline, "kernel": kernel},
        "platform": {"num_pci_segments": 2, "sev_snp": false, "tdx": false},
        "pvpanic": false,
        "serial": {"iommu": false, "mode": "Tty"},
        "watchdog": false
    });
    v["rng"] = serde_json::json!({"iommu": false, "src": "/dev/urandom"});
    v["vsock"] = serde_json::json!({"cid": 3, "iommu": false, "socket": vsock});
    v.to_string()
}

/// The guests written to `dir`, and a 1 MiB rootfs image there (Kata's
/// create body names one).
fn guests_and_rootfs(dir: &Path) -> PathBuf {
    guests(dir);
    let rootfs = dir.join("rootfs.img");
    std::fs::File::create(&rootfs)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    rootfs
}

/// Kata's vm.add-net body (NewNetConfig's defaults and the MAC).
const KATA_ADD_NET: &str = r#"{"iommu": false, "ip": "192.168.249.1", "mac": "52:54:00:12:34:56", "mask": "255.255.255.0", "num_queues": 2, "offload_csum": true, "offload_tso": true, "offload_ufo": true, "queue_size": 256, "vhost_mode": "Client", "vhost_user": false}"#;

/// Kata hands a multi-queue TAP over as one descriptor per queue pair
/// (`num_queues` 4: two pairs, with Kata's offload flags): descriptors that
/// are no TAP are refused by name; the NIC takes the TAP's as its pairs,
/// the guest turns both on and frames flow.
#[test]
fn a_multi_queue_tap_is_handed_over_one_descriptor_per_pair() {
    let dir = scratch("api-mq");
    let rootfs = guests_and_rootfs(&dir);
    let ns = Netns::new();
    ns.add_mq_tap("nfvkmq0");
    let fds = net::tap_fds_mq(&ns, "nfvkmq0", 2);
    let api = Api::start(&dir, &[]);
    let (code, body) = api.call(
        "PUT",
        "vm.create",
        Some(&kata_create_body(
            &dir.join("net-probe.elf"),
            "mode=echo count=0 pairs=2",
            &rootfs,
            &dir.join("clh.sock"),
        )),
    );
    assert_eq!(code, 204, "{body}");
    let add_net = KATA_ADD_NET.replace(r#""num_queues": 2"#, r#""num_queues": 4"#);
    let null = [
        std::fs::File::open("/dev/null").unwrap(),
        std::fs::File::open("/dev/null").unwrap(),
    ];
    let (code, body) = call_with(
        &api.sock,
        "PUT",
        "vm.add-net",
        Some(&add_net),
        &[null[0].as_raw_fd(), null[1].as_raw_fd()],
    );
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("is not a TAP"), "{body}");
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let (code, body) = call_with(&api.sock, "PUT", "vm.add-net", Some(&add_net), &raw);
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call("PUT", "vm.boot", None);
    assert_eq!(code, 204, "{body}");
    let sock = net::packet_socket(&ns, "nfvkmq0");
    net::until_echoing(&sock, Duration::from_secs(20));
    let (code, body) = api.call("GET", "vm.counters", None);
    assert_eq!(code, 200, "{body}");
    let counters: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(counters["net0"]["pairs_on"], 2, "{counters}");
    let _ = api.call("PUT", "vmm.shutdown", None);
}

/// Kata's boot sequence: ping until it answers, create, info "Created",
/// add-net with the TAP's descriptor by SCM_RIGHTS, boot, info "Running";
/// the guest really runs (it echoes frames through that TAP); then pause,
/// resume, snapshot and vmm.shutdown, each within Kata's time limits.
#[test]
fn kata_s_boot_sequence_runs_a_guest_on_a_tap_it_handed_over() {
    let dir = scratch("api-kata");
    let rootfs = guests_and_rootfs(&dir);
    let ns = Netns::new();
    ns.add_tap("nfvkata0");
    let tap = net::tap_fd(&ns, "nfvkata0");
    let api = Api::start(&dir, &[]);
    let kernel = dir.join("net-probe.elf");
    let vsock = dir.join("clh.sock");
    let create_and_boot = Instant::now();
    let (code, body) = within(Duration::from_secs(10), "vm.create", || {
        api.call(
            "PUT",
            "vm.create",
            Some(&kata_create_body(
                &kernel,
                "mode=echo count=0",
                &rootfs,
                &vsock,
            )),
        )
    });
    assert_eq!(code, 204, "{body}");
    assert_eq!(
        within(Duration::from_secs(1), "vm.info", || api.state()),
        "Created"
    );
    let (code, body) = call_with(
        &api.sock,
        "PUT",
        "vm.add-net",
        Some(KATA_ADD_NET),
        &[tap.as_raw_fd()],
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call("PUT", "vm.boot", None);
    assert_eq!(code, 204, "{body}");
    assert!(
        create_and_boot.elapsed() < Duration::from_secs(10),
        "create and boot took {:?} (Kata allows 10 s)",
        create_and_boot.elapsed()
    );
    assert_eq!(
        within(Duration::from_secs(1), "vm.info", || api.state()),
        "Running"
    );
    // the vCPU threads are named as Kata and libvirt look for them
    let comms: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", api.child.id()))
        .unwrap()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default())
        .collect();
    assert!(comms.iter().any(|c| c.trim() == "vcpu0"), "{comms:?}");
    // the guest runs, on the TAP handed over
    let sock = net::packet_socket(&ns, "nfvkata0");
    net::until_echoing(&sock, Duration::from_secs(20));
    let (code, body) = within(Duration::from_secs(1), "vm.pause", || {
        api.call("PUT", "vm.pause", None)
    });
    assert_eq!(code, 204, "{body}");
    assert_eq!(api.state(), "Paused");
    let (code, body) = within(Duration::from_secs(1), "vm.resume", || {
        api.call("PUT", "vm.resume", None)
    });
    assert_eq!(code, 204, "{body}");
    assert_eq!(api.state(), "Running");
    net::until_echoing(&sock, Duration::from_secs(20));
    let snap = dir.join("snap");
    let (code, body) = api.call(
        "PUT",
        "vm.snapshot",
        Some(&format!(
            r#"{{"destination_url": "file://{}"}}"#,
            snap.display()
        )),
    );
    assert_eq!(code, 204, "{body}");
    assert!(
        snap.join("snapshot.nfv").exists(),
        "no snapshot in {}",
        snap.display()
    );
    // counters of the NIC that carried the frames, and the metrics
    let (code, body) = api.call("GET", "vm.counters", None);
    assert_eq!(code, 200, "{body}");
    let counters: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        counters["net0"]["rx_frames"].as_u64().unwrap() > 0,
        "{counters}"
    );
    assert!(counters["blk0"].is_object(), "the rootfs disk: {counters}");
    assert!(
        counters["rng0"].is_object(),
        "the entropy device: {counters}"
    );
    assert!(
        counters["vsock0"].is_object(),
        "the vsock device: {counters}"
    );
    assert!(vsock.exists(), "the vsock device's host socket");
    let (code, body) = api.call("GET", "metrics", None);
    assert_eq!(code, 200);
    assert!(
        body.contains("nfvisor_device_rx_frames_total{device=\"net0\"}"),
        "{body}"
    );
    let (code, _) = api.shutdown();
    assert_eq!(code, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn hello_body(dir: &Path) -> String {
    format!(
        r#"{{"payload": {{"kernel": "{}", "cmdline": "exit=0"}}, "memory": {{"size": 33554432}}}}"#,
        dir.join("hello.elf").display()
    )
}

fn dirtier_body(dir: &Path, cmdline: &str) -> String {
    format!(
        r#"{{"payload": {{"kernel": "{}", "cmdline": "{cmdline}"}}, "memory": {{"size": 67108864}}, "serial": {{"mode": "Tty"}}}}"#,
        dir.join("dirtier.elf").display()
    )
}

/// Every route's state rules and errors, with Cloud Hypervisor's codes
/// and its error body (a JSON array of strings).
#[test]
fn every_route_answers_by_the_vm_s_state() {
    let dir = scratch("api-routes");
    guests(&dir);
    let api = Api::start(&dir, &[]);
    let error = |code: u16, body: &str, want: u16, needle: &str| {
        assert_eq!(code, want, "{body}");
        let chain: Vec<String> = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("not a JSON array of strings ({e}): {body}"));
        assert!(
            chain.iter().any(|s| s.contains(needle)),
            "{needle:?} not in {chain:?}"
        );
    };
    // no VM yet
    for (m, p) in [
        ("GET", "vm.info"),
        ("PUT", "vm.boot"),
        ("PUT", "vm.pause"),
        ("PUT", "vm.shutdown"),
        ("GET", "vm.counters"),
    ] {
        let (code, body) = api.call(m, p, None);
        error(code, &body, 404, "not");
    }
    let (code, body) = api.call("PUT", "vm.add-disk", Some(r#"{"path": "/x"}"#));
    error(code, &body, 404, "not created");
    // routes and methods
    let (code, body) = api.call("GET", "vm.nothing", None);
    error(code, &body, 404, "Not Found");
    let (code, body) = api.call("GET", "vm.boot", None);
    error(code, &body, 400, "Bad Request");
    let (code, body) = api.call("PUT", "vm.boot", Some("{}"));
    error(code, &body, 400, "Bad Request");
    let (code, body) = api.call("PUT", "vm.create", None);
    error(code, &body, 400, "Bad Request");
    let (code, body) = api.call("PUT", "vm.create", Some("{\"payload\": "));
    error(code, &body, 400, "Failed to deserialize JSON");
    let (code, body) = api.call("PUT", "vm.create", Some(r#"{"memory": {"size": "big"}}"#));
    error(code, &body, 400, "Failed to deserialize JSON");
    for (route, needle) in [
        ("vm.add-fs", "virtio-fs"),
        ("vm.add-pmem", "pmem"),
        ("vm.add-device", "VFIO"),
        ("vm.resize", "hotplug"),
    ] {
        let (code, body) = api.call("PUT", route, Some("{}"));
        error(code, &body, 500, needle);
    }
    for route in ["vm.power-button", "vm.nmi"] {
        let (code, body) = api.call("PUT", route, None);
        error(code, &body, 500, "nfvisor");
    }
    // a missing kernel is refused at create, naming it; nothing is created
    let (code, body) = api.call(
        "PUT",
        "vm.create",
        Some(r#"{"payload": {"kernel": "/nonexistent/vmlinux"}, "memory": {"size": 33554432}}"#),
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call("PUT", "vm.boot", None);
    error(code, &body, 500, "/nonexistent/vmlinux");
    assert_eq!(api.state(), "Created");
    let (code, _) = api.call("PUT", "vm.delete", None);
    assert_eq!(code, 204);
    // a VM: created, booted, refused what its state refuses
    let (code, body) = api.call(
        "PUT",
        "vm.create",
        Some(&dirtier_body(&dir, "mb=1 passes=0")),
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call(
        "PUT",
        "vm.create",
        Some(&dirtier_body(&dir, "mb=1 passes=0")),
    );
    error(code, &body, 500, "already created");
    let (code, body) = api.call("PUT", "vm.pause", None);
    error(code, &body, 500, "not running");
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (code, body) = api.call(
        "PUT",
        "vm.add-disk",
        Some(&format!(r#"{{"path": "{}", "id": "data"}}"#, img.display())),
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call(
        "PUT",
        "vm.add-disk",
        Some(r#"{"path": "/x", "image_type": "Qcow2"}"#),
    );
    error(code, &body, 500, "raw images only");
    let (code, body) = api.call("PUT", "vm.remove-device", Some(r#"{"id": "data"}"#));
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call("PUT", "vm.remove-device", Some(r#"{"id": "data"}"#));
    error(code, &body, 404, "no device");
    let (code, body) = api.call("PUT", "vm.add-net", Some(r#"{"mac": "52:54:00:00:00:01"}"#));
    error(code, &body, 500, "no TAP");
    let (code, body) = api.call("PUT", "vm.boot", None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(api.state(), "Running");
    let (code, body) = api.call("PUT", "vm.boot", None);
    error(code, &body, 500, "already booted");
    let (code, body) = api.call("PUT", "vm.resume", None);
    error(code, &body, 500, "not paused");
    let (code, body) = api.call(
        "PUT",
        "vm.add-disk",
        Some(&format!(r#"{{"path": "{}"}}"#, img.display())),
    );
    error(code, &body, 500, "no PCI hotplug");
    let (code, body) = api.call(
        "PUT",
        "vm.snapshot",
        Some(r#"{"destination_url": "relative/dir"}"#),
    );
    error(code, &body, 400, "file:///");
    // reboot: the VM starts again from its configuration
    let (code, body) = api.call("PUT", "vm.reboot", None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(api.state(), "Running");
    // shutdown keeps the configuration (Created), delete forgets it
    let (code, body) = api.call("PUT", "vm.shutdown", None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(api.state(), "Created");
    let (code, body) = api.call("PUT", "vm.shutdown", None);
    error(code, &body, 500, "not running");
    let (code, _) = api.call("PUT", "vm.delete", None);
    assert_eq!(code, 204);
    let (code, body) = api.call("GET", "vm.info", None);
    error(code, &body, 404, "not created");
    // a guest that ends on its own: Shutdown, and it boots again
    let (code, body) = api.call("PUT", "vm.create", Some(&hello_body(&dir)));
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call("PUT", "vm.boot", None);
    assert_eq!(code, 204, "{body}");
    let t = Instant::now();
    while api.state() != "Shutdown" {
        assert!(t.elapsed() < T, "the hello guest never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, body) = api.call("PUT", "vm.boot", None);
    assert_eq!(code, 204, "{body}");
    let (code, _) = api.shutdown();
    assert_eq!(code, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Many clients at once, a client that stalls half-way through a request
/// (answered 408, the others served meanwhile), more clients than the cap
/// (503), a body over the limit (400).
#[test]
fn many_clients_a_stalled_one_and_too_many() {
    let dir = scratch("api-clients");
    let api = Api::start(&dir, &[]);
    // a stalled half request
    let mut stalled = UnixStream::connect(&api.sock).unwrap();
    stalled
        .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pay")
        .unwrap();
    let t = Instant::now();
    // 8 clients pinging together while it stalls, each on its own
    // keep-alive connection (as Kata's client pools them)
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let sock = api.sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                for _ in 0..20 {
                    let t = Instant::now();
                    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
                        .unwrap();
                    let (code, _) = read_response(&mut s);
                    assert_eq!(code, 200);
                    // (served while the stalled client waits; the time
                    // bound is loose: the suite runs tests in parallel)
                    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    stalled
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let (code, body) = read_response(&mut stalled);
    assert_eq!(code, 408, "{body}");
    assert!(
        t.elapsed() >= Duration::from_secs(4),
        "answered before the stall time"
    );
    assert_eq!(
        api.state_or_404(),
        404,
        "the stalled create created nothing"
    );
    // a body over the limit
    let big = format!(r#"{{"x": "{}"}}"#, "a".repeat(70_000));
    let (code, body) = api.call("PUT", "vm.create", Some(&big));
    assert_eq!(code, 400, "{body}");
    // more clients than the cap: the extra one is told so
    // (each answers a ping first: all 16 are surely being served)
    // (a connection the server has not yet seen closed may still count:
    // one answered 503 is tried again)
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| {
            let t = Instant::now();
            loop {
                let mut s = UnixStream::connect(&api.sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
                    .unwrap();
                match read_response(&mut s).0 {
                    200 => return s,
                    503 if t.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    other => panic!("an idle client was answered {other}"),
                }
            }
        })
        .collect();
    let mut extra = UnixStream::connect(&api.sock).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (code, body) = read_response(&mut extra);
    assert_eq!(code, 503, "{body}");
    drop(idle);
    // once the server saw them close, clients are served again
    let t = Instant::now();
    while api.call("GET", "vmm.ping", None).0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(10), "never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _) = api.shutdown();
    assert_eq!(code, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

impl Api {
    fn state_or_404(&self) -> u16 {
        self.call("GET", "vm.info", None).0
    }
}

const DIRTIER: &str = "mb=4 passes=80";

/// Snapshot and migration through the API end as through the CLI: a
/// snapshot taken by vm.snapshot restores with `nfvisor restore` and
/// finishes with an unmigrated run's digest; vm.send-migration to `nfvisor
/// receive` likewise; and vm.receive-migration takes a guest `nfvisor
/// migrate` sends, which finishes on the API's VMM.
#[test]
fn snapshot_and_migration_through_the_api_end_as_through_the_cli() {
    let dir = scratch("api-migrate");
    guests(&dir);
    let plain = nfvisor(
        &[
            "run",
            "--guest",
            "dirtier",
            "--memory",
            "64M",
            "--cmdline",
            DIRTIER,
        ],
        T,
    );
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    let want = digest(&plain.stdout);

    // vm.snapshot, then `nfvisor restore`
    let api = Api::start(&dir, &[]);
    let (code, body) = api.call("PUT", "vm.create", Some(&dirtier_body(&dir, DIRTIER)));
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call("PUT", "vm.boot", None);
    assert_eq!(code, 204, "{body}");
    std::thread::sleep(Duration::from_millis(150));
    let (code, body) = api.call("PUT", "vm.pause", None);
    assert_eq!(code, 204, "{body}");
    let snap = dir.join("snap");
    let (code, body) = api.call(
        "PUT",
        "vm.snapshot",
        Some(&format!(
            r#"{{"destination_url": "file://{}"}}"#,
            snap.display()
        )),
    );
    assert_eq!(code, 204, "{body}");
    // vm.send-migration of the same (paused) VM to `nfvisor receive`
    let ep = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Running::start(&["receive", "--listen", &ep]);
    dst.wait_for("waiting for a migration");
    let (code, body) = api.call("PUT", "vm.resume", None);
    assert_eq!(code, 204, "{body}");
    let (code, body) = api.call(
        "PUT",
        "vm.send-migration",
        Some(&format!(r#"{{"destination_url": "{ep}"}}"#)),
    );
    assert_eq!(code, 204, "{body}");
    assert_eq!(api.state(), "Shutdown", "the guest left");
    let d = dst.finish(T);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(
        digest(&d.stdout),
        want,
        "the migrated guest computed something else"
    );
    let (code, out) = api.shutdown();
    assert_eq!(code, 0);
    assert!(
        !out.contains("DIRTIER OK"),
        "the guest must not finish at the source"
    );
    let restored = nfvisor(&["restore", "--from", snap.to_str().unwrap()], T);
    assert_eq!(restored.code, 0, "{}", restored.stderr);
    assert_eq!(
        digest(&restored.stdout),
        want,
        "the restored guest computed something else"
    );

    // vm.receive-migration from `nfvisor migrate`
    let api = Api::start(&dir, &[]);
    let ep2 = format!("unix:{}", dir.join("mig2.sock").display());
    let sock = api.sock.clone();
    let body = format!(r#"{{"receiver_url": "{ep2}"}}"#);
    let receiving =
        std::thread::spawn(move || call(&sock, "PUT", "vm.receive-migration", Some(&body)));
    let ctl = dir.join("src.sock");
    let mut src = Running::start(&[
        "run",
        "--guest",
        "dirtier",
        "--memory",
        "64M",
        "--cmdline",
        DIRTIER,
        "--control-socket",
        ctl.to_str().unwrap(),
    ]);
    src.wait_for("vCPU 0 runs on host thread");
    wait_for_path(&ctl);
    wait_for_path(&dir.join("mig2.sock"));
    std::thread::sleep(Duration::from_millis(150));
    let r = migrate(ctl.to_str().unwrap(), &ep2, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let (code, body) = receiving.join().unwrap();
    assert_eq!(code, 204, "{body}");
    // the received guest runs here, and the metrics carry the migration's
    // downtime as this end measured it
    let (code, metrics) = api.call("GET", "metrics", None);
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.contains("nfvisor_migration_last_downtime_seconds{role=\"destination\"}"),
        "{metrics}"
    );
    let s = src.finish(T);
    assert_eq!(s.code, 0, "{}", s.stderr);
    let t = Instant::now();
    while api.state() != "Shutdown" {
        assert!(t.elapsed() < T, "the received guest never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out) = api.shutdown();
    assert_eq!(code, 0);
    assert_eq!(
        digest(&out),
        want,
        "the received guest computed something else"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The OpenAPI document lists exactly the routes the server serves.
#[test]
fn the_openapi_document_lists_exactly_the_served_routes() {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "put", "post", "patch", "delete"].contains(&k.as_str()))
                .map(|m| (m.to_uppercase(), format!("/api/v1{path}")))
                .collect::<Vec<_>>()
        })
        .collect();
    documented.sort();
    // the route table in the server's source ...
    let src = std::fs::read_to_string(repo_root().join("src/api_server.rs")).unwrap();
    let table = &src[src.find("pub const ROUTES").unwrap()..];
    let table = &table[..table.find("];").unwrap()];
    let mut served: Vec<(String, String)> = table
        .lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split('"').collect();
            (parts.len() >= 4).then(|| (parts[1].to_string(), parts[3].to_string()))
        })
        .collect();
    served.sort();
    assert_eq!(
        documented, served,
        "docs/openapi.json and the server's routes differ"
    );
    // ... is what the running server routes: none is "Not Found", and a
    // path outside it is
    let dir = scratch("api-doc");
    let api = Api::start(&dir, &[]);
    // (vmm.shutdown last: it ends the server)
    for (m, path) in served.iter().filter(|r| !r.1.ends_with("vmm.shutdown")) {
        let (code, body) = api.call(m, path.trim_start_matches("/api/v1/"), None);
        assert!(
            !(code == 404 && body.contains("Not Found")),
            "{m} {path} is not served: {code} {body}"
        );
    }
    let (code, _) = api.call("GET", "vm.not-a-route", None);
    assert_eq!(code, 404);
    let _ = api.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A vhost-user NIC as Cloud Hypervisor's API describes one (`vhost_user`,
/// `vhost_socket`, `vhost_mode`), served by DPDK's testpmd: the guest's
/// pings come back, every one verified.
#[test]
fn a_vhost_user_nic_created_through_the_api_reaches_testpmd() {
    let dir = scratch("api-vhost-user");
    let g = guests(&dir);
    let sock = dir.join("pmd.sock");
    let pmd = bench::testpmd::Testpmd::start(
        &dir,
        "nfvapi1",
        &format!("net_vhost0,iface={}", sock.display()),
    )
    .unwrap_or_else(|e| panic!("{e} (.ci/run does this)"));
    pmd.wait_forwarding().unwrap_or_else(|e| panic!("{e}"));
    let api = Api::start(&dir, &[]);
    let body = serde_json::json!({
        "payload": {"kernel": g.join("net-probe.elf"),
                    "cmdline": "mode=ping count=50 size=64 timeout_s=20"},
        "memory": {"size": 33554432},
        "serial": {"mode": "Tty"},
        "net": [{"vhost_user": true, "vhost_socket": sock, "vhost_mode": "Client",
                 "num_queues": 2, "mac": "52:54:00:12:34:56"}],
    })
    .to_string();
    let (code, out) = api.call("PUT", "vm.create", Some(&body));
    assert_eq!(code, 204, "{out}");
    let (code, out) = api.call("PUT", "vm.boot", None);
    assert_eq!(code, 204, "{out}");
    let t = Instant::now();
    while api.state() != "Shutdown" {
        assert!(t.elapsed() < T, "the guest did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, stdout) = api.shutdown();
    assert!(stdout.contains("R ping frames=50 bad=0"), "{stdout}");
    let (rx, tx) = pmd.finish().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((rx, tx), (50, 50));
}
