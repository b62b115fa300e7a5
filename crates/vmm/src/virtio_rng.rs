//! virtio-rng in a VM: the device (virtio::rng), its `--rng` spec,
//! attached as every virtio device is (`virtio_pci`).

use std::sync::Arc;

use kvm_ioctls::VmFd;
use virtio::rng::Source;

use crate::device_manager::DeviceManager;
use crate::irq_routes::GsiRoutes;
use crate::memory::GuestRam;
use crate::{Error, Result};

/// One `--rng`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RngSpec {
    pub source: Source,
    /// Bytes a second.
    pub rate: Option<u64>,
}

/// Parses `[src=PATH][,rate=SIZE]` (empty: getrandom, no limit; rate in
/// bytes a second, "1M"; a plain number is bytes).
pub fn parse_rng(spec: &str) -> Result<RngSpec> {
    let bad = |why: String| Error::Config(format!("--rng {spec:?}: {why}"));
    let mut r = RngSpec::default();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("src", p)) if !p.is_empty() => r.source = Source::File(p.into()),
            Some(("rate", n)) => {
                let bytes = match n.parse::<u64>() {
                    Ok(b) => b,
                    Err(_) => crate::config::parse_size(n).map_err(|e| bad(e.to_string()))?,
                };
                if bytes == 0 {
                    return Err(bad("rate 0: leave it out for no limit".into()));
                }
                r.rate = Some(bytes);
            }
            _ => {
                return Err(bad(format!(
                    "unknown part {part:?} (use src=PATH, rate=BYTES)"
                )))
            }
        }
    }
    Ok(r)
}

impl std::fmt::Display for RngSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Source::File(p) = &self.source {
            parts.push(format!("src={}", p.display()));
        }
        if let Some(r) = self.rate {
            parts.push(format!("rate={r}"));
        }
        write!(f, "{}", parts.join(","))
    }
}

crate::virtio_kind!(RngKind, "virtio-rng", 1, "nothing beyond its queue");

/// Attaches the entropy device as `rng0`.
pub fn attach(
    dm: &mut DeviceManager,
    vm: &Arc<VmFd>,
    gsi_routes: Arc<GsiRoutes>,
    mem: &GuestRam,
    spec: &RngSpec,
) -> Result<()> {
    let dev: virtio::rng::Rng<GuestRam> = virtio::rng::Rng::new(spec.source.clone(), spec.rate)
        .map_err(|e| Error::Config(format!("--rng: {e}")))?;
    crate::virtio_pci::attach::<RngKind>(dm, vm, gsi_routes, mem, "rng0", Box::new(dev))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_specs_parse_and_bad_ones_are_named() {
        assert_eq!(parse_rng("").unwrap(), RngSpec::default());
        let r = parse_rng("src=/dev/urandom,rate=1M").unwrap();
        assert_eq!(r.rate, Some(1 << 20));
        assert_eq!(parse_rng(&r.to_string()).unwrap(), r);
        for (bad, why) in [
            ("rate=0", "rate 0"),
            ("speed=1", "unknown part"),
            ("rate=x", "rate"),
        ] {
            let e = parse_rng(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
