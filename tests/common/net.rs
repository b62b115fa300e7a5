//! The host side of the virtio-net tests: a network namespace of the
//! test's own with a TAP in it, an AF_PACKET socket on that TAP, the VM run
//! inside the namespace, and the echo exchange with every byte verified.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const TAP: &str = "nfvtap0";
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const ETHERTYPE: u16 = 0x88b5;
/// Frame sizes the exchange cycles through (Ethernet header included, no FCS).
pub const SIZES: [usize; 8] = [60, 61, 128, 1000, 1514, 64, 333, 1513];

// ---------------------------------------------------------------- namespace

/// A network namespace of this test's own, deleted on drop (with the TAP
/// devices in it), whether the test passed or not.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nfv-net-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        Netns { name }
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A TAP device `dev` in the namespace, up.
    pub fn add_tap(&self, dev: &str) {
        self.ip(&["tuntap", "add", "dev", dev, "mode", "tap"]);
        self.ip(&["link", "set", dev, "up"]);
    }

    /// A multi-queue TAP device `dev` in the namespace, up, without IPv6
    /// (no router or neighbour solicitations among the test's frames).
    pub fn add_mq_tap(&self, dev: &str) {
        self.ip(&["tuntap", "add", "dev", dev, "mode", "tap", "multi_queue"]);
        let out = self
            .exec("sysctl")
            .arg("-qw")
            .arg(format!("net.ipv6.conf.{dev}.disable_ipv6=1"))
            .output()
            .expect("sysctl");
        assert!(out.status.success(), "{out:?}");
        self.ip(&["link", "set", dev, "up"]);
    }

    /// A bridge `br` over `taps`, in hub mode (no learning: every frame
    /// floods every port, so a guest that moves from one TAP to another is
    /// reached at once) and promiscuous (a packet socket on it sees every
    /// frame the guest sends).
    pub fn add_hub(&self, br: &str, taps: &[&str]) {
        self.ip(&["link", "add", br, "type", "bridge", "ageing_time", "0"]);
        for t in taps {
            self.add_tap(t);
            self.ip(&["link", "set", t, "master", br]);
        }
        self.ip(&["link", "set", br, "up"]);
        self.ip(&["link", "set", br, "promisc", "on"]);
    }

    /// `ip netns exec NS PROGRAM`: a command to run inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------ packet socket

/// An AF_PACKET raw socket (every ethertype) bound to `dev` in `ns`. It is
/// created on a thread that entered the namespace (membership is per
/// thread); a socket stays in the namespace it was made in, so the fd serves
/// any thread afterwards.
pub fn packet_socket(ns: &Netns, dev: &str) -> OwnedFd {
    let name = dev.to_string();
    in_namespace(ns, &format!("packet socket on {dev}"), move || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: cname is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(format!("no interface {name} in the namespace"));
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll and the length says so.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(format!("bind: {}", std::io::Error::last_os_error()));
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: tv is a valid timeval and the length says so.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if r != 0 {
            return Err(format!("SO_RCVTIMEO: {}", std::io::Error::last_os_error()));
        }
        Ok(sock)
    })
}

/// Runs `f` on a thread that entered `ns` (membership is per thread; a
/// socket or TAP descriptor made there stays in the namespace, and serves
/// any thread afterwards).
pub fn in_namespace<T: Send + 'static>(
    ns: &Netns,
    what: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> T {
    let path = ns.path();
    std::thread::spawn(move || -> Result<T, String> {
        let nsfile = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on a namespace file we hold open; it changes only
        // this (short-lived, test-owned) thread's network namespace.
        if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        f()
    })
    .join()
    .expect("the namespace thread panicked")
    .unwrap_or_else(|e| panic!("{what} in {}: {e}", ns.name))
}

/// A descriptor of the TAP `dev` in `ns`, opened as an orchestrator (Kata)
/// opens it to hand it to a VMM: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
pub fn tap_fd(ns: &Netns, dev: &str) -> OwnedFd {
    open_tap(ns, dev, 1, false).remove(0)
}

/// `n` descriptors of the multi-queue TAP `dev` in `ns` (one per queue
/// pair), as Kata opens them for a VMM: IFF_MULTI_QUEUE as well.
pub fn tap_fds_mq(ns: &Netns, dev: &str, n: usize) -> Vec<OwnedFd> {
    open_tap(ns, dev, n, true)
}

fn open_tap(ns: &Netns, dev: &str, n: usize, multi_queue: bool) -> Vec<OwnedFd> {
    let name = dev.to_string();
    in_namespace(ns, &format!("opening TAP {dev}"), move || {
        (0..n)
            .map(|_| {
                // SAFETY: open(2) of a fixed path; the result is checked.
                let fd =
                    unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(format!("/dev/net/tun: {}", std::io::Error::last_os_error()));
                }
                // SAFETY: fd is a fresh descriptor that nothing else owns.
                let tap = unsafe { OwnedFd::from_raw_fd(fd) };
                // struct ifreq: the name, then the flags
                let mut req = [0u8; 40];
                req[..name.len()].copy_from_slice(name.as_bytes());
                let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | 0x4000 /* IFF_VNET_HDR */;
                if multi_queue {
                    flags |= 0x0100; /* IFF_MULTI_QUEUE */
                }
                req[16..18].copy_from_slice(&(flags as u16).to_ne_bytes());
                const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
                // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq we own.
                if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) } != 0 {
                    return Err(format!("TUNSETIFF: {}", std::io::Error::last_os_error()));
                }
                Ok(tap)
            })
            .collect()
    })
}

pub fn send_frame(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: frame is a valid buffer of frame.len() bytes.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
        )
    };
    assert_eq!(
        n,
        frame.len() as isize,
        "send on the TAP: {}",
        std::io::Error::last_os_error()
    );
}

/// One frame the TAP received (not one it sent), or None after the
/// socket's receive timeout.
pub fn recv_frame(sock: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: buf and from are valid for the lengths passed.
    let n = unsafe {
        libc::recvfrom(
            sock.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
            &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
            &mut len,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)),
            "recvfrom on the TAP: {e}"
        );
        return None;
    }
    if from.sll_pkttype == libc::PACKET_OUTGOING {
        return Some(Vec::new()); // something this host sent: not for us
    }
    buf.truncate(n as usize);
    Some(buf)
}

// -------------------------------------------------------------- test frames

pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(2166136261u32, |h, &b| (h ^ b as u32).wrapping_mul(16777619))
}

pub fn pattern(seq: u32, n: usize) -> Vec<u8> {
    let mut s = seq.wrapping_mul(0x9e3779b9).wrapping_add(0x6d2b79f5);
    if s == 0 {
        s = 1;
    }
    let mut out = Vec::with_capacity(n + 4);
    while out.len() < n {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A test frame of `size` bytes (60..=1514) from `src` to `dst`.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], seq: u32, size: usize) -> Vec<u8> {
    assert!((60..=1514).contains(&size));
    let rest = pattern(seq, size - 22);
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&fnv1a(&rest).to_le_bytes());
    f.extend_from_slice(&rest);
    f
}

// ----------------------------------------------------------------- the VM

/// A VM process whose stdout and stderr lines (console and log alike) come
/// through one channel; killed on drop if it still runs.
pub struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vm {
    pub fn start(mut cmd: Command) -> Vm {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Vm {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    pub fn transcript(&self) -> String {
        self.seen.join("\n")
    }

    /// The process's id (under `ip netns exec`, which execs it: the VM's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line containing `needle`, waited for up to `limit`.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {limit:?}; the VM said:\n{}",
                    self.transcript()
                ),
            }
        }
    }

    /// Waits (up to `limit`) for the VM to exit: its exit code and all it
    /// printed.
    pub fn finish(mut self, limit: Duration) -> (i32, String) {
        let deadline = Instant::now() + limit;
        let code = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the VM did not exit within {limit:?}; it said:\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // the pipes close with the process: drain what is left
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        (code, self.transcript())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------ the exchange

/// What an echo exchange saw.
pub struct Echoed {
    /// The VM's exit code and everything it printed.
    pub code: i32,
    pub output: String,
    /// Frames of other ethertypes the TAP received meanwhile.
    pub other: usize,
}

pub fn mac_of(line: &str) -> [u8; 6] {
    let text = line
        .split(' ')
        .find_map(|w| w.strip_prefix("mac="))
        .unwrap_or_else(|| panic!("no mac= in {line:?}"));
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("bad mac in {line:?}"))
}

/// Runs the VM that `vm` starts (its guest `net-probe mode=echo count=K` on
/// the TAP `TAP` of `ns`), waits until the guest has negotiated, sends it
/// `count` test frames of mixed sizes, the first half one at a time (each
/// echo waited for: the guest sleeps between frames) and the rest in one
/// burst, and checks that each comes back exactly once, MACs swapped and
/// every byte intact. Then waits for the VM to exit.
pub fn echo_exchange(ns: &Netns, vm: Command, count: u32) -> Echoed {
    let sock = packet_socket(ns, TAP);
    let mut vm = Vm::start(vm);
    let line = vm.wait_for("R negotiated", Duration::from_secs(60));
    let guest = mac_of(&line);
    assert_eq!(guest, GUEST_MAC, "the MAC the VM was given: {line}");

    let size_of = |seq: u32| SIZES[seq as usize % SIZES.len()];
    let mut back = vec![false; count as usize];
    let mut got = 0;
    let mut other = 0;
    let mut deadline = Instant::now() + Duration::from_secs(30);
    let mut take = |back: &mut Vec<bool>, got: &mut u32, until: u32, deadline: Instant| {
        while *got < until {
            assert!(
                Instant::now() < deadline,
                "{} of {count} echoes came back in time",
                *got
            );
            let Some(f) = recv_frame(&sock) else { continue };
            if f.len() < 14 || f[12..14] != ETHERTYPE.to_be_bytes() {
                other += !f.is_empty() as usize;
                continue;
            }
            assert!(f.len() >= 22, "a short echo: {f:02x?}");
            let seq = u32::from_le_bytes(f[14..18].try_into().unwrap());
            assert!(seq < count, "an echo of a frame never sent: seq {seq}");
            assert!(!back[seq as usize], "frame {seq} came back twice");
            let want = test_frame(HOST_MAC, guest, seq, size_of(seq));
            assert_eq!(
                f.len(),
                want.len(),
                "the echo of frame {seq} has another length"
            );
            if f != want {
                let at = f.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "the echo of frame {seq} ({} bytes) differs from byte {at} on: {:02x?} for {:02x?}",
                    f.len(),
                    &f[at..(at + 16).min(f.len())],
                    &want[at..(at + 16).min(want.len())]
                );
            }
            back[seq as usize] = true;
            *got += 1;
        }
    };
    let half = count / 2;
    for seq in 0..half {
        send_frame(&sock, &test_frame(guest, HOST_MAC, seq, size_of(seq)));
        take(&mut back, &mut got, seq + 1, deadline);
    }
    deadline = Instant::now() + Duration::from_secs(30);
    for seq in half..count {
        send_frame(&sock, &test_frame(guest, HOST_MAC, seq, size_of(seq)));
    }
    take(&mut back, &mut got, count, deadline);
    assert!(back.iter().all(|&b| b));

    let (code, output) = vm.finish(Duration::from_secs(60));
    // nothing more may come back after the guest is gone
    while let Some(f) = recv_frame(&sock) {
        assert!(
            f.len() < 14 || f[12..14] != ETHERTYPE.to_be_bytes(),
            "an extra echo after all {count} came back: {f:02x?}"
        );
    }
    Echoed {
        code,
        output,
        other,
    }
}

/// Sequence numbers from here on are probes (`until_echoing`).
pub const PROBE_SEQ: u32 = 1 << 30;

/// Sends probe frames until one comes back: the guest echoes and the path
/// to it is up (a TAP just attached to a bridge may drop the first frames).
pub fn until_echoing(sock: &OwnedFd, limit: Duration) {
    let deadline = Instant::now() + limit;
    for seq in PROBE_SEQ.. {
        assert!(Instant::now() < deadline, "no echo within {limit:?}");
        send_frame(sock, &test_frame(GUEST_MAC, HOST_MAC, seq, 128));
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            match recv_frame(sock) {
                Some(f)
                    if f.len() >= 18
                        && f[12..14] == ETHERTYPE.to_be_bytes()
                        && f[0..6] == HOST_MAC =>
                {
                    return
                }
                _ => {}
            }
        }
    }
}

/// Streams `count` frames (one every `gap`) into the guest through `sock`
/// and collects the echoes, calling `midway` once half were sent; returns
/// how many times each sequence number came back, every echo verified
/// byte for byte.
pub fn echo_stream(
    sock: &OwnedFd,
    count: u32,
    gap: Duration,
    midway: &mut dyn FnMut(),
) -> Vec<u32> {
    let mut back = vec![0u32; count as usize];
    let take = |deadline: Instant, back: &mut Vec<u32>| {
        while Instant::now() < deadline {
            let Some(f) = recv_frame(sock) else { continue };
            if f.len() < 18 || f[12..14] != ETHERTYPE.to_be_bytes() || f[0..6] != HOST_MAC {
                continue;
            }
            let seq = u32::from_le_bytes(f[14..18].try_into().unwrap());
            if seq >= PROBE_SEQ {
                continue; // a late echo of `until_echoing`'s probes
            }
            assert!(seq < count, "an echo of a frame never sent: seq {seq}");
            let want = test_frame(HOST_MAC, GUEST_MAC, seq, 128);
            assert_eq!(f, want, "the echo of frame {seq} differs");
            back[seq as usize] += 1;
        }
    };
    for seq in 0..count {
        if seq == count / 2 {
            midway();
        }
        send_frame(sock, &test_frame(GUEST_MAC, HOST_MAC, seq, 128));
        take(Instant::now() + gap, &mut back);
    }
    take(Instant::now() + Duration::from_secs(2), &mut back);
    back
}

/// QEMU (the reference) running the exported `net-probe` guest of `dir`
/// with `append` on TAP in `ns`: q35, modern-only virtio-net-pci (no
/// legacy, no option ROM), userspace virtio (vhost=off).
pub fn qemu_net_probe(ns: &Netns, qemu: &str, dir: &std::path::Path, append: &str) -> Command {
    qemu_net_probe_on(ns, qemu, dir, append, TAP, "", "")
}

/// [`qemu_net_probe`] on TAP `tap`, with more of QEMU's options for the
/// netdev (`netdev_extra`, e.g. ",queues=4") and the device
/// (`device_extra`, e.g. ",mq=on,vectors=10").
pub fn qemu_net_probe_on(
    ns: &Netns,
    qemu: &str,
    dir: &std::path::Path,
    append: &str,
    tap: &str,
    netdev_extra: &str,
    device_extra: &str,
) -> Command {
    let mut vm = ns.exec(qemu);
    vm.args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
        .args(["-M", "q35", "-nodefaults", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off{netdev_extra}"
        ))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,disable-legacy=on,romfile=,netdev=n0,mac=52:54:00:12:34:56{device_extra}"
        ))
        .arg("-kernel")
        .arg(dir.join("net-probe.elf"))
        .arg("-append")
        .arg(append);
    vm
}

/// The fields of the guest's `R KIND ...` record in `output`.
pub fn record(output: &str, kind: &str) -> std::collections::BTreeMap<String, String> {
    // QEMU's firmware prints before the guest, on the header's line
    let from = output.find("#NFV ").unwrap_or(0);
    let parsed = guests::protocol::parse(&output[from..])
        .unwrap_or_else(|e| panic!("the guest's output does not parse ({e}):\n{output}"));
    parsed
        .records
        .iter()
        .find(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("no R {kind} record in:\n{output}"))
        .fields
        .clone()
}

// -------------------------------------------------------------------- tests
