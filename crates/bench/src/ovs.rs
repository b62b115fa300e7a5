//! OVS-DPDK (Debian's `openvswitch-switch-dpdk`) as a baseline switch: a
//! private ovsdb-server and ovs-vswitchd-dpdk in a directory of their own
//! (not the system's service), one netdev bridge with the NORMAL action
//! (MAC learning), its ports `dpdkvhostuserclient` connecting to
//! virtio-user servers (testpmd with `server=1`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const VSWITCHD: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

#[derive(Debug, thiserror::Error)]
pub enum OvsError {
    #[error("OVS-DPDK is not installed ({VSWITCHD}: apt install openvswitch-switch-dpdk)")]
    Missing,
    #[error("OVS-DPDK: {0}: {1}")]
    Step(String, String),
}

/// A running OVS-DPDK; stopped on drop.
pub struct Ovs {
    dir: PathBuf,
}

impl Ovs {
    /// Starts OVS-DPDK in `dir` with its PMD on `pmd_cpu` and its other
    /// threads on `other_cpu`; a bridge whose ports connect to
    /// `servers` (virtio-user sockets in server mode).
    pub fn start(
        dir: &Path,
        prefix: &str,
        pmd_cpu: usize,
        other_cpu: usize,
        servers: &[PathBuf],
    ) -> Result<Ovs, OvsError> {
        if !Path::new(VSWITCHD).exists() {
            return Err(OvsError::Missing);
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| OvsError::Step(dir.display().to_string(), e.to_string()))?;
        let ovs = Ovs {
            dir: dir.to_path_buf(),
        };
        let d = dir.display().to_string();
        let db = format!("{d}/conf.db");
        let _ = std::fs::remove_file(&db);
        ovs.run("ovsdb-tool", &["create", &db, SCHEMA])?;
        ovs.run(
            "ovsdb-server",
            &[
                &db,
                &format!("--remote=punix:{d}/db.sock"),
                &format!("--pidfile={d}/ovsdb.pid"),
                &format!("--unixctl={d}/ovsdb.ctl"),
                "--detach",
                &format!("--log-file={d}/ovsdb.log"),
            ],
        )?;
        ovs.vsctl(&["--no-wait", "init"])?;
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:dpdk-init=true",
            &format!("other_config:dpdk-lcore-mask={:#x}", 1u64 << other_cpu),
            &format!("other_config:pmd-cpu-mask={:#x}", 1u64 << pmd_cpu),
            "other_config:dpdk-socket-mem=128",
            &format!(
                "other_config:dpdk-extra=--file-prefix={prefix} --no-pci --single-file-segments"
            ),
        ])?;
        ovs.run(
            VSWITCHD,
            &[
                &format!("unix:{d}/db.sock"),
                &format!("--pidfile={d}/vswitchd.pid"),
                &format!("--unixctl={d}/vswitchd.ctl"),
                "--detach",
                &format!("--log-file={d}/vswitchd.log"),
            ],
        )?;
        ovs.vsctl(&[
            "add-br",
            "br0",
            "--",
            "set",
            "bridge",
            "br0",
            "datapath_type=netdev",
        ])?;
        for (i, s) in servers.iter().enumerate() {
            ovs.vsctl(&[
                "add-port",
                "br0",
                &format!("vhu{i}"),
                "--",
                "set",
                "Interface",
                &format!("vhu{i}"),
                "type=dpdkvhostuserclient",
                &format!("options:vhost-server-path={}", s.display()),
            ])?;
        }
        Ok(ovs)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), OvsError> {
        let out = Command::new(program)
            .args(args)
            .env("OVS_RUNDIR", &self.dir)
            .env("OVS_LOGDIR", &self.dir)
            .env("OVS_DBDIR", &self.dir)
            .output()
            .map_err(|e| OvsError::Step(program.into(), e.to_string()))?;
        if !out.status.success() {
            return Err(OvsError::Step(
                format!("{program} {}", args.join(" ")),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    fn vsctl(&self, args: &[&str]) -> Result<(), OvsError> {
        let db = format!("--db=unix:{}/db.sock", self.dir.display());
        let mut all = vec![db.as_str(), "--timeout=30"];
        all.extend_from_slice(args);
        self.run("ovs-vsctl", &all)
    }

    /// The MAC table (`ovs-appctl fdb/show br0`).
    pub fn fdb(&self) -> String {
        Command::new("ovs-appctl")
            .args([
                "-t",
                &format!("{}/vswitchd.ctl", self.dir.display()),
                "fdb/show",
                "br0",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    fn stop(&self) {
        for pidfile in ["vswitchd.pid", "ovsdb.pid"] {
            let Ok(pid) = std::fs::read_to_string(self.dir.join(pidfile)) else {
                continue;
            };
            let Ok(pid) = pid.trim().parse::<i32>() else {
                continue;
            };
            // SAFETY: kill(2) on the daemon this run started (its pidfile).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t0 = Instant::now();
            // SAFETY: signal 0 only probes whether the process is there.
            while unsafe { libc::kill(pid, 0) } == 0 && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        self.stop();
    }
}
