//! A TAP device for virtio-net: opened by name from /dev/net/tun, or taken
//! from a descriptor a parent process opened, with IFF_VNET_HDR (each
//! frame carries the 12-byte virtio_net_hdr_v1 that VERSION_1 uses), one
//! descriptor per queue (IFF_MULTI_QUEUE) and the offloads the guest can
//! take (TUNSETOFFLOAD). Written by hand over the ioctls: no maintained
//! crate offers the TAP set-up alone without a whole networking stack.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The virtio-net header the TAP and the guest exchange (virtio_net_hdr_v1).
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
/// TUNSETOFFLOAD's flags: what the guest can receive.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP {name:?}: the name is empty or longer than 15 bytes")]
    Name { name: String },
    #[error("TAP {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("fd {fd} is not a TAP device ({source})")]
    NotTap { fd: RawFd, source: io::Error },
    #[error("TAP {name:?}: TUNSETIFF for queue {queue} of {queues}: {source} (a TAP made without multi_queue takes one queue: ip tuntap add dev {name} mode tap multi_queue)")]
    NotMultiQueue {
        name: String,
        queue: usize,
        queues: usize,
        source: io::Error,
    },
    #[error("fd {fd}: a TAP opened without IFF_MULTI_QUEUE cannot be one of {queues} queues")]
    FdNotMultiQueue { fd: RawFd, queues: usize },
}

pub struct Tap {
    file: File,
    pub name: String,
    /// One of several queues (IFF_MULTI_QUEUE).
    pub multi_queue: bool,
}

fn ioctl_with<T>(fd: RawFd, req: libc::c_ulong, arg: *const T) -> io::Result<()> {
    // SAFETY: `arg` points at a live value of the type the request reads
    // or writes (checked by the callers below), for the call's duration.
    if unsafe { libc::ioctl(fd, req as _, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens (or creates, where this process may) the TAP `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        match Self::open_one(name, false) {
            // a TAP made multi_queue takes only multi-queue opens: one
            // queue of it then
            Err(TapError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Self::open_one(name, true)
            }
            r => r,
        }
    }

    /// `queues` descriptors of the TAP `name`, one per queue pair: with
    /// more than one, IFF_MULTI_QUEUE (the TAP must have been made with
    /// multi_queue, or not exist yet).
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        if queues <= 1 {
            return Ok(vec![Self::open(name)?]);
        }
        (0..queues)
            .map(|queue| {
                Self::open_one(name, true).map_err(|e| match e {
                    TapError::Io { source, .. } if source.raw_os_error() == Some(libc::EINVAL) => {
                        TapError::NotMultiQueue {
                            name: name.to_string(),
                            queue,
                            queues,
                            source,
                        }
                    }
                    e => e,
                })
            })
            .collect()
    }

    /// TAPs a parent process opened, one descriptor per queue pair (Kata
    /// passes one per queue): several must all be multi-queue descriptors
    /// of one TAP.
    pub fn from_fds(fds: &[RawFd]) -> Result<Vec<Tap>, TapError> {
        let taps = fds
            .iter()
            .map(|&fd| Self::from_fd(fd))
            .collect::<Result<Vec<_>, _>>()?;
        if taps.len() > 1 {
            for (t, &fd) in taps.iter().zip(fds) {
                if !t.multi_queue {
                    return Err(TapError::FdNotMultiQueue {
                        fd,
                        queues: fds.len(),
                    });
                }
                if t.name != taps[0].name {
                    return Err(TapError::NotTap {
                        fd,
                        source: io::Error::other(format!(
                            "a queue of TAP {:?}, not of {:?} as fd {} is",
                            t.name, taps[0].name, fds[0]
                        )),
                    });
                }
            }
        }
        Ok(taps)
    }

    fn open_one(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(TapError::Name {
                name: name.to_string(),
            });
        }
        let io_err = |what: &str| {
            let what = format!("{name} ({what})");
            move |source| TapError::Io { what, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(io_err("/dev/net/tun"))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP
                | IFF_NO_PI
                | IFF_VNET_HDR
                | if multi_queue { IFF_MULTI_QUEUE } else { 0 },
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        ioctl_with(file.as_raw_fd(), TUNSETIFF, &req).map_err(io_err("TUNSETIFF"))?;
        let tap = Tap {
            file,
            name: name.to_string(),
            multi_queue,
        };
        tap.configure()?;
        Ok(tap)
    }

    /// A TAP a parent process opened (fd= on the command line, or one the
    /// REST API received): the Tap works on a duplicate, so the caller
    /// keeps its descriptor (and closes it when it wants; a failed VM
    /// leaves it open and untouched).
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: fcntl F_GETFD only checks that the descriptor exists.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotTap {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        ioctl_with(fd, TUNGETIFF, &mut req as *mut IfReq as *const IfReq)
            .map_err(|source| TapError::NotTap { fd, source })?;
        if req.flags & IFF_TAP == 0 || req.flags & IFF_VNET_HDR == 0 {
            return Err(TapError::NotTap {
                fd,
                source: io::Error::other("a TUN, or a TAP opened without IFF_VNET_HDR"),
            });
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor checked open above; the
        // result is checked before it is owned.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(TapError::NotTap {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: dup is a fresh descriptor owned by this Tap alone.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        let tap = Tap {
            file: File::from(owned),
            name,
            multi_queue: req.flags & IFF_MULTI_QUEUE != 0,
        };
        tap.configure()?;
        Ok(tap)
    }

    fn configure(&self) -> Result<(), TapError> {
        let fd = self.file.as_raw_fd();
        let err = |what: &str| {
            let what = format!("{} ({what})", self.name);
            move |source| TapError::Io { what, source }
        };
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        ioctl_with(fd, TUNSETVNETHDRSZ, &hdr).map_err(err("TUNSETVNETHDRSZ"))?;
        // no offloads until they are negotiated
        self.set_offloads(0)?;
        // SAFETY: F_SETFL on our own descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(err("O_NONBLOCK")(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Attaches this queue to its TAP or detaches it (TUNSETQUEUE), so the
    /// kernel steers frames only to queues someone reads.
    pub fn set_queue_attached(&self, attached: bool) -> Result<(), TapError> {
        let req = IfReq {
            name: [0; 16],
            flags: if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        ioctl_with(self.file.as_raw_fd(), TUNSETQUEUE, &req).map_err(|source| TapError::Io {
            what: format!(
                "{} ({} a queue: TUNSETQUEUE)",
                self.name,
                if attached { "attaching" } else { "detaching" }
            ),
            source,
        })
    }

    /// The offloads the guest takes (TUN_F_*): the kernel hands frames
    /// that need more (a GSO frame, a partial checksum) over finished.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD reads no memory: its argument is the value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(TapError::Io {
                what: format!("{} (TUNSETOFFLOAD {flags:#x})", self.name),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// One frame (header first) into `buf`; Ok(None) when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        use std::io::Read;
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One frame (header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        use std::io::Write;
        (&self.file).write(frame).map(|_| ())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_and_descriptors_are_refused_by_name() {
        let e = Tap::open("a-name-far-too-long").err().unwrap().to_string();
        assert!(e.contains("a-name-far-too-long"), "{e}");
        let e = Tap::from_fd(987_654).err().unwrap().to_string();
        assert!(e.contains("fd 987654 is not a TAP"), "{e}");
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        let e = Tap::from_fd(fd).err().unwrap().to_string();
        assert!(e.contains("is not a TAP"), "{e}");
        // SAFETY: the descriptor was not taken (refused) and is ours.
        unsafe { libc::close(fd) };
    }
}
