//! virtio-blk in a VM: the device (virtio::blk on a raw image), its
//! `--disk` spec, attached as every virtio device is (`virtio_pci`).

use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use virtio::block_io::EngineChoice;
use virtio::disk::{DiskImage, DiskOptions};

use crate::device_manager::DeviceManager;
use crate::irq_routes::GsiRoutes;
use crate::memory::GuestRam;
use crate::{Error, Result};

/// One `--disk`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    pub serial: Option<String>,
    pub queues: u16,
    pub engine: EngineChoice,
    pub iops: Option<u64>,
    /// Bytes a second.
    pub bandwidth: Option<u64>,
}

/// Parses `path=P[,readonly][,direct][,serial=ID][,queues=N][,iops=N]
/// [,bw=SIZE][,aio=io_uring|threads]` (bw: bytes a second, "100M"; a
/// plain number is MiB, as every size here).
pub fn parse_disk(spec: &str) -> Result<DiskSpec> {
    let bad = |why: String| Error::Config(format!("--disk {spec:?}: {why}"));
    let mut d = DiskSpec {
        path: PathBuf::new(),
        readonly: false,
        direct: false,
        serial: None,
        queues: 1,
        engine: EngineChoice::Auto,
        iops: None,
        bandwidth: None,
    };
    let mut path = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
            None if part == "readonly" || part == "ro" => d.readonly = true,
            None if part == "direct" => d.direct = true,
            Some(("readonly", v)) => d.readonly = on_off(v).map_err(bad)?,
            Some(("direct", v)) => d.direct = on_off(v).map_err(bad)?,
            Some(("serial", s)) => {
                if s.len() > virtio::blk::SERIAL_LEN {
                    return Err(bad(format!(
                        "serial {s:?} is {} bytes: GET_ID answers at most {}",
                        s.len(),
                        virtio::blk::SERIAL_LEN
                    )));
                }
                if !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(bad(format!("serial {s:?}: printable ASCII without spaces")));
                }
                d.serial = Some(s.to_string());
            }
            Some(("queues", n)) => {
                d.queues = n
                    .parse::<u16>()
                    .ok()
                    .filter(|q| (1..=virtio::blk::MAX_QUEUES).contains(q))
                    .ok_or_else(|| {
                        bad(format!(
                            "queues {n:?} is not from 1 to {}",
                            virtio::blk::MAX_QUEUES
                        ))
                    })?
            }
            Some(("iops", n)) => {
                d.iops = Some(
                    n.parse::<u64>()
                        .ok()
                        .filter(|&v| v > 0)
                        .ok_or_else(|| bad(format!("iops {n:?} is not a positive number")))?,
                )
            }
            Some(("bw", n)) => {
                let bytes = crate::config::parse_size(n).map_err(|e| bad(e.to_string()))?;
                if bytes == 0 {
                    return Err(bad("bw 0: leave it out for no limit".into()));
                }
                d.bandwidth = Some(bytes);
            }
            Some(("aio", a)) => d.engine = a.parse().map_err(bad)?,
            _ => {
                return Err(bad(format!(
                    "unknown part {part:?} (use path=FILE, then readonly, direct, serial=, queues=, iops=, bw=, aio=)"
                )))
            }
        }
    }
    d.path = path.ok_or_else(|| bad("no path=FILE".into()))?;
    Ok(d)
}

/// The spec as `--disk` takes it (what a stream carries).
impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "path={}", self.path.display())?;
        if self.readonly {
            write!(f, ",readonly")?;
        }
        if self.direct {
            write!(f, ",direct")?;
        }
        if let Some(s) = &self.serial {
            write!(f, ",serial={s}")?;
        }
        write!(f, ",queues={}", self.queues)?;
        if let Some(n) = self.iops {
            write!(f, ",iops={n}")?;
        }
        if let Some(b) = self.bandwidth {
            write!(f, ",bw={}K", b >> 10)?;
        }
        match self.engine {
            EngineChoice::Auto => Ok(()),
            EngineChoice::IoUring => write!(f, ",aio=io_uring"),
            EngineChoice::Threads => write!(f, ",aio=threads"),
        }
    }
}

fn on_off(v: &str) -> std::result::Result<bool, String> {
    match v {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{v:?} is not on or off")),
    }
}

crate::virtio_kind!(BlkKind, "virtio-blk", 1, "capacity, read-only and serial");

/// Opens the image `spec` names (locked now unless `lock_now` is false: a
/// migration's destination takes the lock at the hand-over).
pub fn open_image(spec: &DiskSpec, lock_now: bool) -> Result<DiskImage> {
    DiskImage::open(&DiskOptions {
        path: spec.path.clone(),
        readonly: spec.readonly,
        direct: spec.direct,
        lock_now,
    })
    .map_err(|e| Error::Config(format!("--disk: {e}")))
}

/// Attaches a disk as `blk<index>`; returns its image (for the lock's
/// hand-over).
pub fn attach(
    dm: &mut DeviceManager,
    vm: &Arc<VmFd>,
    gsi_routes: Arc<GsiRoutes>,
    mem: &GuestRam,
    spec: &DiskSpec,
    index: usize,
    lock_now: bool,
) -> Result<Arc<DiskImage>> {
    let image = open_image(spec, lock_now)?;
    let name = format!("blk{index}");
    let blk: virtio::blk::Blk<GuestRam> = virtio::blk::Blk::new(
        &name,
        image,
        virtio::blk::BlkConfig {
            serial: spec.serial.clone(),
            queues: spec.queues,
            engine: spec.engine,
            iops: spec.iops,
            bandwidth: spec.bandwidth,
        },
    )
    .map_err(|e| Error::Config(format!("--disk {}: {e}", spec.path.display())))?;
    tracing::info!(
        "{name}: {} ({} sectors{}{}), {} queue(s), I/O by {}",
        spec.path.display(),
        blk.disk().sectors(),
        if spec.readonly { ", read-only" } else { "" },
        if spec.direct { ", O_DIRECT" } else { "" },
        spec.queues,
        blk.engine()
    );
    let image = blk.disk().clone();
    crate::virtio_pci::attach::<BlkKind>(dm, vm, gsi_routes, mem, &name, Box::new(blk))?;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_parse_and_bad_ones_are_named() {
        let d = parse_disk(
            "path=/x/root.img,readonly,direct,serial=nfv-1,queues=4,iops=1000,bw=10M,aio=threads",
        )
        .unwrap();
        assert_eq!(d.path, PathBuf::from("/x/root.img"));
        assert!(d.readonly && d.direct);
        assert_eq!(d.serial.as_deref(), Some("nfv-1"));
        assert_eq!(d.queues, 4);
        assert_eq!(d.iops, Some(1000));
        assert_eq!(d.bandwidth, Some(10 << 20));
        assert_eq!(d.engine, EngineChoice::Threads);
        assert_eq!(parse_disk(&d.to_string()).unwrap(), d, "{d}");
        for (bad, why) in [
            ("readonly", "no path=FILE"),
            ("path=a,serial=012345678901234567890", "at most 20"),
            ("path=a,queues=0", "queues \"0\""),
            ("path=a,queues=17", "queues \"17\""),
            ("path=a,iops=0", "iops \"0\""),
            ("path=a,bw=fast", "bw"),
            ("path=a,aio=posix", "aio \"posix\""),
            ("path=a,cache=none", "unknown part"),
            ("path=a,readonly=maybe", "not on or off"),
        ] {
            let e = parse_disk(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
