//! A TAP device for virtio-net: opened by name from /dev/net/tun, or taken
//! from a descriptor a parent process opened, with IFF_VNET_HDR (each
//! frame carries the 12-byte virtio_net_hdr_v1 that VERSION_1 uses) and no
//! offloads. Written by hand over the ioctls: no maintained crate offers
//! the TAP set-up alone without a whole networking stack.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The virtio-net header the TAP and the guest exchange (virtio_net_hdr_v1).
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
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
}

pub struct Tap {
    file: File,
    pub name: String,
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
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        ioctl_with(file.as_raw_fd(), TUNSETIFF, &req).map_err(io_err("TUNSETIFF"))?;
        let tap = Tap {
            file,
            name: name.to_string(),
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
        // no offloads until they are negotiated (TUNSETOFFLOAD takes the
        // flags as the argument itself)
        // SAFETY: TUNSETOFFLOAD reads no memory: its argument is the value.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, 0 as libc::c_ulong) } < 0 {
            return Err(err("TUNSETOFFLOAD")(io::Error::last_os_error()));
        }
        // SAFETY: F_SETFL on our own descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(err("O_NONBLOCK")(io::Error::last_os_error()));
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
