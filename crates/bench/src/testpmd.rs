//! DPDK's `dpdk-testpmd` as a vhost-user peer: the benchmark's and the
//! tests' backend (or frontend) that is not ours. One port, `vdev`,
//! forwarding every frame back where it came from with the MACs swapped
//! (`macswap`, `--port-topology=loop`), its memory in 2 MiB hugepages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Hugepages each testpmd takes (its -m, in 2 MiB pages).
pub const HUGEPAGES_EACH: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum TestpmdError {
    #[error("dpdk-testpmd is not installed (apt-get install dpdk)")]
    Missing,
    #[error(
        "testpmd needs {HUGEPAGES_EACH} free 2 MiB hugepages ({free} free) on a hugetlbfs at \
         /dev/hugepages (mounted: {mounted}): echo 256 > /proc/sys/vm/nr_hugepages; \
         mount -t hugetlbfs nodev /dev/hugepages"
    )]
    NoHugepages { free: u64, mounted: bool },
    #[error("starting dpdk-testpmd: {0}")]
    Start(std::io::Error),
    #[error("testpmd did not exit within 20 s of Enter")]
    NoExit,
    #[error("testpmd did not start forwarding within 30 s:\n{0}")]
    NotForwarding(String),
    #[error("testpmd printed no {0} for port 0:\n{1}")]
    NoStatistics(&'static str, String),
}

/// Free 2 MiB hugepages, and whether /dev/hugepages is a hugetlbfs.
pub fn hugepages() -> (u64, bool) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let free = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" /dev/hugepages hugetlbfs "));
    (free, mounted)
}

pub struct Testpmd {
    child: Child,
    log: PathBuf,
    prefix: String,
}

impl Testpmd {
    /// testpmd with the one port `vdev` (`net_vhost0,iface=SOCK` is a
    /// vhost-user backend listening at SOCK; `,client=1` connects there),
    /// its files named by `prefix`, its log in `dir`.
    pub fn start(dir: &Path, prefix: &str, vdev: &str) -> Result<Testpmd, TestpmdError> {
        Testpmd::start_queues(dir, prefix, vdev, 1)
    }

    /// `start`, with `queues` receive and transmit queues on the port
    /// (the vdev says `queues=N` too); queue i forwards back to queue i.
    pub fn start_queues(
        dir: &Path,
        prefix: &str,
        vdev: &str,
        queues: u16,
    ) -> Result<Testpmd, TestpmdError> {
        Testpmd::start_with(
            dir,
            prefix,
            &[],
            &[vdev.to_string()],
            &[
                "--forward-mode=macswap".to_string(),
                "--port-topology=loop".to_string(),
                format!("--rxq={queues}"),
                format!("--txq={queues}"),
            ],
        )
    }

    /// testpmd with the ports `vdevs` (for DPDK's virtio-user frontend,
    /// `net_virtio_user0,path=SOCK[,server=1][,mac=..]`), more EAL
    /// arguments `eal` (e.g. `--main-lcore 1`: it forwards on CPU 0) and
    /// the forwarding arguments `forwarding` (mode, topology, queues), its
    /// files named by `prefix`, its log in `dir`.
    pub fn start_with(
        dir: &Path,
        prefix: &str,
        eal: &[String],
        vdevs: &[String],
        forwarding: &[String],
    ) -> Result<Testpmd, TestpmdError> {
        let found = Command::new("sh")
            .args(["-c", "command -v dpdk-testpmd"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(TestpmdError::Missing);
        }
        let (free, mounted) = hugepages();
        if free < HUGEPAGES_EACH || !mounted {
            return Err(TestpmdError::NoHugepages { free, mounted });
        }
        remove_hugepage_files(prefix);
        let log = dir.join(format!("{prefix}-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).map_err(TestpmdError::Start)?;
        let err = out.try_clone().map_err(TestpmdError::Start)?;
        let mb = (HUGEPAGES_EACH * 2).to_string();
        let mut cmd = Command::new("stdbuf");
        // line-buffered: its log says when it forwards (wait_forwarding)
        cmd.args(["-oL", "dpdk-testpmd"])
            .args(["--no-pci", "--single-file-segments", "-m", &mb])
            .args(["--file-prefix", prefix, "-l", "0-1"]);
        if vdevs.iter().any(|v| v.starts_with("net_virtio_user")) {
            // (a virtio-user port hands its peer virtual addresses)
            cmd.arg("--iova-mode=va");
        }
        cmd.args(eal);
        for v in vdevs {
            cmd.args(["--vdev", v]);
        }
        let child = cmd
            .arg("--")
            .args([
                "--nb-cores=1",
                // (else it waits up to 9 s for a link no VM has brought up yet)
                "--disable-link-check",
                // (its default pool, 155 k buffers, takes 340 MiB)
                "--total-num-mbufs=16384",
            ])
            .args(forwarding)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(TestpmdError::Start)?;
        Ok(Testpmd {
            child,
            log,
            prefix: prefix.into(),
        })
    }

    /// DPDK's "PVP with virtio-user" frontend: two virtio-user ports on
    /// the vhost-user sockets `a` and `b` (listening there with `server`),
    /// MACs 02:00:00:00:00:0a and :0b, in `mac` forwarding with each
    /// port's peer the other's MAC (a learning switch learns both ends),
    /// one burst sent first; `extra` forwarding arguments after.
    pub fn virtio_user_mac_loop(
        dir: &Path,
        prefix: &str,
        a: &Path,
        b: &Path,
        server: bool,
        extra: &[String],
    ) -> Result<Testpmd, TestpmdError> {
        let s = if server { ",server=1" } else { "" };
        let mut forwarding: Vec<String> = vec![
            "--forward-mode=mac".into(),
            "--eth-peer=0,02:00:00:00:00:0b".into(),
            "--eth-peer=1,02:00:00:00:00:0a".into(),
            "--tx-first".into(),
        ];
        forwarding.extend_from_slice(extra);
        Testpmd::start_with(
            dir,
            prefix,
            &[],
            &[
                format!(
                    "net_virtio_user0,path={}{s},mac=02:00:00:00:00:0a",
                    a.display()
                ),
                format!(
                    "net_virtio_user1,path={}{s},mac=02:00:00:00:00:0b",
                    b.display()
                ),
            ],
            &forwarding,
        )
    }

    /// Waits until testpmd forwards (frames sent before are dropped).
    pub fn wait_forwarding(&self) -> Result<(), TestpmdError> {
        let t0 = Instant::now();
        while !self.log().contains("Press enter to exit") {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(TestpmdError::NotForwarding(self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Where its log is (it stays after `finish`).
    pub fn log_path(&self) -> std::path::PathBuf {
        self.log.clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ends testpmd as its user does (Enter) and returns port 0's forward
    /// statistics: (RX-packets, TX-packets).
    pub fn finish(self) -> Result<(u64, u64), TestpmdError> {
        Ok(self.finish_ports(1)?[0])
    }

    /// `finish`, with the statistics of ports 0 to `ports` - 1.
    pub fn finish_ports(mut self, ports: usize) -> Result<Vec<(u64, u64)>, TestpmdError> {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(TestpmdError::NoExit);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.log();
        let stat = |port: usize, key: &'static str| -> Result<u64, TestpmdError> {
            log.find(&format!("Forward statistics for port {port} "))
                .and_then(|at| log[at..].split_once(key))
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| TestpmdError::NoStatistics(key, log.clone()))
        };
        (0..ports)
            .map(|p| Ok((stat(p, "RX-packets:")?, stat(p, "TX-packets:")?)))
            .collect()
    }

    /// Kills testpmd (a backend that dies).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.kill();
        remove_hugepage_files(&self.prefix);
    }
}

/// A dead testpmd's hugepage files make the next one with its prefix fail.
fn remove_hugepage_files(prefix: &str) {
    if let Ok(dir) = std::fs::read_dir("/dev/hugepages") {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
