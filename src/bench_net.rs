//! `nfvisor bench net`: the `net-probe` echo guest under nfvisor and under
//! QEMU (userspace virtio-net-pci on a TAP: there is no /dev/vhost-net
//! here) in the same run, each on a TAP in a network namespace of the
//! benchmark's own. Guest code is emulated on a nested host, so frames per
//! second are bound by the guest; the fair figures are what the VMM adds:
//! its own CPU per frame (user and system time of all its threads, less
//! the system time of its vCPU threads, which here is instruction
//! emulation), vCPU exits per frame (KVM's counters in debugfs, the same
//! source for both), and the round trip of a ping-pong (p50, p99).
//!
//! `--backend vhost-user`: the guest drives instead (`net-probe
//! mode=ping`, round trips timed in the guest), through DPDK's testpmd on
//! vhost-user and, in the same run, through a TAP whose far end this
//! process reflects; exits per frame from the VM's report (a short and a
//! long run, the difference divided by the frames between them, so the
//! boot's exits cancel out).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_vmm::{qemu_q35, vmm_cpu_ns, which};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Ping-pongs measured per VMM and size (after 20 to warm up).
    #[arg(long, default_value_t = 300)]
    pub frames: u32,
    /// Frame sizes (bytes, Ethernet header included, 60 to 1514).
    #[arg(long, value_delimiter = ',', default_value = "64,1500")]
    pub size: Vec<usize>,
    /// Leave QEMU out.
    #[arg(long)]
    pub no_qemu: bool,
    /// tap: the host pings the guest through nfvisor's and QEMU's
    /// virtio-net on a TAP; vhost-user: the guest pings through DPDK's
    /// testpmd on vhost-user beside a TAP (needs dpdk-testpmd and 2 MiB
    /// hugepages).
    #[arg(long, default_value = "tap", value_parser = ["tap", "vhost-user"])]
    pub backend: String,
    /// echo: round trips and costs per frame; migration: the network
    /// downtime of a live migration (TAPs on one learning bridge, the host
    /// probing the guest at half the echo rate it sustains), beside the
    /// VM downtime.
    #[arg(long, default_value = "echo", value_parser = ["echo", "migration"])]
    pub scenario: String,
    /// With --scenario migration: migrations measured.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Queue pairs (tap echo: a multi-queue TAP, the guest echoing on
    /// every pair; the host's frames are then IPv4/UDP over 64 flows, so
    /// the kernel spreads them). 1 to 4.
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// event: nfvisor's queue workers wait for frames and kicks; poll:
    /// they busy-poll, each on a CPU of its own (--poll-cpus), the vCPU on
    /// CPU 0. QEMU has no poll mode: its figures are event mode.
    #[arg(long, default_value = "event", value_parser = ["event", "poll"])]
    pub mode: String,
    /// With --mode poll: the pollers' CPUs (a list, `+` between items).
    #[arg(long, default_value = "1")]
    pub poll_cpus: String,
    #[arg(long)]
    pub json: bool,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A namespace with one TAP, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tap: &str) -> Result<Netns> {
        Self::with_tap(tap, false)
    }

    /// A namespace with TAP `tap` (multi_queue: one queue per pair),
    /// without IPv6 (no solicitations among the frames measured).
    fn with_tap(tap: &str, multi_queue: bool) -> Result<Netns> {
        let name = format!("nfv-bench-net-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        let mut add = vec!["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap"];
        if multi_queue {
            add.push("multi_queue");
        }
        ip(&add)?;
        let _ = Command::new("ip")
            .args(["netns", "exec", &ns.0, "sysctl", "-qw"])
            .arg(format!("net.ipv6.conf.{tap}.disable_ipv6=1"))
            .status();
        ip(&["-n", &ns.0, "link", "set", tap, "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// A raw packet socket on `dev` inside `ns` (made on a thread that entered
/// the namespace: membership is per thread, the socket keeps it).
fn packet_socket(ns: &str, dev: &str) -> Result<OwnedFd> {
    let path = format!("/var/run/netns/{ns}");
    let dev = dev.to_string();
    std::thread::spawn(move || -> Result<OwnedFd> {
        let f = std::fs::File::open(&path).with_context(|| path.clone())?;
        // SAFETY: setns on a namespace file held open; it moves only this
        // short-lived thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(dev.clone())?;
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            bail!("no interface {dev} in {path}");
        }
        // SAFETY: sockaddr_ll is plain data; zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: addr is a valid sockaddr_ll of the length passed.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            bail!("binding to {dev}: {}", std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: tv is a valid timeval of the length passed.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(sock)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the socket thread panicked"))?
}

/// The bundled net-probe written to `dir` (QEMU takes a file), and QEMU
/// unless --no-qemu (Err: asked for and not installed).
fn guest_and_qemu(
    o: &Options,
    dir: &Path,
) -> Result<(std::path::PathBuf, Option<std::path::PathBuf>)> {
    let image = dir.join("net-probe.elf");
    std::fs::write(
        &image,
        guests::find("net-probe")
            .context("bundled net-probe")?
            .image,
    )?;
    let qemu = (!o.no_qemu).then(|| which("qemu-system-x86_64")).flatten();
    if !o.no_qemu && qemu.is_none() {
        bail!("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86), or pass --no-qemu");
    }
    Ok((image, qemu))
}

/// One frame from a packet socket into `buf`: its length (negative: none
/// came within the socket's timeout).
fn recv(fd: std::os::fd::RawFd, buf: &mut [u8]) -> isize {
    // SAFETY: the buffer is valid for its length.
    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) }
}

fn frame(seq: u32, size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(size, 0x5a);
    f
}

/// Where a frame of [`frame`] or [`flow_frame`] carries its seq.
const SEQ_AT: usize = 14;
const FLOW_SEQ_AT: usize = 42;

/// An IPv4/UDP frame of `size` bytes (60 and up), flow seq % 64 (the UDP
/// source port), `seq` first in the payload: a multi-queue TAP spreads
/// such frames over its queues by flow.
fn flow_frame(seq: u32, size: usize) -> Vec<u8> {
    let size = size.max(60);
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let ip_len = (size - 14) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&(1000 + (seq % 64) as u16).to_be_bytes());
    f.extend_from_slice(&2000u16.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(size, 0x5a);
    f
}

fn send(sock: &OwnedFd, f: &[u8]) {
    // SAFETY: the buffer is valid for its length.
    unsafe {
        libc::send(
            sock.as_raw_fd(),
            f.as_ptr() as *const libc::c_void,
            f.len(),
            0,
        )
    };
}

/// The echo of `seq`, waited for until `deadline`: its round trip.
fn echo_of(sock: &OwnedFd, seq: u32, deadline: Instant) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = vec![0u8; 2048];
    while Instant::now() < deadline {
        let n = recv(sock.as_raw_fd(), &mut buf);
        let at = match buf[12..14] {
            [0x08, 0x00] => FLOW_SEQ_AT,
            _ => SEQ_AT,
        };
        if n >= at as isize + 4
            && buf[0..6] == HOST_MAC
            && (buf[12..14] == ETHERTYPE || at == FLOW_SEQ_AT)
            && buf[at..at + 4] == seq.to_le_bytes()
        {
            return Some(t0.elapsed());
        }
    }
    None
}

/// Every exit KVM counted for the VM, its vCPUs summed: nfvisor's through
/// its control socket (`status`, KVM's binary statistics), QEMU's through
/// QMP `query-stats`.
fn kvm_exits(vmm: &Vmm) -> Option<u64> {
    match vmm {
        Vmm::Nfvisor(ctl) => {
            let r = vmm::control::send(ctl, &vmm::api::Request::Status, &mut |_| {}).ok()?;
            r["exits"]
                .as_array()?
                .iter()
                .map(|v| v["kvm_exits"].as_u64())
                .sum()
        }
        Vmm::Qemu(qmp) => {
            use std::io::{BufRead, BufReader, Write};
            let mut s = std::os::unix::net::UnixStream::connect(qmp).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut r = BufReader::new(s.try_clone().ok()?);
            let reply = |r: &mut BufReader<_>| -> Option<serde_json::Value> {
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).ok()? == 0 {
                        return None;
                    }
                    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
                    if v.get("event").is_none() {
                        return Some(v);
                    }
                }
            };
            reply(&mut r)?; // greeting
            s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").ok()?;
            reply(&mut r)?;
            s.write_all(
                b"{\"execute\":\"query-stats\",\"arguments\":{\"target\":\"vcpu\",\"providers\":[{\"provider\":\"kvm\",\"names\":[\"exits\"]}]}}\n",
            )
            .ok()?;
            let v = reply(&mut r)?;
            v["return"]
                .as_array()?
                .iter()
                .flat_map(|cpu| cpu["stats"].as_array().cloned().unwrap_or_default())
                .filter(|st| st["name"] == "exits")
                .map(|st| st["value"].as_u64())
                .sum()
        }
    }
}

/// How a VMM is asked for its exit count.
enum Vmm {
    Nfvisor(std::path::PathBuf),
    Qemu(std::path::PathBuf),
}

/// One VMM's figures at one frame size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub vmm: String,
    /// event or poll; queue pairs.
    pub mode: String,
    pub queues: u16,
    pub size: usize,
    pub frames: u32,
    pub lost: u32,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub exits_per_frame: Option<f64>,
    pub vmm_cpu_us_per_frame: f64,
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    vmm: &str,
    mode: &str,
    queues: u16,
    mut cmd: Command,
    ask: &Vmm,
    ns: &str,
    size: usize,
    frames: u32,
) -> Result<Figures> {
    let frame = |seq, size| {
        if queues > 1 {
            flow_frame(seq, size)
        } else {
            frame(seq, size)
        }
    };
    let sock = packet_socket(ns, "nfvbench0")?;
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {vmm}"))?;
    let pid = child.id();
    let result = (|| -> Result<Figures> {
        // warm up: the first echo says the guest is up (QEMU boots
        // SeaBIOS first)
        let start = Instant::now();
        let mut seq = 0u32;
        let mut warm = 0;
        while warm < 20 {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("{vmm}: the guest did not echo within 60 s");
            }
            send(&sock, &frame(seq, size));
            if echo_of(&sock, seq, Instant::now() + Duration::from_millis(200)).is_some() {
                warm += 1;
            }
            seq += 1;
        }
        let vcpu = |comm: &str| comm.starts_with("vcpu") || comm.starts_with("CPU ");
        let cpu0 = vmm_cpu_ns(pid, &vcpu);
        let exits0 = kvm_exits(ask);
        let mut rtts = Vec::new();
        let mut lost = 0;
        for _ in 0..frames {
            send(&sock, &frame(seq, size));
            match echo_of(&sock, seq, Instant::now() + Duration::from_secs(1)) {
                Some(d) => rtts.push(d.as_secs_f64() * 1e6),
                None => lost += 1,
            }
            seq += 1;
        }
        let cpu1 = vmm_cpu_ns(pid, &vcpu);
        let exits1 = kvm_exits(ask);
        let done = (frames - lost).max(1) as f64;
        rtts.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            rtts.get(((rtts.len() as f64 * p) as usize).min(rtts.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };

        Ok(Figures {
            vmm: vmm.to_string(),
            mode: mode.to_string(),
            queues,
            size,
            frames,
            lost,
            rtt_p50_us: pct(0.5),
            rtt_p99_us: pct(0.99),
            exits_per_frame: match (exits0, exits1) {
                (Some(a), Some(b)) => Some((b - a) as f64 / done),
                _ => None,
            },
            vmm_cpu_us_per_frame: cpu1.saturating_sub(cpu0) as f64 / 1e3 / done,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub fn run(o: &Options) -> Result<u8> {
    anyhow::ensure!(o.frames > 0, "--frames must be at least 1");
    for &s in &o.size {
        anyhow::ensure!((60..=1514).contains(&s), "--size {s}: 60 to 1514 bytes");
    }
    if o.scenario == "migration" {
        return run_network_downtime(o);
    }
    if o.backend == "vhost-user" {
        return run_guest_pings(o);
    }
    anyhow::ensure!(
        (1..=4).contains(&o.queues),
        "--queues {}: 1 to 4 pairs (what net-probe sets up)",
        o.queues
    );
    let poll = o.mode == "poll";
    if poll {
        let cpus = rt::parse_cpu_list(&o.poll_cpus.replace('+', ","))
            .with_context(|| format!("--poll-cpus {:?}", o.poll_cpus))?;
        anyhow::ensure!(
            !cpus.contains(&0),
            "--poll-cpus {:?}: CPU 0 is the vCPU's",
            o.poll_cpus
        );
        rt::check_cpus_exist(&cpus).with_context(|| format!("--poll-cpus {:?}", o.poll_cpus))?;
    }
    let exe = std::env::current_exe().context("locating the nfvisor binary")?;
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (image, qemu) = guest_and_qemu(o, &dir)?;
    let tap = "nfvbench0";
    let ns = Netns::with_tap(tap, o.queues > 1)?;
    let pairs = o.queues;
    let guest_cmdline = if pairs > 1 {
        format!("mode=echo count=0 pairs={pairs}")
    } else {
        "mode=echo count=0".to_string()
    };
    let exec = |program: &std::path::Path| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.0]).arg(program);
        c
    };
    let mut results = Vec::new();
    for &size in &o.size {
        let ctl = dir.join("ctl.sock");
        let mut c = exec(&exe);
        let mut net = format!("tap={tap},mac=52:54:00:12:34:56,queues={pairs}");
        if poll {
            net.push_str(&format!(",mode=poll,cpus={}", o.poll_cpus));
            c.args(["run", "--cpus", "0"]);
        } else {
            c.arg("run");
        }
        c.args(["--guest", "net-probe", "--net"])
            .arg(net)
            .arg("--control-socket")
            .arg(&ctl)
            .args(["--cmdline", &guest_cmdline]);
        tracing::info!(
            "nfvisor, {size}-byte frames, {pairs} pair(s), {} mode",
            o.mode
        );
        results.push(run_one(
            "nfvisor",
            &o.mode,
            pairs,
            c,
            &Vmm::Nfvisor(ctl),
            &ns.0,
            size,
            o.frames,
        )?);
        if let Some(q) = &qemu {
            let qmp = dir.join("qmp.sock");
            let mut c = exec(q);
            c.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
            qemu_q35(&mut c, "null")
                .arg("-netdev")
                .arg(format!(
                    "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off{}",
                    if pairs > 1 {
                        format!(",queues={pairs}")
                    } else {
                        String::new()
                    }
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,disable-legacy=on,romfile=,netdev=n0,mac=52:54:00:12:34:56{}",
                    if pairs > 1 {
                        format!(",mq=on,vectors={}", 2 * pairs + 2)
                    } else {
                        String::new()
                    }
                ))
                .arg("-kernel")
                .arg(&image)
                .args(["-append", &guest_cmdline]);
            tracing::info!("QEMU, {size}-byte frames, {pairs} pair(s), event mode");
            results.push(run_one(
                "qemu",
                "event",
                pairs,
                c,
                &Vmm::Qemu(qmp),
                &ns.0,
                size,
                o.frames,
            )?);
        }
    }
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    let ratios: Vec<serde_json::Value> = o
        .size
        .iter()
        .filter_map(|&s| {
            let n = results.iter().find(|r| r.vmm == "nfvisor" && r.size == s)?;
            let q = results.iter().find(|r| r.vmm == "qemu" && r.size == s)?;
            Some(serde_json::json!({
                "size": s,
                "qemu_over_nfvisor_cpu_per_frame": q.vmm_cpu_us_per_frame / n.vmm_cpu_us_per_frame.max(1e-9),
                "qemu_over_nfvisor_exits_per_frame": match (q.exits_per_frame, n.exits_per_frame) {
                    (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                    _ => None,
                },
                "qemu_over_nfvisor_rtt_p50": q.rtt_p50_us / n.rtt_p50_us.max(1e-9),
            }))
        })
        .collect();
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "results": results, "ratios": ratios })
            )?
        );
    } else {
        for r in &results {
            println!(
                "{:<8} {} mode, {} pair(s), {:>5} B: {} frames ({} lost), rtt p50 {:.0} us p99 {:.0} us, {} exits/frame, VMM CPU {:.1} us/frame",
                r.vmm,
                r.mode,
                r.queues,
                r.size,
                r.frames,
                r.lost,
                r.rtt_p50_us,
                r.rtt_p99_us,
                r.exits_per_frame.map_or("n/a".into(), |e| format!("{e:.1}")),
                r.vmm_cpu_us_per_frame
            );
        }
        for r in &ratios {
            println!("QEMU / nfvisor at {} B: {r}", r["size"]);
        }
    }
    Ok(0)
}

/// Frames the guest sends before the measured ones (the short run).
const WARM_FRAMES: u32 = 20;

/// One backend's figures at one frame size, timed by the guest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PingFigures {
    pub backend: String,
    pub size: usize,
    pub frames: u32,
    pub rtt_min_us: u64,
    pub rtt_avg_us: u64,
    pub rtt_max_us: u64,
    /// Frames sent again (none came back within a second).
    pub resent: u64,
    pub exits_per_frame: f64,
    /// Interrupts the guest took per frame.
    pub irqs_per_frame: f64,
}

/// `key=N` in a result line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// A VM pinging `count` frames of `size` through `net` (in `ns`, if any):
/// its `R ping` line and the exits its vCPUs took (KVM's count: every
/// exit, those KVM handles itself too).
fn ping_run(
    exe: &Path,
    ns: Option<&str>,
    net: &str,
    size: usize,
    count: u32,
) -> Result<(String, u64)> {
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let cmdline = format!("mode=ping count={count} size={size} timeout_s=30 resend_ms=1000");
    let out = c
        .args([
            "run",
            "--guest",
            "net-probe",
            "--json",
            "--net",
            net,
            "--cmdline",
            &cmdline,
        ])
        .stdin(Stdio::null())
        .output()
        .context("running nfvisor")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("R ping "))
        .map(str::to_string);
    let Some(line) = line.filter(|_| out.status.success()) else {
        bail!(
            "the guest's ping through {net} failed:\n{}",
            stderr.lines().rev().take(8).collect::<Vec<_>>().join("\n")
        );
    };
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the VM's --json report")?;
    let exits = report["vm"]["vcpus"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|c| c["kvm_stats"]["exits"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    Ok((line, exits))
}

fn ping_figures(
    backend: &str,
    exe: &Path,
    ns: Option<&str>,
    net: &str,
    size: usize,
    frames: u32,
) -> Result<PingFigures> {
    let (_, warm_exits) = ping_run(exe, ns, net, size, WARM_FRAMES)?;
    let (line, exits) = ping_run(exe, ns, net, size, WARM_FRAMES + frames)?;
    let get = |k: &str| field(&line, k).unwrap_or(0);
    if get("bad") > 0 {
        bail!("{backend}: frames came back corrupted: {line}");
    }
    let all = (WARM_FRAMES + frames) as f64;
    Ok(PingFigures {
        backend: backend.into(),
        size,
        frames,
        rtt_min_us: get("rtt_min_us"),
        rtt_avg_us: get("rtt_avg_us"),
        rtt_max_us: get("rtt_max_us"),
        resent: get("resent"),
        exits_per_frame: exits.saturating_sub(warm_exits) as f64 / frames as f64,
        irqs_per_frame: get("irqs") as f64 / all,
    })
}

/// Sends every test frame the guest sends on `sock` back to it, MACs
/// swapped (testpmd's macswap, for the TAP), until `stop`.
fn reflect(sock: OwnedFd, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let mut buf = vec![0u8; 2048];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let n = recv(sock.as_raw_fd(), &mut buf);
        // the guest's frames come from its MAC; the reflected ones (seen
        // going out) from the broadcast address it sent them to
        if n >= 14 && buf[6..12] == GUEST_MAC && buf[12..14] == ETHERTYPE {
            let f = &mut buf[..n as usize];
            let (dst, src) = f[..12].split_at_mut(6);
            dst.swap_with_slice(src);
            send(&sock, f);
        }
    }
}

/// `--backend vhost-user`: the guest's pings through testpmd on vhost-user
/// and through a TAP reflected by this process, size by size.
fn run_guest_pings(o: &Options) -> Result<u8> {
    let exe = std::env::current_exe().context("locating the nfvisor binary")?;
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-vu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("pmd.sock");
    let pmd = bench::testpmd::Testpmd::start(
        &dir,
        &format!("nfvbench{}", std::process::id()),
        &format!("net_vhost0,iface={}", sock.display()),
    )?;
    pmd.wait_forwarding()?;
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "testpmd made no socket at {} within 30 s:\n{}",
                sock.display(),
                pmd.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tap = "nfvbench0";
    let ns = Netns::new(tap)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reflector = {
        let sock = packet_socket(&ns.0, tap)?;
        let stop = stop.clone();
        std::thread::spawn(move || reflect(sock, stop))
    };
    let vhost_net = format!("vhost-user={},mac=52:54:00:12:34:56", sock.display());
    let tap_net = format!("tap={tap},mac=52:54:00:12:34:56");
    let mut results = Vec::new();
    let measured = (|| -> Result<()> {
        for &size in &o.size {
            tracing::info!("vhost-user (testpmd), {size}-byte frames");
            results.push(ping_figures(
                "vhost-user",
                &exe,
                None,
                &vhost_net,
                size,
                o.frames,
            )?);
            tracing::info!("TAP (reflected by this process), {size}-byte frames");
            results.push(ping_figures(
                "tap",
                &exe,
                Some(&ns.0),
                &tap_net,
                size,
                o.frames,
            )?);
        }
        Ok(())
    })();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reflector.join();
    drop(ns);
    let forwarded = pmd.finish();
    let _ = std::fs::remove_dir_all(&dir);
    measured?;
    let (rx, tx) = forwarded?;
    let ratios: Vec<serde_json::Value> = o
        .size
        .iter()
        .filter_map(|&s| {
            let v = results.iter().find(|r| r.backend == "vhost-user" && r.size == s)?;
            let t = results.iter().find(|r| r.backend == "tap" && r.size == s)?;
            Some(serde_json::json!({
                "size": s,
                "tap_over_vhost_user_rtt_avg": t.rtt_avg_us as f64 / (v.rtt_avg_us as f64).max(1.0),
                "tap_over_vhost_user_exits_per_frame": t.exits_per_frame / v.exits_per_frame.max(1e-9),
            }))
        })
        .collect();
    let testpmd = serde_json::json!({ "rx_packets": rx, "tx_packets": tx });
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "results": results, "ratios": ratios, "testpmd": testpmd
            }))?
        );
    } else {
        for r in &results {
            println!(
                "{:<10} {:>5} B: {} frames ({} resent), rtt min {} avg {} max {} us, {:.2} exits/frame, {:.2} interrupts/frame",
                r.backend, r.size, r.frames, r.resent, r.rtt_min_us, r.rtt_avg_us, r.rtt_max_us,
                r.exits_per_frame, r.irqs_per_frame
            );
        }
        for r in &ratios {
            println!("TAP / vhost-user at {} B: {r}", r["size"]);
        }
        println!("testpmd forwarded {rx} frames in, {tx} out");
    }
    Ok(0)
}

/// One migration's figures, network and VM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetworkDowntime {
    pub vmm: String,
    /// The probe period (half the echo rate measured before).
    pub probe_period_ms: f64,
    /// The VM's downtime as the migration reports it.
    pub vm_downtime_ms: f64,
    /// The longest gap between two echoes around the hand-over.
    pub network_downtime_ms: f64,
    pub network_downtime_periods: f64,
    /// Probes sent and those never echoed (by sequence number).
    pub probes: u32,
    pub lost: u32,
    pub migration_total_ms: f64,
    /// Echoes after the migration command returned (the guest answers on
    /// the destination).
    pub echoes_after: u32,
    /// The target: within one probe period and 2 ms of the VM downtime.
    pub within_target: bool,
}

/// `--scenario migration`: the guest echoes on a TAP of a learning bridge;
/// it migrates to a VM on another TAP of the same bridge while the host
/// probes it; the longest silence is the network downtime.
fn run_network_downtime(o: &Options) -> Result<u8> {
    anyhow::ensure!(o.runs > 0, "--runs must be at least 1");
    let exe = std::env::current_exe().context("locating the nfvisor binary")?;
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-netmig-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ns = Netns::new("nfvbench0")?;
    ip(&[
        "-n",
        &ns.0,
        "tuntap",
        "add",
        "dev",
        "nfvbench1",
        "mode",
        "tap",
    ])?;
    // a learning bridge, as a host's: after the hand-over it learns the
    // guest's new port (from the RARP the destination's NIC sends, or by
    // flooding once the source's TAP goes down and its entries with it)
    ip(&["-n", &ns.0, "link", "add", "nfvbr0", "type", "bridge"])?;
    for t in ["nfvbench0", "nfvbench1"] {
        ip(&["-n", &ns.0, "link", "set", t, "master", "nfvbr0"])?;
        ip(&["-n", &ns.0, "link", "set", t, "up"])?;
    }
    // the prober: a veth into the bridge
    ip(&[
        "-n",
        &ns.0,
        "link",
        "add",
        "nfvprobe",
        "type",
        "veth",
        "peer",
        "name",
        "nfvprobe-br",
    ])?;
    ip(&[
        "-n",
        &ns.0,
        "link",
        "set",
        "nfvprobe-br",
        "master",
        "nfvbr0",
    ])?;
    for l in ["nfvprobe-br", "nfvprobe", "nfvbr0"] {
        ip(&["-n", &ns.0, "link", "set", l, "up"])?;
    }
    let sock = packet_socket(&ns.0, "nfvprobe")?;
    let exec = |args: &[&str]| -> Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(&exe)
            .args(args)
            .env("NFVISOR_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nfvisor")
    };
    let (image, qemu) = guest_and_qemu(o, &dir)?;
    let vmms: Vec<&str> = if qemu.is_some() {
        vec!["nfvisor", "qemu"]
    } else {
        vec!["nfvisor"]
    };
    let mut results = Vec::new();
    for run in 0..o.runs {
        for &vmm in &vmms {
            let (ctl, inbound) = (
                dir.join(format!("src{run}.sock")),
                dir.join(format!("in{run}.sock")),
            );
            let listen = format!("unix:{}", inbound.display());
            // each run starts with a bridge that has not learnt the guest yet
            // (the previous run left it on the destination's port)
            for t in ["nfvbench0", "nfvbench1"] {
                let _ = Command::new("bridge")
                    .args([
                        "-netns",
                        &ns.0,
                        "fdb",
                        "del",
                        "52:54:00:12:34:56",
                        "dev",
                        t,
                        "master",
                    ])
                    .output();
            }
            let (mut src, mut dst) = if vmm == "nfvisor" {
                let dst = exec(&[
                    "receive",
                    "--listen",
                    &listen,
                    "--net",
                    "tap=nfvbench1,mac=52:54:00:12:34:56",
                ])?;
                let src = exec(&[
                    "run",
                    "--guest",
                    "net-probe",
                    "--cmdline",
                    "mode=echo count=0",
                    "--net",
                    "tap=nfvbench0,mac=52:54:00:12:34:56",
                    "--control-socket",
                    ctl.to_str().unwrap_or_default(),
                ])?;
                (src, dst)
            } else {
                // QEMU on the same guest and TAPs; it announces the guest
                // itself after the migration (announce-self's rounds)
                let q = qemu.as_deref().unwrap_or(Path::new("qemu-system-x86_64"));
                let start = |tap: &str, last: &[String]| -> Result<Child> {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", &ns.0]).arg(q);
                    qemu_q35(&mut c, "null")
                    .arg("-netdev")
                    .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"))
                    .args([
                        "-device",
                        "virtio-net-pci,disable-legacy=on,romfile=,netdev=n0,mac=52:54:00:12:34:56",
                    ])
                    .arg("-kernel")
                    .arg(&image)
                    .args(["-append", "mode=echo count=0"])
                    .args(last)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join(format!("qemu-{tap}.err")))?)
                    .spawn()
                    .context("starting QEMU")
                };
                let dst = start("nfvbench1", &["-incoming".into(), listen.clone()])?;
                let src = start(
                    "nfvbench0",
                    &[
                        "-qmp".into(),
                        format!("unix:{},server=on,wait=off", ctl.display()),
                    ],
                )?;
                (src, dst)
            };
            let measured = (|| -> Result<NetworkDowntime> {
                let t0 = Instant::now();
                while !inbound.exists() || !ctl.exists() {
                    if t0.elapsed() > Duration::from_secs(30) {
                        bail!("the VMs did not start within 30 s");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                // the echo rate: 50 ping-pongs once the guest answers
                let mut seq = 1_000_000u32;
                let mut rtts = Vec::new();
                let t0 = Instant::now();
                while rtts.len() < 50 {
                    if t0.elapsed() > Duration::from_secs(60) {
                        bail!("the guest did not echo within 60 s");
                    }
                    send(&sock, &frame(seq, 64));
                    if let Some(d) =
                        echo_of(&sock, seq, Instant::now() + Duration::from_millis(200))
                    {
                        rtts.push(d);
                    }
                    seq += 1;
                }
                rtts.sort();
                let period = (rtts[rtts.len() / 2] * 2).max(Duration::from_micros(200));
                // probes every period from a thread; echoes taken here
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let sender = {
                    let sock = sock.try_clone()?;
                    let stop = stop.clone();
                    std::thread::spawn(move || -> u32 {
                        let mut n = 0u32;
                        let start = Instant::now();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            send(&sock, &frame(n, 64));
                            n += 1;
                            let next = start + period * n;
                            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                        n
                    })
                };
                let echoes =
                    std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u32, Instant)>::new()));
                let receiver = {
                    let sock = sock.try_clone()?;
                    let stop = stop.clone();
                    let echoes = echoes.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 2048];
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let n = recv(sock.as_raw_fd(), &mut buf);
                            if n >= 18 && buf[0..6] == HOST_MAC && buf[12..14] == ETHERTYPE {
                                let seq = u32::from_le_bytes([buf[14], buf[15], buf[16], buf[17]]);
                                if seq < 1_000_000 {
                                    echoes
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .push((seq, Instant::now()));
                                }
                            }
                        }
                    })
                };
                std::thread::sleep(Duration::from_millis(500));
                let m0 = Instant::now();
                let migrated = if vmm == "qemu" {
                    qemu_migrate(&ctl, &listen)
                } else {
                    nfvisor_migrate(&exe, &ctl, &listen)
                };
                let m1 = Instant::now();
                std::thread::sleep(Duration::from_millis(700));
                let end = Instant::now();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let probes = sender.join().unwrap_or(0);
                let _ = receiver.join();
                let (vm_ms, total_ms) = migrated?;
                let echoes = echoes.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut seen = vec![false; probes as usize];
                for (s, _) in &echoes {
                    if let Some(x) = seen.get_mut(*s as usize) {
                        *x = true;
                    }
                }
                // the longest silence between echoes that spans the migration
                // command's run (the hand-over lies inside it)
                let mut times: Vec<Instant> = echoes.iter().map(|(_, t)| *t).collect();
                times.sort();
                let echoes_after = times.iter().filter(|t| **t > m1).count() as u32;
                // (the end stands for an echo: a guest that never echoes again
                // is a silence that lasts to the end, not no silence)
                times.push(end);
                let gap = times
                    .windows(2)
                    .filter(|w| w[1] >= m0 && w[0] <= m1)
                    .map(|w| w[1] - w[0])
                    .max()
                    .unwrap_or_default();
                let net_ms = gap.as_secs_f64() * 1e3;
                let period_ms = period.as_secs_f64() * 1e3;

                Ok(NetworkDowntime {
                    vmm: vmm.to_string(),
                    probe_period_ms: period_ms,
                    vm_downtime_ms: vm_ms,
                    network_downtime_ms: net_ms,
                    network_downtime_periods: net_ms / period_ms,
                    probes,
                    lost: seen.iter().filter(|s| !**s).count() as u32,
                    migration_total_ms: total_ms,
                    echoes_after,
                    within_target: net_ms <= vm_ms + period_ms + 2.0,
                })
            })();
            let _ = src.kill();
            let _ = dst.kill();
            let _ = (src.wait(), dst.wait());
            let _ = std::fs::remove_file(&ctl);
            let _ = std::fs::remove_file(&inbound);
            let r = measured?;
            tracing::info!("run {} ({vmm}): {r:?}", run + 1);
            results.push(r);
        }
    }
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    let median: serde_json::Map<String, serde_json::Value> = vmms
        .iter()
        .map(|&vmm| {
            let of = |f: fn(&NetworkDowntime) -> f64| {
                let v: Vec<f64> = results.iter().filter(|r| r.vmm == vmm).map(f).collect();
                bench::Spread::of(&v)
            };
            let m = serde_json::json!({
                "network_downtime_ms": of(|r| r.network_downtime_ms),
                "vm_downtime_ms": of(|r| r.vm_downtime_ms),
                "probe_period_ms": of(|r| r.probe_period_ms),
                "lost": of(|r| r.lost as f64),
            });
            (vmm.to_string(), m)
        })
        .collect();
    let summary = serde_json::Value::Object(median);
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "runs": results, "median": summary })
            )?
        );
    } else {
        for (i, r) in results.iter().enumerate() {
            println!(
                "{} {}: network downtime {:.1} ms ({:.1} probe periods of {:.2} ms), VM downtime {:.2} ms, {} of {} probes lost, migration {:.1} ms{}",
                r.vmm,
                i / vmms.len() + 1,
                r.network_downtime_ms,
                r.network_downtime_periods,
                r.probe_period_ms,
                r.vm_downtime_ms,
                r.lost,
                r.probes,
                r.migration_total_ms,
                if r.within_target { "" } else { " (above the target: VM downtime + one period + 2 ms)" }
            );
        }
    }
    Ok(0)
}

/// `nfvisor migrate` of the VM behind `ctl` to `listen`: (VM downtime,
/// total) in ms.
fn nfvisor_migrate(exe: &Path, ctl: &Path, listen: &str) -> Result<(f64, f64)> {
    let out = Command::new(exe)
        .args(["migrate", "--control-socket"])
        .arg(ctl)
        .args(["--to", listen, "--json"])
        .env("NFVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .context("running nfvisor migrate")?;
    if !out.status.success() {
        bail!(
            "the migration failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("migrate --json")?;
    let m = &report["migration"];
    Ok((
        m["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        m["total_ms"].as_f64().unwrap_or(f64::NAN),
    ))
}

/// QEMU's migration over QMP at `qmp` to `listen` (bandwidth cap raised):
/// (VM downtime, total) in ms as QEMU reports them.
fn qemu_migrate(qmp_path: &Path, listen: &str) -> Result<(f64, f64)> {
    use crate::bench_migration::{qmp, qmp_migrated, qmp_session};
    let (mut out, mut back) = qmp_session(qmp_path)?;
    qmp(
        &mut out,
        &mut back,
        serde_json::json!({"execute": "migrate-set-parameters",
                           "arguments": {"max-bandwidth": 1u64 << 40}}),
    )?;
    let from = Instant::now();
    qmp(
        &mut out,
        &mut back,
        serde_json::json!({"execute": "migrate", "arguments": {"uri": listen}}),
    )?;
    let q = qmp_migrated(&mut out, &mut back, from)?;
    Ok((
        q["downtime"].as_f64().unwrap_or(f64::NAN),
        q["total-time"].as_f64().unwrap_or(f64::NAN),
    ))
}
