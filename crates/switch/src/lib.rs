//! nfvisor switch: an L2 learning switch whose ports are vhost-user
//! backends (a VM's virtio-net, DPDK's virtio-user) or a TAP, forwarded by
//! busy-polling threads (PMDs) pinned to their CPUs, as a DPDK switch
//! does.
//!
//! - [`port`]: a port, its vhost-user protocol (the rust-vmm
//!   `vhost-user-backend` crate's daemon) and counters;
//! - [`pmd`]: the data path, one copy per frame and destination;
//! - [`fdb`]: the MAC table;
//! - [`control`]: the typed requests (`switch-ctl`, the control socket).
//!
//! Ports come and go at run time; the PMDs see the port table change
//! through a generation counter, and each port's rings through its own.

pub mod control;
pub mod dirty_log;
pub mod fdb;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod pmd;
pub mod port;
pub mod ring;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use control::{Request, Response};
pub use fdb::{mac_text, Fdb};
pub use port::{parse_port, Port, PortCounters, PortKind, PortSpec};

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("--ports {0:?}: {1}")]
    Ports(String, String),
    #[error("--socket-dir {0}: {1}")]
    SocketDir(PathBuf, String),
    #[error("port {0}: {1}")]
    Port(String, String),
    #[error("--cpus: {0}")]
    Cpus(String),
    #[error("control socket {0}: {1}")]
    Control(PathBuf, String),
}

/// Parses `a,b,c=client:/run/x.sock`.
pub fn parse_ports(list: &str) -> Result<Vec<PortSpec>, SwitchError> {
    let bad = |why: String| SwitchError::Ports(list.to_string(), why);
    let mut ports: Vec<PortSpec> = Vec::new();
    for item in list.split(',') {
        let spec = parse_port(item).map_err(bad)?;
        if ports.iter().any(|p| p.name == spec.name) {
            return Err(bad(format!("port {:?} twice", spec.name)));
        }
        ports.push(spec);
    }
    Ok(ports)
}

/// How the switch is set up.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    pub socket_dir: PathBuf,
    pub ports: Vec<PortSpec>,
    /// One PMD per CPU (an unpinned one when empty).
    pub cpus: Vec<usize>,
    /// The PMDs' SCHED_FIFO priority.
    pub rt_priority: Option<u8>,
    pub ageing: Duration,
}

/// Where a PMD runs (read back), and each setting's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PmdPlacement {
    pub index: usize,
    pub tid: i32,
    pub cpus: Vec<usize>,
    pub policy: String,
    pub priority: i32,
    pub settings: Vec<(String, Result<String, String>)>,
}

/// What the control side of a running switch holds.
pub struct SwitchState {
    shared: Arc<pmd::Shared>,
    stop: Arc<AtomicBool>,
    socket_dir: PathBuf,
    pmds: usize,
    placements: Mutex<Vec<Option<PmdPlacement>>>,
    /// (add-port and del-port one at a time)
    changing: Mutex<()>,
}

/// A running switch.
pub struct Switch {
    pub state: Arc<SwitchState>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Switch {
    /// Checks the configuration, then serves every port and starts the
    /// PMDs.
    pub fn start(config: SwitchConfig) -> Result<Switch, SwitchError> {
        let dir = &config.socket_dir;
        if !dir.is_dir() {
            return Err(SwitchError::SocketDir(
                dir.clone(),
                "not a directory (create it first)".into(),
            ));
        }
        if config.ports.len() < 2 {
            let names: Vec<&str> = config.ports.iter().map(|p| p.name.as_str()).collect();
            return Err(SwitchError::Ports(
                names.join(","),
                "a switch needs two ports at least".into(),
            ));
        }
        check_pmd_cpus(&config.cpus)?;
        if config.rt_priority.is_some() && config.cpus.is_empty() {
            return Err(SwitchError::Cpus(
                "--rt-priority needs --cpus: a SCHED_FIFO poller must be kept to its own CPU"
                    .into(),
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pmds = config.cpus.len().max(1);
        let state = Arc::new(SwitchState {
            shared: Arc::new(pmd::Shared {
                ports: RwLock::new(Vec::new()),
                table_generation: AtomicU64::new(0),
                fdb: Mutex::new(Fdb::default()),
                ageing: config.ageing,
                moves: AtomicU64::new(0),
                rounds: (0..pmds)
                    .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                    .collect(),
                seen: (0..pmds).map(|_| AtomicU64::new(0)).collect(),
                alive: (0..pmds).map(|_| AtomicBool::new(false)).collect(),
            }),
            stop: stop.clone(),
            socket_dir: dir.clone(),
            pmds,
            placements: Mutex::new(vec![None; pmds]),
            changing: Mutex::new(()),
        });
        for spec in &config.ports {
            if let Err(e) = state.add_port(spec) {
                state.end_ports();
                return Err(e);
            }
        }
        let mut threads = Vec::new();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for index in 0..pmds {
            let st = state.clone();
            let cpu = config.cpus.get(index).copied();
            let prio = config.rt_priority;
            let started = started_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("switch-pmd{index}"))
                .spawn(move || {
                    let placed = place(index, cpu, prio);
                    st.placements.lock().unwrap_or_else(|e| e.into_inner())[index] = Some(placed);
                    // (placed first: the filter has no scheduler calls)
                    if let Err(e) = seccomp::enter(seccomp::Role::SwitchPmd) {
                        let _ = started.send(Err(format!("PMD {index}: {e}")));
                        return;
                    }
                    // (marked dead however it ends, a panic included)
                    struct Alive<'a>(&'a AtomicBool);
                    impl Drop for Alive<'_> {
                        fn drop(&mut self) {
                            self.0.store(false, Ordering::Release);
                        }
                    }
                    let alive = &st.shared.alive[index];
                    alive.store(true, Ordering::Release);
                    let _alive = Alive(alive);
                    let _ = started.send(Ok(()));
                    pmd::run(index, &st.shared, &st.stop)
                })
                .map_err(|e| SwitchError::Cpus(format!("starting PMD {index}: {e}")));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let mut sw = Switch { state, threads };
                    sw.stop();
                    return Err(e);
                }
            }
        }
        // every PMD placed and under its filter before the switch says it
        // serves (its report is whole; one that cannot start is an error)
        drop(started_tx);
        let mut sw = Switch { state, threads };
        for _ in 0..pmds {
            match started_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    sw.stop();
                    return Err(SwitchError::Cpus(e));
                }
                Err(_) => {
                    sw.stop();
                    return Err(SwitchError::Cpus("a PMD did not start within 10 s".into()));
                }
            }
        }
        Ok(sw)
    }

    /// Stops the PMDs and the ports.
    pub fn stop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.state.end_ports();
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop();
    }
}

impl SwitchState {
    /// The live ports, with their slots.
    pub fn ports(&self) -> Vec<(usize, Arc<Port>)> {
        self.shared
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.clone()?)))
            .collect()
    }

    pub fn placements(&self) -> Vec<PmdPlacement> {
        self.placements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// (MAC, port name, seconds since seen).
    pub fn fdb(&self) -> Vec<([u8; 6], String, f64)> {
        let ports = self.shared.ports.read().unwrap_or_else(|e| e.into_inner());
        let name = |slot: usize| {
            ports
                .get(slot)
                .and_then(|p| p.as_ref())
                .map(|p| p.name.clone())
                .unwrap_or_default()
        };
        // (copied out under the lock the PMDs take each burst; aged,
        // sorted and named outside it)
        let snapshot = self
            .shared
            .fdb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot();
        fdb::live(snapshot, self.shared.ageing)
            .into_iter()
            .map(|(m, slot, age)| (m, name(slot), age))
            .collect()
    }

    /// Each PMD's polling time so far and the part of it spent in rounds
    /// that moved frames, in nanoseconds (the busy-poll fraction, between
    /// two readings).
    pub fn pmd_time(&self) -> Vec<(u64, u64)> {
        self.shared
            .rounds
            .iter()
            .map(|(r, b)| (r.load(Ordering::Relaxed), b.load(Ordering::Relaxed)))
            .collect()
    }

    /// Frames whose source address moved to another port.
    pub fn fdb_moves(&self) -> u64 {
        self.shared.moves.load(Ordering::Relaxed)
    }

    /// Adds a port (served at once; the PMD with the fewest ports polls
    /// it).
    pub fn add_port(&self, spec: &PortSpec) -> Result<(), SwitchError> {
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.ports();
        if live.iter().any(|(_, p)| p.name == spec.name) {
            return Err(SwitchError::Port(
                spec.name.clone(),
                "a port of that name exists".into(),
            ));
        }
        if let PortKind::Tap(t) = &spec.kind {
            if live
                .iter()
                .any(|(_, p)| matches!(&p.kind, PortKind::Tap(o) if o == t))
            {
                return Err(SwitchError::Port(
                    spec.name.clone(),
                    format!("TAP {t} is another port's"),
                ));
            }
        }
        let mut load = vec![0usize; self.pmds];
        for (_, p) in &live {
            load[p.pmd] += 1;
        }
        // (a PMD that ended polls nothing: not given ports; before the
        // PMDs start, all are candidates)
        let alive: Vec<usize> = (0..self.pmds)
            .filter(|&i| self.shared.alive[i].load(Ordering::Acquire))
            .collect();
        let candidates = if alive.is_empty() {
            (0..self.pmds).collect()
        } else {
            alive
        };
        let pmd = candidates.into_iter().min_by_key(|&i| load[i]).unwrap_or(0);
        let port = Port::start(spec, &self.socket_dir, pmd, self.stop.clone())?;
        {
            let mut table = self.shared.ports.write().unwrap_or_else(|e| e.into_inner());
            match table.iter().position(Option::is_none) {
                Some(hole) => table[hole] = Some(port),
                None => table.push(Some(port)),
            }
        }
        self.shared.table_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Removes a port: the PMDs stop using it, its frontend is cut off,
    /// what the table learnt on it is forgotten.
    pub fn del_port(&self, name: &str) -> Result<(), SwitchError> {
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, port) = {
            let mut table = self.shared.ports.write().unwrap_or_else(|e| e.into_inner());
            let slot = table
                .iter()
                .position(|p| p.as_ref().is_some_and(|p| p.name == name))
                .ok_or_else(|| SwitchError::Port(name.to_string(), "no such port".into()))?;
            (slot, table[slot].take().expect("the slot found"))
        };
        let generation = self.shared.table_generation.fetch_add(1, Ordering::AcqRel) + 1;
        // every live PMD past its last burst with the port (so none learns
        // an address on its slot again, touches its memory, or holds its
        // TAP) before what was learnt there is forgotten and the port ends
        let t0 = std::time::Instant::now();
        while (0..self.pmds).any(|i| {
            self.shared.alive[i].load(Ordering::Acquire)
                && self.shared.seen[i].load(Ordering::Acquire) < generation
        }) {
            if t0.elapsed() > Duration::from_secs(2) {
                tracing::warn!("del-port {name}: a PMD did not take the new port table within 2 s");
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.shared
            .fdb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_port(slot);
        port.remove();
        Ok(())
    }

    fn end_ports(&self) {
        for (_, p) in self.ports() {
            p.remove();
        }
    }

    /// The MAC table as JSON: [{mac, port, age_s}].
    pub fn fdb_json(&self) -> serde_json::Value {
        self.fdb()
            .iter()
            .map(|(m, p, age)| serde_json::json!({"mac": mac_text(m), "port": p, "age_s": age}))
            .collect()
    }

    /// The counters, the table and the PMDs as one JSON document.
    pub fn report(&self) -> serde_json::Value {
        let ports: serde_json::Map<String, serde_json::Value> = self
            .ports()
            .into_iter()
            .map(|(_, p)| {
                let mut c: serde_json::Map<String, serde_json::Value> = p
                    .counters
                    .named()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.into()))
                    .collect();
                c.insert("kind".into(), kind_text(&p.kind).into());
                c.insert("pmd".into(), p.pmd.into());
                if let Some(s) = &p.socket {
                    c.insert("socket".into(), s.display().to_string().into());
                }
                (p.name.clone(), c.into())
            })
            .collect();
        serde_json::json!({
            "ports": ports,
            "fdb": self.fdb_json(),
            "fdb_moves": self.fdb_moves(),
            "pmds": self.placements(),
            "seccomp": {
                "mode": seccomp::mode().to_string(),
                "filtered_threads": seccomp::filtered_threads(),
            },
            "pmd_time": self.pmd_time().iter().map(|(ns, busy)| {
                serde_json::json!({"polled_ns": ns, "busy_ns": busy})
            }).collect::<Vec<_>>(),
        })
    }
}

/// "server", "client", "tap".
pub fn kind_text(k: &PortKind) -> &'static str {
    match k {
        PortKind::Server => "server",
        PortKind::Client(_) => "client",
        PortKind::Tap(_) => "tap",
    }
}

/// The PMDs' CPUs: each on the host, none twice, none already taken by
/// another busy poller at SCHED_FIFO (a thread pinned there alone).
fn check_pmd_cpus(cpus: &[usize]) -> Result<(), SwitchError> {
    rt::check_cpus_exist(cpus).map_err(|e| SwitchError::Cpus(e.to_string()))?;
    for (i, c) in cpus.iter().enumerate() {
        if cpus[..i].contains(c) {
            return Err(SwitchError::Cpus(format!(
                "CPU {c} twice (one PMD per CPU)"
            )));
        }
    }
    if let Some((cpu, who)) = fifo_poller_on(cpus) {
        return Err(SwitchError::Cpus(format!(
            "CPU {cpu} already has a SCHED_FIFO thread pinned to it alone ({who}): \
             two pollers on one CPU starve each other"
        )));
    }
    Ok(())
}

/// A SCHED_FIFO thread of any process pinned to exactly one of `cpus`:
/// (the CPU, "thread TID (NAME) of process PID").
fn fifo_poller_on(cpus: &[usize]) -> Option<(usize, String)> {
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // (policy: field 41 of stat)
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            // (flags: field 9; kernel threads, pinned per CPU, are not
            // pollers)
            let field = |n: usize| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(n - 3))
                    .and_then(|f| f.parse::<u64>().ok())
            };
            const PF_KTHREAD: u64 = 0x0020_0000;
            if field(41) != Some(libc::SCHED_FIFO as u64)
                || field(9).is_none_or(|f| f & PF_KTHREAD != 0)
            {
                continue;
            }
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(|l| rt::parse_cpu_list(l.trim()).ok())
                .unwrap_or_default();
            if allowed.len() == 1 && cpus.contains(&allowed[0]) {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                return Some((
                    allowed[0],
                    format!("thread {tid} ({}) of process {pid}", comm.trim()),
                ));
            }
        }
    }
    None
}

/// Pins the calling thread and makes it SCHED_FIFO as asked; reads back.
fn place(index: usize, cpu: Option<usize>, prio: Option<u8>) -> PmdPlacement {
    let mut settings = Vec::new();
    if let Some(c) = cpu {
        settings.push((
            "cpu".to_string(),
            rt::pin_current_thread(&[c])
                .map(|()| format!("pinned to CPU {c}"))
                .map_err(|e| e.to_string()),
        ));
    }
    if let Some(p) = prio {
        settings.push((
            "rt-priority".to_string(),
            rt::set_current_thread_fifo(p as i32)
                .map(|()| format!("SCHED_FIFO {p}"))
                .map_err(|e| e.to_string()),
        ));
    }
    let here = rt::current_thread_sched().ok();
    PmdPlacement {
        index,
        tid: rt::current_tid(),
        cpus: here.as_ref().map(|h| h.cpus.clone()).unwrap_or_default(),
        policy: here.as_ref().map(|h| h.policy.clone()).unwrap_or_default(),
        priority: here.map(|h| h.priority).unwrap_or(0),
        settings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_parse_and_bad_ones_are_named() {
        let p = parse_ports("vnf1,vnf2,ovs=client:/run/x.sock").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].kind, PortKind::Client(PathBuf::from("/run/x.sock")));
        for (bad, why) in [
            ("a,a", "twice"),
            ("a,b/c", "port name"),
            ("a,b=server:/x", "NAME=client:PATH"),
            ("a,", "port name"),
        ] {
            let e = parse_ports(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn pmd_cpus_twice_or_off_the_host_are_refused() {
        let e = check_pmd_cpus(&[0, 0]).unwrap_err().to_string();
        assert!(e.contains("CPU 0 twice"), "{e}");
        let e = check_pmd_cpus(&[4096]).unwrap_err().to_string();
        assert!(e.contains("4096"), "{e}");
    }
}
