//! The raw disk image behind a virtio-blk device: opened with every check
//! a user's mistake needs named (missing, a directory, not whole sectors,
//! read-only on the host, in use by another VMM), and its advisory lock.
//!
//! The lock is an open-file-description lock (`F_OFD_SETLK`) on the whole
//! file: exclusive for read-write use, shared for read-only use, so two
//! VMs never write one image and a VM never reads an image another one
//! writes. A migration's destination opens the image without it and takes
//! it at the hand-over, once the source has let it go.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

pub const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {0}: no such file")]
    Missing(PathBuf),
    #[error("disk image {0} is a directory, not an image")]
    Directory(PathBuf),
    #[error("disk image {0} is neither a regular file nor a block device")]
    NotAnImage(PathBuf),
    #[error("disk image {path}: {size} bytes is not a whole number of 512-byte sectors")]
    NotSectors { path: PathBuf, size: u64 },
    #[error("disk image {0} is empty (0 sectors)")]
    Empty(PathBuf),
    #[error("disk image {0}: its filesystem does not take 512-byte O_DIRECT I/O (4K sectors?): leave out `direct`")]
    DirectAlignment(PathBuf),
    #[error(
        "disk image {0} is read-only on the host: add `readonly` to use it so, or make it writable"
    )]
    ReadOnlyOnHost(PathBuf),
    #[error("disk image {path} is in use: another process holds its {held} lock (another nfvisor using it{how})")]
    Locked {
        path: PathBuf,
        held: &'static str,
        how: &'static str,
    },
    #[error("disk image {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// How to open an image.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub readonly: bool,
    /// O_DIRECT: no host page cache.
    pub direct: bool,
    /// Take the lock now (false: a migration's destination, which takes it
    /// at the hand-over).
    pub lock_now: bool,
}

/// An open image.
#[derive(Debug)]
pub struct DiskImage {
    pub file: File,
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
    pub readonly: bool,
    pub direct: bool,
}

impl DiskImage {
    pub fn open(o: &DiskOptions) -> Result<DiskImage, DiskError> {
        let path = o.path.clone();
        let io = |what: &'static str| {
            let path = path.clone();
            move |source| DiskError::Io { path, what, source }
        };
        let meta = match std::fs::metadata(&o.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DiskError::Missing(path))
            }
            Err(e) => return Err(io("reading its metadata")(e)),
        };
        if meta.is_dir() {
            return Err(DiskError::Directory(path));
        }
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(DiskError::NotAnImage(path));
        }
        // root opens a file without write permission read-write all the
        // same: a file nobody may write is read-only here whoever runs us
        if !o.readonly && meta.is_file() && meta.permissions().mode() & 0o222 == 0 {
            return Err(DiskError::ReadOnlyOnHost(path));
        }
        let mut flags = libc::O_CLOEXEC;
        if o.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!o.readonly)
            .custom_flags(flags)
            .open(&o.path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EROFS | libc::EPERM) if !o.readonly => {
                    DiskError::ReadOnlyOnHost(path.clone())
                }
                _ => io("opening it")(e),
            })?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            use std::io::Seek;
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(io("finding its size"))?
        };
        if size % SECTOR != 0 {
            return Err(DiskError::NotSectors { path, size });
        }
        if size == 0 {
            return Err(DiskError::Empty(path));
        }
        let image = DiskImage {
            file,
            path,
            size,
            readonly: o.readonly,
            direct: o.direct,
        };
        if o.direct {
            image.probe_direct()?;
        }
        if o.lock_now {
            image.lock()?;
        }
        Ok(image)
    }

    /// A 512-byte O_DIRECT read at offset 0: the device advertises 512-byte
    /// blocks, so an image whose filesystem or device needs more alignment
    /// (4Kn) is refused now rather than failing every guest request.
    fn probe_direct(&self) -> Result<(), DiskError> {
        let mut buf = vec![0u8; 8192];
        let at = buf.as_ptr().align_offset(4096);
        // SAFETY: a 512-byte read into our own buffer, 4096-aligned, on a
        // descriptor the File keeps open.
        let r = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                buf[at..].as_mut_ptr().cast(),
                SECTOR as usize,
                0,
            )
        };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            return Err(DiskError::DirectAlignment(self.path.clone()));
        }
        Ok(())
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR
    }

    /// Takes the image's lock (exclusive for read-write use, shared for
    /// read-only); refuses, naming the image, when another process holds
    /// one that conflicts.
    pub fn lock(&self) -> Result<(), DiskError> {
        let kind = if self.readonly {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        };
        match ofd_lock(&self.file, kind as libc::c_short) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                Err(DiskError::Locked {
                    path: self.path.clone(),
                    held: if self.readonly {
                        "write"
                    } else {
                        "read or write"
                    },
                    how: if self.readonly {
                        " read-write"
                    } else {
                        ", or using it read-only"
                    },
                })
            }
            Err(source) => Err(DiskError::Io {
                path: self.path.clone(),
                what: "locking it",
                source,
            }),
        }
    }

    /// Lets the lock go (a migration's source at the hand-over).
    pub fn unlock(&self) {
        let _ = ofd_lock(&self.file, libc::F_UNLCK as libc::c_short);
    }

    /// Takes the lock, retrying for up to `within` while another process
    /// (a migration's source on its way out) still holds it.
    pub fn lock_within(&self, within: std::time::Duration) -> Result<(), DiskError> {
        let until = std::time::Instant::now() + within;
        loop {
            match self.lock() {
                Err(DiskError::Locked { .. }) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                r => return r,
            }
        }
    }
}

/// Whole-file OFD lock of `kind` (F_RDLCK, F_WRLCK, F_UNLCK), not waiting.
fn ofd_lock(file: &File, kind: libc::c_short) -> std::io::Result<()> {
    // SAFETY: an all-zero flock is a valid value (whole file from offset
    // 0, l_pid 0 as OFD locks require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads the flock we own for the call's duration
    // on a descriptor this File keeps open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nfv-disk-ut-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn opts(path: &Path, readonly: bool) -> DiskOptions {
        DiskOptions {
            path: path.to_path_buf(),
            readonly,
            direct: false,
            lock_now: true,
        }
    }

    #[test]
    fn bad_images_are_named() {
        let d = scratch("bad");
        let missing = d.join("missing.img");
        let e = DiskImage::open(&opts(&missing, false)).unwrap_err();
        assert!(matches!(e, DiskError::Missing(_)), "{e}");
        assert!(e.to_string().contains("missing.img"));
        let e = DiskImage::open(&opts(&d, false)).unwrap_err();
        assert!(matches!(e, DiskError::Directory(_)), "{e}");
        let odd = d.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = DiskImage::open(&opts(&odd, false)).unwrap_err();
        assert!(e.to_string().contains("1000 bytes"), "{e}");
        let ro = d.join("ro.img");
        std::fs::write(&ro, vec![0u8; 4096]).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = DiskImage::open(&opts(&ro, false)).unwrap_err();
        assert!(matches!(e, DiskError::ReadOnlyOnHost(_)), "{e}");
        assert_eq!(DiskImage::open(&opts(&ro, true)).unwrap().sectors(), 8);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_writer_excludes_other_users_and_lets_go() {
        let d = scratch("lock");
        let img = d.join("a.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let first = DiskImage::open(&opts(&img, false)).unwrap();
        let e = DiskImage::open(&opts(&img, false)).unwrap_err();
        assert!(matches!(e, DiskError::Locked { .. }), "{e}");
        let e = DiskImage::open(&opts(&img, true)).unwrap_err();
        assert!(matches!(e, DiskError::Locked { .. }), "{e}");
        // a destination opens it unlocked, and takes the lock once the
        // source let it go
        let later = DiskImage::open(&DiskOptions {
            lock_now: false,
            ..opts(&img, false)
        })
        .unwrap();
        assert!(later.lock().is_err());
        first.unlock();
        later.lock().unwrap();
        drop(later);
        // readers share
        let r1 = DiskImage::open(&opts(&img, true)).unwrap();
        let _r2 = DiskImage::open(&opts(&img, true)).unwrap();
        assert!(DiskImage::open(&opts(&img, false)).is_err());
        drop(r1);
        let _ = std::fs::remove_dir_all(&d);
    }
}
