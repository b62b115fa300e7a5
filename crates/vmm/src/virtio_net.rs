//! virtio-net in a VM: the device (virtio::net on a TAP, or
//! virtio::vhost_user_net served by a vhost-user backend), its `--net`
//! spec, attached as every virtio device is (`virtio_pci`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::VmFd;

use crate::device_manager::DeviceManager;
use crate::irq_routes::GsiRoutes;
use crate::memory::GuestRam;
use crate::{Error, Result};

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq)]
pub enum TapSource {
    /// A TAP by name (opened, or created where this process may).
    Name(String),
    /// A TAP a parent process opened and handed over: one descriptor per
    /// queue pair.
    Fd(Vec<i32>),
    /// A vhost-user backend at this socket: this process connects to it,
    /// or (server) listens there for it.
    VhostUser { socket: PathBuf, server: bool },
}

/// How long start-up waits for a vhost-user backend.
pub const VHOST_USER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One `--net`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetSpec {
    pub tap: TapSource,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
    /// Rate limits: frames a second and bytes a second, each way.
    pub rx_pps: Option<u64>,
    pub rx_bw: Option<u64>,
    pub tx_pps: Option<u64>,
    pub tx_bw: Option<u64>,
    /// Queue pairs.
    pub queues: u16,
    /// TAP NICs: how the queue workers wait (event or poll).
    pub mode: virtio::net::NetMode,
    /// TAP NICs: the queue workers' host CPUs, and their SCHED_FIFO
    /// priority.
    pub cpus: Vec<usize>,
    pub rt_priority: Option<u8>,
    /// TAP NICs: the offloads offered, and mergeable receive buffers.
    pub offloads: virtio::net::Offloads,
    pub mrg_rxbuf: bool,
}

/// The MTUs a NIC takes.
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 68..=9216;

/// Parses `tap=NAME[,queues=N][,mode=event|poll][,cpus=L][,rt-priority=P]
/// [,offload=csum+tso4+tso6+uso][,mrg-rxbuf=on][,mac=52:54:..][,mtu=N]
/// [,rates]`, `fd=N[:N..][,...]` (one descriptor
/// per queue pair) or `vhost-user=SOCKET[,mode=client|server][,queues=N]
/// [,mac=..][,mtu=N]`. CPU lists take `+` where a list would take `,`
/// (`cpus=2-3+6`).
pub fn parse_net(spec: &str) -> Result<NetSpec> {
    let bad = |why: String| Error::Config(format!("--net {spec:?}: {why}"));
    let (mut tap, mut mac, mut mtu) = (None, None, None);
    let mut mode: Option<&str> = None;
    let mut queues: Option<u16> = None;
    let mut cpus = Vec::new();
    let mut rt_priority = None;
    let mut offloads = None;
    let mut mrg_rxbuf = None;
    let mut limits: [Option<u64>; 4] = [None; 4];
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tap", n)) if !n.is_empty() => tap = Some(TapSource::Name(n.to_string())),
            Some(("fd", n)) => {
                let fds = n
                    .split(':')
                    .map(|f| {
                        f.parse::<i32>()
                            .ok()
                            .filter(|&f| f >= 0)
                            .ok_or_else(|| bad(format!("fd {f:?} is not a descriptor number")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                tap = Some(TapSource::Fd(fds));
            }
            Some(("vhost-user", p)) if !p.is_empty() => {
                tap = Some(TapSource::VhostUser {
                    socket: PathBuf::from(p),
                    server: false,
                })
            }
            Some(("mode", m)) => mode = Some(m),
            Some(("queues", q)) => {
                let max = virtio::net_ctrl::MAX_PAIRS;
                queues = Some(
                    q.parse::<u16>()
                        .ok()
                        .filter(|n| (1..=max).contains(n))
                        .ok_or_else(|| bad(format!("queues {q:?}: queue pairs, 1 to {max}")))?,
                );
            }
            Some(("offload", o)) => {
                offloads = Some(virtio::net::Offloads::parse(o).map_err(bad)?);
            }
            Some(("mrg-rxbuf", m)) => {
                mrg_rxbuf = Some(match m {
                    "on" => true,
                    "off" => false,
                    m => return Err(bad(format!("mrg-rxbuf {m:?}: on or off"))),
                });
            }
            Some(("cpus", c)) => {
                cpus = rt::parse_cpu_list(&c.replace('+', ","))
                    .map_err(|e| bad(format!("cpus {c:?}: {e}")))?;
            }
            Some(("rt-priority", p)) => {
                rt_priority = Some(
                    p.parse::<u8>()
                        .ok()
                        .filter(|p| (1..=99).contains(p))
                        .ok_or_else(|| {
                            bad(format!("rt-priority {p:?}: SCHED_FIFO priorities are 1 to 99"))
                        })?,
                );
            }
            Some(("mac", m)) => mac = Some(virtio::net::parse_mac(m).map_err(bad)?),
            Some(("mtu", m)) => {
                mtu = Some(
                    m.parse::<u16>()
                        .ok()
                        .filter(|v| MTU_RANGE.contains(v))
                        .ok_or_else(|| {
                            bad(format!(
                                "mtu {m:?} is not from {} to {}",
                                MTU_RANGE.start(),
                                MTU_RANGE.end()
                            ))
                        })?,
                )
            }
            Some((k @ ("rx-pps" | "tx-pps" | "rx-bw" | "tx-bw"), v)) => {
                let n = if k.ends_with("pps") {
                    v.parse::<u64>().ok()
                } else {
                    crate::config::parse_size(v).ok()
                }
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    bad(format!(
                        "{k} {v:?}: a positive number (frames a second; bytes a second for -bw, K/M/G)"
                    ))
                })?;
                let i = ["rx-pps", "rx-bw", "tx-pps", "tx-bw"]
                    .iter()
                    .position(|x| *x == k)
                    .expect("a rate key");
                limits[i] = Some(n);
            }
            _ => {
                return Err(bad(format!(
                    "unknown part {part:?} (use tap=NAME, fd=N or vhost-user=SOCKET, then mac=, mtu=, queues=, mode=; for a TAP cpus=, rt-priority=, offload=, mrg-rxbuf=, rx-pps=, rx-bw=, tx-pps=, tx-bw=)"
                )))
            }
        }
    }
    let mut tap = tap.ok_or_else(|| bad("no tap=NAME, fd=N or vhost-user=SOCKET".into()))?;
    let vhost_user = matches!(tap, TapSource::VhostUser { .. });
    let mut net_mode = virtio::net::NetMode::Event;
    match (&mut tap, mode) {
        (TapSource::VhostUser { server: s, .. }, Some(m)) => {
            *s = match m {
                "client" => false,
                "server" => true,
                m => {
                    return Err(bad(format!(
                        "mode {m:?}: client (connect to the backend) or server (listen for it)"
                    )))
                }
            }
        }
        (_, Some("event")) => {}
        (_, Some("poll")) => net_mode = virtio::net::NetMode::Poll,
        (TapSource::VhostUser { .. }, None) => {}
        (_, Some(m)) => {
            return Err(bad(format!(
                "mode {m:?}: event (the workers wait for frames and kicks) or poll (they busy-poll; needs cpus=); client and server are for vhost-user="
            )))
        }
        (_, None) => {}
    }
    let queues = match (&tap, queues) {
        (TapSource::Fd(fds), Some(q)) if fds.len() != q as usize => {
            return Err(bad(format!(
                "queues={q} with {} descriptors in fd=: one descriptor per queue pair",
                fds.len()
            )))
        }
        (TapSource::Fd(fds), _) => {
            let max = virtio::net_ctrl::MAX_PAIRS as usize;
            if fds.len() > max {
                return Err(bad(format!(
                    "{} descriptors in fd=: queue pairs, 1 to {max}",
                    fds.len()
                )));
            }
            fds.len() as u16
        }
        (_, q) => q.unwrap_or(1),
    };
    if vhost_user && (offloads.is_some() || mrg_rxbuf.is_some()) {
        return Err(bad(
            "offload= and mrg-rxbuf= are for TAP NICs: a vhost-user NIC's features are its backend's".into(),
        ));
    }
    if vhost_user && (!cpus.is_empty() || rt_priority.is_some()) {
        return Err(bad(
            "cpus= and rt-priority= place a TAP NIC's queue workers; a vhost-user NIC's queues run in its backend".into(),
        ));
    }
    if net_mode == virtio::net::NetMode::Poll && cpus.is_empty() {
        return Err(bad(
            "mode=poll needs cpus=: a busy-polling worker takes a whole CPU, so say which".into(),
        ));
    }
    if (net_mode == virtio::net::NetMode::Poll || rt_priority.is_some())
        && !cpus.is_empty()
        && cpus.len() < queues as usize
    {
        // two busy or FIFO workers of one priority on a CPU: the second
        // never runs
        return Err(bad(format!(
            "{} CPU(s) in cpus= for {queues} queue pairs: a polling or SCHED_FIFO worker needs a CPU of its own, one per pair",
            cpus.len()
        )));
    }
    if let TapSource::Fd(fds) = &tap {
        if let Some(d) = fds
            .iter()
            .enumerate()
            .find_map(|(i, f)| fds[..i].contains(f).then_some(f))
        {
            return Err(bad(format!(
                "fd {d} twice in fd=: one descriptor per queue pair"
            )));
        }
    }
    if rt_priority.is_some() && cpus.is_empty() {
        return Err(bad(
            "rt-priority= needs cpus=: a SCHED_FIFO worker must be kept off other CPUs".into(),
        ));
    }
    if limits.iter().any(Option::is_some) && (queues > 1 || net_mode == virtio::net::NetMode::Poll)
    {
        return Err(bad(
            "rate limits (rx-pps, rx-bw, tx-pps, tx-bw) are for one queue pair in event mode (not yet with queues= above 1 or mode=poll)".into(),
        ));
    }
    if vhost_user && limits.iter().any(Option::is_some) {
        // the frames never pass through this process: the backend (the
        // switch) is where a port's rate is limited
        return Err(bad(
            "rate limits (rx-pps, rx-bw, tx-pps, tx-bw) are for TAP NICs: a vhost-user NIC's frames never pass through nfvisor; limit the switch port".into(),
        ));
    }
    Ok(NetSpec {
        tap,
        mac,
        mtu,
        rx_pps: limits[0],
        rx_bw: limits[1],
        tx_pps: limits[2],
        tx_bw: limits[3],
        queues,
        mode: net_mode,
        cpus,
        rt_priority,
        offloads: offloads.unwrap_or_default(),
        mrg_rxbuf: mrg_rxbuf.unwrap_or(false),
    })
}

crate::virtio_kind!(NetKind, "virtio-net", 1, "the link's state, MAC and MTU");

/// Attaches a NIC as `spec` says, as device `net<index>`.
pub fn attach(
    dm: &mut DeviceManager,
    vm: &Arc<VmFd>,
    gsi_routes: Arc<GsiRoutes>,
    mem: &GuestRam,
    spec: &NetSpec,
    index: usize,
) -> Result<()> {
    let mac = spec.mac.unwrap_or([
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]);
    let name = format!("net{index}");
    if let TapSource::Name(n) = &spec.tap {
        // an orchestrator makes the TAP (and its bridge or switch port)
        // first: a name that is not there is a mistake, not a request for
        // a fresh unconnected TAP
        if n.is_empty()
            || n.contains('/')
            || !std::path::Path::new("/sys/class/net").join(n).exists()
        {
            return Err(Error::Config(format!(
                "--net: TAP {n:?} does not exist (create it first: ip tuntap add dev {n} mode tap)"
            )));
        }
    }
    if !spec.cpus.is_empty() {
        rt::check_cpus_exist(&spec.cpus)
            .map_err(|e| Error::Config(format!("--net {name} cpus=: {e}")))?;
    }
    let taps = match &spec.tap {
        TapSource::Name(n) => virtio::tap::Tap::open_queues(n, spec.queues as usize),
        TapSource::Fd(fds) => virtio::tap::Tap::from_fds(fds),
        TapSource::VhostUser { socket, server } => {
            let net = virtio::vhost_user_net::VhostUserNet::<GuestRam>::new(
                &name,
                virtio::vhost_user_net::VhostUserNetConfig {
                    socket: socket.clone(),
                    server: *server,
                    mac,
                    mtu: spec.mtu,
                    pairs: spec.queues,
                    connect_timeout: VHOST_USER_CONNECT_TIMEOUT,
                },
            )
            .map_err(|e| Error::Config(format!("--net: {e}")))?;
            tracing::info!(
                "{name}: vhost-user {} ({}) mac {}",
                socket.display(),
                if *server { "server" } else { "client" },
                mac_text(&mac)
            );
            crate::virtio_pci::attach::<NetKind>(dm, vm, gsi_routes, mem, &name, Box::new(net))?;
            return Ok(());
        }
    }
    .map_err(|e| Error::Config(format!("--net: {e}")))?;
    if spec.offloads.uso {
        use virtio::tap::{TUN_F_CSUM, TUN_F_USO4, TUN_F_USO6};
        let probe = taps[0]
            .set_offloads(TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6)
            .and_then(|()| taps[0].set_offloads(0));
        if let Err(e) = probe {
            return Err(Error::Config(format!(
                "--net {name} offload=uso: this host's TAP cannot take UDP segmentation offload (Linux 6.2 and later): {e}"
            )));
        }
    }
    tracing::info!(
        "{name}: TAP {} ({} queue pair(s), {:?} mode) mac {}",
        taps[0].name,
        taps.len(),
        spec.mode,
        mac_text(&mac)
    );
    let net: virtio::net::Net<GuestRam> = virtio::net::Net::new(
        taps,
        virtio::net::NetConfig {
            mac,
            mtu: spec.mtu,
            rx_pps: spec.rx_pps,
            rx_bw: spec.rx_bw,
            tx_pps: spec.tx_pps,
            tx_bw: spec.tx_bw,
            pairs: spec.queues,
            mode: spec.mode,
            cpus: spec.cpus.clone(),
            rt_priority: spec.rt_priority,
            offloads: spec.offloads,
            mrg_rxbuf: spec.mrg_rxbuf,
        },
    )
    .map_err(|e| Error::Config(format!("--net: {e}")))?;
    crate::virtio_pci::attach::<NetKind>(dm, vm, gsi_routes, mem, &name, Box::new(net))?;
    Ok(())
}

use virtio::net::mac_text;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_specs_parse_and_bad_ones_are_named() {
        let n = parse_net("tap=nfv0,mac=52:54:00:aa:bb:cc,mtu=9000,tx-bw=1M,rx-pps=1000").unwrap();
        assert_eq!(
            (n.tx_bw, n.rx_pps, n.rx_bw),
            (Some(1 << 20), Some(1000), None)
        );
        assert_eq!(n.tap, TapSource::Name("nfv0".into()));
        assert_eq!(n.mtu, Some(9000));
        assert_eq!(parse_net("fd=3").unwrap().tap, TapSource::Fd(vec![3]));
        let q = parse_net("fd=3:4:5:6").unwrap();
        assert_eq!((q.tap, q.queues), (TapSource::Fd(vec![3, 4, 5, 6]), 4));
        let p = parse_net("tap=t0,queues=2,mode=poll,cpus=2-3,rt-priority=80").unwrap();
        assert_eq!(
            (p.queues, p.mode, p.cpus, p.rt_priority),
            (2, virtio::net::NetMode::Poll, vec![2, 3], Some(80))
        );
        assert_eq!(
            parse_net("vhost-user=/run/sw/a.sock,mode=server")
                .unwrap()
                .tap,
            TapSource::VhostUser {
                socket: "/run/sw/a.sock".into(),
                server: true
            }
        );
        for (bad, why) in [
            ("mac=52:54:00:aa:bb:cc", "no tap=NAME"),
            ("tap=x,mac=52:54", "MAC \"52:54\""),
            ("tap=x,mtu=20", "mtu \"20\""),
            ("tap=x,mtu=100000", "mtu \"100000\""),
            ("fd=-1", "fd \"-1\""),
            ("tap=x,speed=10G", "unknown part"),
            ("tap=x,tx-pps=0", "tx-pps \"0\""),
            ("tap=x,rx-bw=fast", "rx-bw \"fast\""),
            ("tap=x,mode=server", "mode \"server\""),
            ("tap=x,queues=0", "queues \"0\""),
            ("tap=x,queues=17", "queues \"17\""),
            ("fd=3:4,queues=3", "one descriptor per queue pair"),
            ("tap=x,mode=poll", "mode=poll needs cpus="),
            ("tap=x,rt-priority=80", "rt-priority= needs cpus="),
            ("tap=x,cpus=1,rt-priority=100", "rt-priority \"100\""),
            ("tap=x,cpus=zz", "cpus \"zz\""),
            ("tap=x,queues=2,tx-pps=10", "rate limits"),
            ("tap=x,mode=poll,cpus=1,tx-pps=10", "rate limits"),
            ("vhost-user=/s,cpus=1", "cpus= and rt-priority="),
            (
                "tap=x,queues=2,mode=poll,cpus=1",
                "1 CPU(s) in cpus= for 2 queue pairs",
            ),
            ("fd=3:4:3", "fd 3 twice"),
            ("tap=x,offload=tso4", "need csum"),
            ("tap=x,offload=csum+ufo", "UDP fragmentation"),
            ("tap=x,offload=gro", "offload \"gro\""),
            ("tap=x,mrg-rxbuf=yes", "mrg-rxbuf \"yes\""),
            ("vhost-user=/s,offload=csum", "offload= and mrg-rxbuf="),
            ("vhost-user=/s,mode=both", "mode \"both\""),
            ("vhost-user=/s,tx-pps=10", "rate limits"),
            ("vhost-user=/s,queues=0", "queues \"0\""),
            ("vhost-user=/s,queues=17", "queues \"17\""),
            ("vhost-user=", "unknown part"),
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
