//! The one way nfvisor puts a listening UNIX socket at a path (control,
//! REST API, migration, ivshmem server): only over a stale socket, never
//! over anything else, and never reachable with wider permissions than
//! 0600 (bound under a temporary name, made 0600, renamed into place).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Binds a listener at `path`, 0600. What is already there is removed only
/// if it is a socket nobody answers on (left by a process that died); a
/// live socket, a file, a directory or a link is refused, untouched.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something that is not a socket is there: not removed",
            ))
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening there",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let staging = path.with_file_name(format!(
        ".{}.{}.bind",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("socket"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&staging, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&staging);
        })?;
    Ok(listener)
}

/// The uid of a UNIX socket's peer (SO_PEERCRED).
pub fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// Whether `s`'s peer may talk to this process: the same user, or root.
pub fn peer_allowed(s: &UnixStream) -> bool {
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    peer_uid(s).is_some_and(|uid| uid == me || uid == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_socket_is_replaced() {
        let dir = std::env::temp_dir().join(format!("nfv-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        // a file is never removed
        std::fs::write(&path, b"precious").unwrap();
        let e = bind_private(&path).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        // nor a link (to anything)
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        assert!(bind_private(&path).is_err());
        std::fs::remove_file(&path).unwrap();
        // a fresh one is 0600; a live one is refused; a dead one replaced
        let live = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = bind_private(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(live);
        let again = bind_private(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let (server_side, _) = again.accept().unwrap();
        assert!(peer_allowed(&server_side) && peer_allowed(&client));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
