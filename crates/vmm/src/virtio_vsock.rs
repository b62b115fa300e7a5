//! virtio-vsock in a VM: the device (virtio::vsock, hybrid: the host side on
//! a UNIX socket), its `--vsock` spec, attached as every virtio device is
//! (`virtio_pci`).

use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::device_manager::DeviceManager;
use crate::irq_routes::GsiRoutes;
use crate::memory::GuestRam;
use crate::{Error, Result};

/// One `--vsock`.
#[derive(Debug, Clone, PartialEq)]
pub struct VsockSpec {
    pub cid: u64,
    pub socket: PathBuf,
}

/// Parses `cid=N,socket=PATH`.
pub fn parse_vsock(spec: &str) -> Result<VsockSpec> {
    let bad = |why: String| Error::Config(format!("--vsock {spec:?}: {why}"));
    let (mut cid, mut socket) = (None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("cid", n)) => {
                cid = Some(
                    n.parse::<u64>()
                        .map_err(|_| bad(format!("cid {n:?} is not a number")))?,
                )
            }
            Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
            _ => {
                return Err(bad(format!(
                    "unknown part {part:?} (use cid=N,socket=PATH)"
                )))
            }
        }
    }
    let cid = cid.ok_or_else(|| bad("no cid=N".into()))?;
    if !(3..=u32::MAX as u64).contains(&cid) {
        return Err(bad(format!(
            "cid {cid}: from 3 to {} (0-2 are reserved; 2 is the host)",
            u32::MAX
        )));
    }
    Ok(VsockSpec {
        cid,
        socket: socket.ok_or_else(|| bad("no socket=PATH".into()))?,
    })
}

impl std::fmt::Display for VsockSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cid={},socket={}", self.cid, self.socket.display())
    }
}

crate::virtio_kind!(
    VsockKind,
    "virtio-vsock",
    1,
    "the guest's CID; connections are not carried: the guest is told TRANSPORT_RESET"
);

/// Attaches the vsock device as `vsock0`.
pub fn attach(
    dm: &mut DeviceManager,
    vm: &Arc<VmFd>,
    gsi_routes: Arc<GsiRoutes>,
    mem: &GuestRam,
    spec: &VsockSpec,
) -> Result<()> {
    let dev: virtio::vsock::Vsock<GuestRam> = virtio::vsock::Vsock::new(spec.cid, &spec.socket)
        .map_err(|e| Error::Config(format!("--vsock: {e}")))?;
    tracing::info!(
        "vsock0: guest CID {}, host side on {} (CONNECT <port>; guest to host: {}_<port>)",
        spec.cid,
        spec.socket.display(),
        spec.socket.display()
    );
    crate::virtio_pci::attach::<VsockKind>(dm, vm, gsi_routes, mem, "vsock0", Box::new(dev))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_specs_parse_and_bad_ones_are_named() {
        let v = parse_vsock("cid=3,socket=/run/vm1.vsock").unwrap();
        assert_eq!((v.cid, v.socket.to_str()), (3, Some("/run/vm1.vsock")));
        assert_eq!(parse_vsock(&v.to_string()).unwrap(), v);
        for (bad, why) in [
            ("cid=2,socket=/x", "cid 2"),
            ("cid=x,socket=/x", "not a number"),
            ("socket=/x", "no cid"),
            ("cid=3", "no socket"),
            ("cid=3,socket=/x,port=1", "unknown part"),
        ] {
            let e = parse_vsock(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
