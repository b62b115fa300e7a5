//! virtio-net in a VM: the device (virtio::net on a TAP) behind the modern
//! virtio-pci transport, attached through the device manager: a PCI slot,
//! BAR 1 (MSI-X) and BAR 4 (the virtio registers), one GSI per MSI-X
//! vector, one ioeventfd per queue at its notify address (a kick never
//! exits to this process), all moved when the guest moves the BARs.

use std::sync::{Arc, Weak};

use devices::pci::BarObserver;
use devices::MovableId;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio::pci::{VirtioBar, VirtioPci, MSIX_BAR, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, VIRTIO_BAR};
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::{BusLink, DeviceManager};
use crate::irq_routes::GsiRoutes;
use crate::memory::GuestRam;
use crate::{Error, Result};

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq)]
pub enum TapSource {
    /// A TAP by name (opened, or created where this process may).
    Name(String),
    /// A TAP a parent process opened and handed over.
    Fd(i32),
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetSpec {
    pub tap: TapSource,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
}

/// The MTUs a NIC takes.
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 68..=9216;

/// Parses `tap=NAME[,mac=52:54:..][,mtu=N]` or `fd=N[,mac=..][,mtu=N]`.
pub fn parse_net(spec: &str) -> Result<NetSpec> {
    let bad = |why: String| Error::Config(format!("--net {spec:?}: {why}"));
    let (mut tap, mut mac, mut mtu) = (None, None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tap", n)) if !n.is_empty() => tap = Some(TapSource::Name(n.to_string())),
            Some(("fd", n)) => {
                let fd = n
                    .parse::<i32>()
                    .ok()
                    .filter(|&f| f >= 0)
                    .ok_or_else(|| bad(format!("fd {n:?} is not a descriptor number")))?;
                tap = Some(TapSource::Fd(fd));
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
            _ => {
                return Err(bad(format!(
                    "unknown part {part:?} (use tap=NAME or fd=N, then mac=, mtu=)"
                )))
            }
        }
    }
    Ok(NetSpec {
        tap: tap.ok_or_else(|| bad("no tap=NAME or fd=N".into()))?,
        mac,
        mtu,
    })
}

/// A NIC as the VM keeps it: its transport, for state, counters and
/// migratability.
pub struct NetDevice {
    pub pci: Arc<VirtioPci<GuestRam>>,
}

impl devices::Persist for NetDevice {
    const KIND: &'static str = "virtio-net";
    const VERSION: u16 = 1;
    /// The transport's registers, MSI-X table, every queue's addresses and
    /// positions, and the link's state. The TAP is the host's: a
    /// destination attaches its own (`receive --net`).
    type State = virtio::pci::VirtioPciState;

    fn save(&self) -> Self::State {
        self.pci.save_state()
    }

    fn validate(s: &Self::State) -> std::result::Result<(), devices::state::BadField> {
        use devices::state::BadField;
        if s.config.len() != 64 {
            return Err(BadField::new(
                "config",
                format!("{} registers", s.config.len()),
                "a configuration space has 64",
            ));
        }
        if s.queues.len() != 2 {
            return Err(BadField::new(
                "queues",
                s.queues.len(),
                "virtio-net here has a receive and a transmit queue",
            ));
        }
        Ok(())
    }

    /// Checks the state against this device (MSI-X table size, queue
    /// sizes, features), then takes it.
    fn restore(&self, s: Self::State) -> std::result::Result<(), String> {
        self.pci
            .check_state(&s)
            .map_err(|(field, value, why)| format!("{field} = {value} is out of range: {why}"))?;
        self.pci.restore_state(s)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.pci.counters()
    }

    /// link-up, link-down.
    fn control(&self, action: &str) -> std::result::Result<String, String> {
        self.pci.control(action)
    }

    fn pause(&self) {
        self.pci.pause()
    }

    fn resume(&self) {
        self.pci.resume()
    }
}

/// Moves what backs the BARs with them: the bus ranges and the
/// notification ioeventfds.
struct NetBars {
    vm: Arc<VmFd>,
    kicks: Vec<(u16, EventFd)>,
    ranges: [MovableId; 2],
    io: BusLink,
}

fn notify_addr(bar4: u64, q: u16) -> IoEventAddress {
    IoEventAddress::Mmio(bar4 + NOTIFY_OFFSET + q as u64 * NOTIFY_MULTIPLIER as u64)
}

impl NetBars {
    fn register(&self, bar4: u64) -> Result<()> {
        for (q, k) in &self.kicks {
            self.vm
                .register_ioevent(k, &notify_addr(bar4, *q), NoDatamatch)
                .map_err(|e| Error::Kvm(format!("ioeventfd for virtio queue {q}: {e}")))?;
        }
        Ok(())
    }
}

impl BarObserver for NetBars {
    fn bar_moved(&self, bar: usize, from: Option<u64>, to: Option<u64>) {
        let range = match bar {
            MSIX_BAR => self.ranges[0],
            VIRTIO_BAR => self.ranges[1],
            _ => return,
        };
        if let Some(io) = self.io.get().and_then(Weak::upgrade) {
            io.mmio.move_to(range, to);
        }
        if bar == VIRTIO_BAR {
            if let Some(old) = from {
                for (q, k) in &self.kicks {
                    let _ = self
                        .vm
                        .unregister_ioevent(k, &notify_addr(old, *q), NoDatamatch);
                }
            }
            if let Some(new) = to {
                if let Err(e) = self.register(new) {
                    tracing::warn!("virtio-net: moving its notifications to {new:#x}: {e}");
                }
            }
        }
    }
}

/// Attaches a NIC as `spec` says, as device `net<index>`.
pub fn attach(
    dm: &mut DeviceManager,
    vm: &Arc<VmFd>,
    gsi_routes: Arc<GsiRoutes>,
    mem: &GuestRam,
    spec: &NetSpec,
    index: usize,
) -> Result<()> {
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
    let tap = match &spec.tap {
        TapSource::Name(n) => virtio::tap::Tap::open(n),
        TapSource::Fd(fd) => virtio::tap::Tap::from_fd(*fd),
    }
    .map_err(|e| Error::Config(format!("--net: {e}")))?;
    let mac = spec.mac.unwrap_or([
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]);
    tracing::info!(
        "net{index}: TAP {} mac {}",
        tap.name,
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    );
    let net: virtio::net::Net<GuestRam> =
        virtio::net::Net::new(tap, virtio::net::NetConfig { mac, mtu: spec.mtu });
    let queues = 2u32;
    let vectors = queues + 1;
    let slot = dm.resources.pci_slot()?;
    let bar1 = dm.resources.bar(devices::msix::BAR_SIZE, false)?;
    let bar4 = dm.resources.bar(virtio::pci::VIRTIO_BAR_SIZE, false)?;
    let first_gsi = dm.resources.gsis(vectors)?;
    let evts: Vec<EventFd> = (0..vectors)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::Device(format!("net{index}: interrupt eventfds: {e}")))?;
    let clones = evts
        .iter()
        .map(|e| e.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::Device(format!("net{index}: interrupt eventfds: {e}")))?;
    let name = format!("net{index}");
    // the legacy pin while MSI-X is off: one per NIC, from the IOAPIC's
    // PCI pins (16-23)
    let pin = 16 + index as u32;
    if pin > 23 {
        return Err(Error::Config(format!(
            "--net: at most 8 NICs (net{index} has no interrupt pin left)"
        )));
    }
    let pci = Arc::new(
        VirtioPci::new(
            &name,
            Box::new(net),
            mem.clone(),
            bar1,
            bar4,
            clones,
            pin as u8,
        )
        .map_err(Error::Device)?,
    );
    let router = crate::doorbell::OwnVectors::new(vm, gsi_routes, first_gsi, evts, pin, true)?;
    pci.msix.set_router(router);
    let msix_range = dm.attach_bar(bar1, devices::msix::BAR_SIZE, pci.msix.clone())?;
    let bar_range = dm.attach_bar(
        bar4,
        virtio::pci::VIRTIO_BAR_SIZE,
        Arc::new(VirtioBar(pci.clone())),
    )?;
    let bars = Arc::new(NetBars {
        vm: vm.clone(),
        kicks: pci.kick_fds(),
        ranges: [msix_range, bar_range],
        io: dm.bus_link.clone(),
    });
    bars.register(bar4)?;
    pci.set_bar_observer(bars.clone());
    dm.attach_pci(slot, pci.clone());
    dm.register(&name, Arc::new(NetDevice { pci }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_specs_parse_and_bad_ones_are_named() {
        let n = parse_net("tap=nfv0,mac=52:54:00:aa:bb:cc,mtu=9000").unwrap();
        assert_eq!(n.tap, TapSource::Name("nfv0".into()));
        assert_eq!(n.mtu, Some(9000));
        assert_eq!(parse_net("fd=3").unwrap().tap, TapSource::Fd(3));
        for (bad, why) in [
            ("mac=52:54:00:aa:bb:cc", "no tap=NAME"),
            ("tap=x,mac=52:54", "MAC \"52:54\""),
            ("tap=x,mtu=20", "mtu \"20\""),
            ("tap=x,mtu=100000", "mtu \"100000\""),
            ("fd=-1", "fd \"-1\""),
            ("tap=x,speed=10G", "unknown part"),
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
