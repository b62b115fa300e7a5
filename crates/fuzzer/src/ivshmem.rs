//! The ivshmem client's set-up (`devices::ivshmem_proto::join`) against a
//! hostile server: any sequence of values, with an eventfd, a memfd, or no
//! descriptor, then the connection closed. The client must refuse what is
//! not a set-up (never panic, never take more than a server of
//! MAX_PEERS peers could send) and return what is one.

use arbitrary::{Arbitrary, Unstructured};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;

#[derive(Debug, Arbitrary)]
enum Msg {
    /// The protocol version, a peer id, -1, or any value.
    Value(Kind),
    WithEventfd(Kind),
    WithMemfd(Kind),
    /// Many peer messages with eventfds at once (a flood).
    Flood(u16),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Kind {
    Version,
    MinusOne,
    Id(u16),
    Any(i64),
}

impl Kind {
    fn value(self) -> i64 {
        match self {
            Kind::Version => devices::ivshmem_proto::PROTOCOL_VERSION,
            Kind::MinusOne => -1,
            Kind::Id(i) => i as i64 % 70_000,
            Kind::Any(v) => v,
        }
    }
}

/// Runs one hostile server against `join`.
pub fn ivshmem(u: &mut Unstructured) -> arbitrary::Result<()> {
    use vmm_sys_util::eventfd::EventFd;
    let vectors = u.int_in_range(1..=8u32)?;
    let msgs: Vec<Msg> = u.arbitrary_iter()?.take(64).collect::<Result<_, _>>()?;
    let dir = std::env::temp_dir().join(format!("nfv-fuzz-ivs-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("s");
    let _ = std::fs::remove_file(&path);
    let Ok(listener) = UnixListener::bind(&path) else {
        return Ok(());
    };
    let server = std::thread::spawn(move || {
        let Ok((sock, _)) = listener.accept() else {
            return;
        };
        let eventfd = EventFd::new(0).ok();
        // SAFETY: memfd_create with a constant name; the descriptor is
        // closed when `memfd` drops at the end of this thread.
        let memfd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
        let send = |v: i64, fd: Option<i32>| devices::ivshmem_proto::send(&sock, v, fd).is_ok();
        for m in msgs {
            let ok = match m {
                Msg::Value(k) => send(k.value(), None),
                Msg::WithEventfd(k) => send(k.value(), eventfd.as_ref().map(|e| e.as_raw_fd())),
                Msg::WithMemfd(k) => send(k.value(), (memfd >= 0).then_some(memfd)),
                Msg::Flood(n) => (0..n.min(2000))
                    .all(|i| send(i as i64 % 100, eventfd.as_ref().map(|e| e.as_raw_fd()))),
            };
            if !ok {
                break;
            }
        }
        if memfd >= 0 {
            // SAFETY: closes the memfd made above.
            unsafe { libc::close(memfd) };
        }
    });
    if let Ok((joined, _sock)) = devices::ivshmem_proto::join(&path, vectors) {
        assert_eq!(joined.own.len(), vectors as usize);
        assert!(joined.peers.len() <= devices::ivshmem_proto::MAX_PEERS * 8);
    }
    let _ = server.join();
    Ok(())
}
