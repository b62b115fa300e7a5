//! The ivshmem-server protocol, as QEMU's `ivshmem-server` speaks it: over a
//! UNIX socket, little-endian int64 messages, some carrying one file
//! descriptor (SCM_RIGHTS). On connect the server sends: the protocol
//! version (0); the client's ID; -1 with the shared memory fd; for every
//! other client, its ID once per vector, each with that vector's eventfd;
//! finally the client's own ID once per vector with its eventfds. Later, a
//! new client's ID with its eventfds, or a departed client's ID alone.
//!
//! The descriptors travel with vmm-sys-util's `ScmSocket`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const PROTOCOL_VERSION: i64 = 0;

/// Sends one message, with an fd when given.
pub fn send(sock: &UnixStream, value: i64, fd: Option<RawFd>) -> io::Result<()> {
    let data = value.to_le_bytes();
    let fds: &[RawFd] = match &fd {
        Some(fd) => std::slice::from_ref(fd),
        None => &[],
    };
    let n = sock.send_with_fds(&[&data[..]], fds)?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("{n} of 8 bytes of an ivshmem message sent"),
        ));
    }
    Ok(())
}

/// Receives one message and its fd, if any. `Ok(None)` at end of stream.
pub fn recv(sock: &UnixStream) -> io::Result<Option<(i64, Option<OwnedFd>)>> {
    let mut data = [0u8; 8];
    let (n, file) = sock.recv_with_fd(&mut data)?;
    match n {
        0 => Ok(None),
        8 => Ok(Some((i64::from_le_bytes(data), file.map(OwnedFd::from)))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {n}-byte ivshmem message"),
        )),
    }
}

struct Client {
    id: i64,
    sock: UnixStream,
    vectors: Vec<EventFd>,
}

/// Peers one server serves at most.
pub const MAX_PEERS: usize = 64;
/// How long one client's set-up (the region, every peer's doorbells) may
/// take.
const SETUP_DEADLINE: Duration = Duration::from_secs(1);

/// `nfvisor ivshmem-server`: hands out the shared memory and every peer's
/// doorbell eventfds until `stop` is set.
/// A region of `size` bytes as a memfd sealed against shrinking, growing
/// and further sealing: a peer that gets it can write the pages, never
/// take them away from under another peer's mapping.
pub fn sealed_region(size: u64) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"nfvisor-ivshmem".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on our own memfd; no memory is passed.
    if unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

pub fn serve(
    socket: &Path,
    shm: &std::fs::File,
    vectors: u32,
    stop: &AtomicBool,
) -> io::Result<()> {
    let listener = crate::unix_socket::bind_private(socket)?;
    listener.set_nonblocking(true)?;
    let mut clients: Vec<Client> = Vec::new();
    let mut next_id = 0i64;
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((sock, _)) if clients.len() >= MAX_PEERS => {
                crate::limited!(
                    warn,
                    "ivshmem-server: {MAX_PEERS} peers already: a new client refused"
                );
                drop(sock);
            }
            Ok((sock, _)) => {
                let id = next_id;
                next_id += 1;
                let fds = match (0..vectors)
                    .map(|_| EventFd::new(0))
                    .collect::<io::Result<Vec<_>>>()
                {
                    Ok(fds) => fds,
                    Err(e) => {
                        // out of descriptors: this client goes, the others stay
                        crate::limited!(warn, "ivshmem-server: client {id}: eventfd: {e}");
                        continue;
                    }
                };
                // a client that never reads must not stall the others: every
                // set-up write has a timeout, and the whole set-up a deadline
                let deadline = Instant::now() + SETUP_DEADLINE;
                let setup = (|| -> io::Result<()> {
                    sock.set_write_timeout(Some(SETUP_DEADLINE))?;
                    let send = |value: i64, fd: Option<RawFd>| {
                        if Instant::now() > deadline {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "set-up took longer than its deadline",
                            ));
                        }
                        send(&sock, value, fd)
                    };
                    send(PROTOCOL_VERSION, None)?;
                    send(id, None)?;
                    send(-1, Some(shm.as_raw_fd()))?;
                    for other in &clients {
                        for fd in &other.vectors {
                            send(other.id, Some(fd.as_raw_fd()))?;
                        }
                    }
                    for fd in &fds {
                        send(id, Some(fd.as_raw_fd()))?;
                    }
                    sock.set_nonblocking(true)
                })();
                if let Err(e) = setup {
                    crate::limited!(warn, "ivshmem-server: client {id}: {e}");
                    continue;
                }
                for other in &clients {
                    for fd in &fds {
                        let _ = send(&other.sock, id, Some(fd.as_raw_fd()));
                    }
                }
                tracing::info!("ivshmem-server: peer {id} joined");
                clients.push(Client {
                    id,
                    sock,
                    vectors: fds,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // EMFILE, ENFILE, ECONNABORTED...: the server stays up for the
                // peers it has, and tries again once descriptors come back
                crate::limited!(warn, "ivshmem-server: accepting: {e}");
            }
        }
        // a client whose socket reads end-of-stream has left
        let mut gone = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let mut b = [0u8; 8];
            // SAFETY: peeking into a local buffer.
            let n = unsafe {
                libc::recv(
                    c.sock.as_raw_fd(),
                    b.as_mut_ptr() as *mut libc::c_void,
                    8,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            let c = clients.remove(i);
            tracing::info!("ivshmem-server: peer {} left", c.id);
            for other in &clients {
                let _ = send(&other.sock, c.id, None);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// What a client learns on connecting.
pub struct Joined {
    pub id: i64,
    pub shm: OwnedFd,
    /// Its own vectors' eventfds (the peers ring these).
    pub own: Vec<OwnedFd>,
    /// Other peers' vectors: (id, vector index, eventfd).
    pub peers: Vec<(i64, u32, OwnedFd)>,
}

/// Connects and reads the set-up messages, until `vectors` own eventfds came.
pub fn join(socket: &Path, vectors: u32) -> io::Result<(Joined, UnixStream)> {
    let sock = UnixStream::connect(socket)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ivshmem server: {what}"),
        )
    };
    let next = || recv(&sock)?.ok_or_else(|| bad("closed the connection during set-up"));
    let (version, _) = next()?;
    if version != PROTOCOL_VERSION {
        return Err(bad(&format!(
            "protocol version {version}, this nfvisor speaks {PROTOCOL_VERSION}"
        )));
    }
    let (id, _) = next()?;
    if !(0..=0xffff).contains(&id) {
        return Err(bad(&format!("peer id {id} out of range (0..65535)")));
    }
    let (minus_one, shm) = next()?;
    let shm = shm
        .filter(|_| minus_one == -1)
        .ok_or_else(|| bad("no shared memory descriptor"))?;
    let mut own = Vec::new();
    let mut peers: Vec<(i64, u32, OwnedFd)> = Vec::new();
    while own.len() < vectors as usize {
        // a server of MAX_PEERS peers sends at most this many: more is a
        // hostile one filling this process with descriptors
        if peers.len() >= MAX_PEERS * 8 {
            return Err(bad(&format!(
                "more peer descriptors than {MAX_PEERS} peers of 8 vectors have"
            )));
        }
        let (who, fd) = next()?;
        let fd = fd.ok_or_else(|| {
            bad(&format!(
                "message for peer {who} without a descriptor during set-up"
            ))
        })?;
        if who == id {
            own.push(fd);
        } else {
            let v = peers.iter().filter(|p| p.0 == who).count() as u32;
            peers.push((who, v, fd));
        }
    }
    sock.set_read_timeout(None)?;
    Ok((
        Joined {
            id,
            shm,
            own,
            peers,
        },
        sock,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::Arc;

    /// A hostile server that floods the set-up with other peers'
    /// descriptors is refused once more than MAX_PEERS peers could send.
    #[test]
    fn a_flood_of_peer_descriptors_is_refused() {
        let dir = std::env::temp_dir().join(format!("nfv-ivsflood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let fd = EventFd::new(0).unwrap();
            send(&sock, PROTOCOL_VERSION, None).unwrap();
            send(&sock, 3, None).unwrap();
            send(&sock, -1, Some(fd.as_raw_fd())).unwrap();
            let mut sent = 0;
            while sent < 10 * MAX_PEERS * 8 && send(&sock, 7, Some(fd.as_raw_fd())).is_ok() {
                sent += 1;
            }
            sent
        });
        let e = join(&path, 1).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("more peer descriptors"), "{e}");
        assert!(server.join().unwrap() < 10 * MAX_PEERS * 8);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn two_clients_get_the_memory_and_each_others_doorbells() {
        let dir = std::env::temp_dir().join(format!("nfv-ivsrv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let shm = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("m"))
            .unwrap();
        shm.set_len(4096).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2, sh) = (sock.clone(), stop.clone(), shm.try_clone().unwrap());
        let server = std::thread::spawn(move || serve(&s2, &sh, 2, &st2).unwrap());
        while !sock.exists() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let (a, a_sock) = join(&sock, 2).unwrap();
        assert_eq!((a.id, a.own.len(), a.peers.len()), (0, 2, 0));
        let (b, _b_sock) = join(&sock, 2).unwrap();
        assert_eq!((b.id, b.own.len(), b.peers.len()), (1, 2, 2));
        // A hears of B: B's two vectors
        let (who, fd) = recv(&a_sock).unwrap().unwrap();
        assert_eq!(who, 1);
        assert!(fd.is_some());
        // a doorbell B rings on A's vector 1 is A's eventfd
        let ring = b.peers.iter().find(|p| p.0 == 0 && p.1 == 1).unwrap();
        // SAFETY: duplicating an fd we own into an EventFd for the test.
        let rb = unsafe { EventFd::from_raw_fd(libc::dup(ring.2.as_raw_fd())) };
        rb.write(1).unwrap();
        // SAFETY: as above.
        let ra = unsafe { EventFd::from_raw_fd(libc::dup(a.own[1].as_raw_fd())) };
        assert_eq!(ra.read().unwrap(), 1);
        stop.store(true, Ordering::Release);
        server.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
