//! Test-only fault injection on the receiving side of a migration, so the
//! tests can make a destination fail at each named phase of the protocol.
//! `NFVISOR_TEST_FAULT=PHASE[:kill|:cut|:stall]` makes `nfvisor receive`,
//! on reaching PHASE, either die at once without any clean-up (`kill`, the
//! default: `_exit`, as SIGKILL would), cut its migration link in both
//! directions and carry on failing as it would with a broken network
//! (`cut`), or stop reading without closing until the source gives up and
//! hangs up (`stall`). It says which phase it hit on stderr first. Unset, nothing
//! happens beyond one environment lookup per phase.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

pub const VARIABLE: &str = "NFVISOR_TEST_FAULT";

/// A test hook's setting: the environment variable `name`, read only in a
/// build with the `test-hooks` feature (the suite's); a release binary
/// built without it ignores every `NFVISOR_TEST_*` variable.
pub fn test_hook(name: &str) -> Option<String> {
    if cfg!(feature = "test-hooks") {
        std::env::var(name).ok()
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The source connected and proved the token.
    Connect,
    /// The first memory frame arrived.
    FirstRound,
    /// The stop-and-copy state (devices, vCPUs) arrived.
    StopAndCopy,
    /// READY was sent; GO has not come.
    AfterReady,
    /// GO came; the guest has not started here.
    AfterGo,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Connect,
        Phase::FirstRound,
        Phase::StopAndCopy,
        Phase::AfterReady,
        Phase::AfterGo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::FirstRound => "first-round",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::AfterReady => "after-ready",
            Phase::AfterGo => "after-go",
        }
    }
}

static LINK: AtomicI32 = AtomicI32::new(-1);
static FIRED: AtomicBool = AtomicBool::new(false);

/// The migration link's descriptor, which `cut` shuts down.
pub fn set_link(fd: i32) {
    LINK.store(fd, Ordering::Relaxed);
}

/// Injects the configured fault if this is its phase (once per process).
pub fn at(phase: Phase) {
    let Some(spec) = test_hook(VARIABLE) else {
        return;
    };
    let (name, action) = spec.split_once(':').unwrap_or((spec.as_str(), "kill"));
    if name != phase.name() || FIRED.swap(true, Ordering::Relaxed) {
        return;
    }
    eprintln!("nfvisor: {VARIABLE}: {action} at {name}");
    if action == "stall" {
        // stops reading without closing: waits (two minutes at most) for
        // the peer to give up and hang up, then ends as a kill would
        let fd = LINK.load(Ordering::Relaxed);
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        for _ in 0..120 {
            // SAFETY: poll(2) on one pollfd of our own.
            let n = unsafe { libc::poll(&mut poll, 1, 1000) };
            if n != 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                break;
            }
        }
        eprintln!("nfvisor: {VARIABLE}: the peer hung up on the stall");
        // SAFETY: ends the process at once, as a kill would.
        unsafe { libc::_exit(86) };
    }
    if action == "cut" {
        let fd = LINK.load(Ordering::Relaxed);
        // SAFETY: shutdown(2) on a descriptor number; at worst EBADF.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        // nothing more can arrive now, but what the kernel queued before the
        // cut would still be read: drop it, as a broken link would have
        let mut buf = [0u8; 4096];
        // SAFETY: recv(2) into a local buffer of the length given.
        while unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) } > 0
        {
        }
    } else {
        // SAFETY: ends the process at once, as a kill would: no destructors,
        // no flushing; the kernel closes the descriptors.
        unsafe { libc::_exit(86) };
    }
}
