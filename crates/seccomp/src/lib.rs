//! One seccomp filter per thread role, installed by each thread on itself
//! before it touches anything the guest controls.
//!
//! A thread inherits its spawner's filter, and stacked filters only ever
//! narrow: so the roles are nested (every role's list is part of the VMM
//! role's), and threads that must not inherit a narrow filter are started
//! through [`spawn`], which hands the `clone` to a spawner thread that
//! carries the VMM filter at most. A vCPU that activates a device (the
//! driver's DRIVER_OK arrives as a vCPU exit) thus starts a block worker
//! whose filter is the block worker's, not the vCPU's.
//!
//! `clone3` is answered with ENOSYS (glibc then falls back to `clone`,
//! whose flags a filter can read: only threads, never processes), by a
//! second filter stacked on the role's (a filter has one action for a
//! match); see [`lists::answered`].
//!
//! Modes: `on` stops the process at the first system call outside a
//! thread's list, after saying on stderr which thread, role and call;
//! `log` lets the call run and has the kernel log it (SECCOMP_RET_LOG, the
//! audit log: `dmesg`, `journalctl -k`); `off` installs nothing.

mod lists;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

pub use lists::syscall_name;

/// What a filter does with a system call that is not on its role's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Stop the process, saying which thread made which call.
    On,
    /// Let the call run; the kernel's audit log records it.
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" | "true" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" | "false" => Ok(Mode::Off),
            other => Err(format!("seccomp mode {other:?}: it is one of on, log, off")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// A thread's job, which decides what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The main thread, the control and API servers and their connections,
    /// migration and snapshot threads: everything the VMM does.
    Vmm,
    /// Runs the guest: KVM_RUN and the exits it handles, device
    /// activation included (eventfds, KVM routes, thread starts through
    /// the spawner).
    Vcpu,
    /// A virtio queue worker that is not a disk's (net, vsock, rng): its
    /// eventfds, epoll, timers, the TAP and the vsock's UNIX sockets.
    DeviceWorker,
    /// A disk's queue worker and its I/O threads: the only role with
    /// io_uring.
    BlockWorker,
    /// Serves the metrics over HTTP.
    Metrics,
    /// Copies the serial console, injects timed interrupts: sleeps,
    /// reads, writes, KVM's interrupt ioctls.
    Helper,
    /// A switch PMD: polls rings in memory the frontends share, writes
    /// their eventfds and TAPs, cuts a hostile frontend's socket.
    SwitchPmd,
    /// A switch port's vhost-user protocol and the threads the
    /// `vhost-user-backend` crate starts for it: its socket (messages and
    /// the descriptors they carry), the frontend's memory mapped, epoll.
    SwitchPort,
}

impl Role {
    pub const ALL: [Role; 8] = [
        Role::Vmm,
        Role::Vcpu,
        Role::DeviceWorker,
        Role::BlockWorker,
        Role::Metrics,
        Role::Helper,
        Role::SwitchPmd,
        Role::SwitchPort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Vmm => "vmm",
            Role::Vcpu => "vcpu",
            Role::DeviceWorker => "device-worker",
            Role::BlockWorker => "block-worker",
            Role::Metrics => "metrics",
            Role::Helper => "helper",
            Role::SwitchPmd => "switch-pmd",
            Role::SwitchPort => "switch-port",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the {role} seccomp filter: {source}")]
    Build {
        role: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the {role} seccomp filter: {source}")]
    Install {
        role: &'static str,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("the seccomp mode is set once, before any thread starts (it is {0})")]
    ModeSet(Mode),
}

const MODE_UNSET: u8 = 0;
static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);
static FILTERED_THREADS: AtomicU64 = AtomicU64::new(0);

fn mode_code(mode: Mode) -> u8 {
    match mode {
        Mode::On => 1,
        Mode::Log => 2,
        Mode::Off => 3,
    }
}

/// The process's mode: `off` until [`set_mode`] (library tests, the
/// benches' helpers).
pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::On,
        2 => Mode::Log,
        _ => Mode::Off,
    }
}

/// Chooses the mode for the whole process, once, on the main thread before
/// it starts any other: installs the SIGSYS reporter for `on` and starts
/// the spawner thread (which carries no filter until the main thread's).
pub fn set_mode(mode: Mode) -> Result<(), Error> {
    if let Err(was) = MODE.compare_exchange(
        MODE_UNSET,
        mode_code(mode),
        Ordering::SeqCst,
        Ordering::SeqCst,
    ) {
        if was == mode_code(mode) {
            return Ok(());
        }
        return Err(Error::ModeSet(self::mode()));
    }
    if mode == Mode::Off {
        return Ok(());
    }
    if mode == Mode::On {
        install_reporter()?;
    }
    spawner();
    Ok(())
}

/// Threads that carry a filter so far (for the status report and tests).
pub fn filtered_threads() -> u64 {
    FILTERED_THREADS.load(Ordering::Relaxed)
}

thread_local! {
    // What the SIGSYS reporter says about the thread: set before the
    // filter goes in, read (never written) in the handler.
    static ROLE: Cell<&'static str> = const { Cell::new("") };
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Installs `role`'s filter on the calling thread (nothing when the mode is
/// `off`). A thread calls it first thing, before it runs anything the
/// guest or a client controls.
pub fn enter(role: Role) -> Result<(), Error> {
    let mode = mode();
    if mode == Mode::Off {
        return Ok(());
    }
    ROLE.with(|r| r.set(role.name()));
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n[..len]);
    }
    NAME.with(|c| c.set(name));
    let install = |program: &BpfProgram| {
        seccompiler::apply_filter(program).map_err(|source| Error::Install {
            role: role.name(),
            source,
        })
    };
    // the answering filters first: once the role's is in, a narrow role
    // may no longer call prctl or seccomp
    for program in answers(role)? {
        install(&program)?;
    }
    install(&filter(role, mode)?)?;
    FILTERED_THREADS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `role`'s list as a BPF program for `mode`.
pub fn filter(role: Role, mode: Mode) -> Result<BpfProgram, Error> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    filter_with(role, mismatch)
}

fn filter_with(role: Role, mismatch: SeccompAction) -> Result<BpfProgram, Error> {
    let build = |e| Error::Build {
        role: role.name(),
        source: e,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in lists::allowed(role) {
        rules.insert(nr, Vec::new());
    }
    // the arguments that narrow a call further
    for n in lists::narrowed(role) {
        let chain = n
            .values
            .iter()
            .map(|&v| {
                SeccompCondition::new(
                    n.arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(n.mask),
                    v,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(build)?;
        rules.insert(n.call, chain);
    }
    // clone: threads only, and only for the VMM role (the others start
    // threads through the spawner) and a switch port's (the crate it runs
    // starts its own)
    if !matches!(role, Role::Vmm | Role::SwitchPort) {
        let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch()).map_err(build)?;
        return BpfProgram::try_from(f).map_err(build);
    }
    let thread_flag = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(thread_flag),
            thread_flag,
        )
        .map_err(build)?])
        .map_err(build)?],
    );
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch()).map_err(build)?;
    BpfProgram::try_from(f).map_err(build)
}

/// The filters that answer `role`'s [`lists::answered`] calls with their
/// errors: one per error (a filter has one action for a match).
fn answers(role: Role) -> Result<Vec<BpfProgram>, Error> {
    let build = |e| Error::Build {
        role: role.name(),
        source: e,
    };
    let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for (call, errno) in lists::answered(role) {
        by_errno.entry(errno).or_default().insert(call, Vec::new());
    }
    by_errno
        .into_iter()
        .map(|(errno, rules)| {
            let f = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                arch(),
            )
            .map_err(build)?;
            BpfProgram::try_from(f).map_err(build)
        })
        .collect()
}

fn arch() -> seccompiler::TargetArch {
    std::env::consts::ARCH
        .try_into()
        .expect("nfvisor builds for x86_64 and aarch64, both seccompiler targets")
}

/// The SIGSYS handler for `on`: says which thread, role and call, then
/// ends the process as a kill would. Async-signal-safe: no allocation, no
/// lock, only write(2) and exit_group(2), which every list allows.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // si_syscall follows si_call_addr in the SIGSYS member of the union
    // (include/uapi/asm-generic/siginfo.h): offset 24 on 64-bit Linux.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut msg = Line::default();
    msg.push(b"nfvisor: seccomp: thread '");
    let name = NAME.with(|c| c.get());
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    msg.push(&name[..len]);
    msg.push(b"' (role ");
    msg.push(ROLE.with(|r| r.get()).as_bytes());
    msg.push(b") made system call ");
    msg.number(nr as i64);
    if let Some(n) = syscall_name(nr as i64) {
        msg.push(b" (");
        msg.push(n.as_bytes());
        msg.push(b")");
    }
    msg.push(b", which its filter forbids; stopping the VMM\n");
    // SAFETY: write(2) of a local buffer, then _exit: no destructors run
    // and nothing is flushed, as for a kill (128 + SIGSYS).
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// A message built in a fixed buffer (the signal handler cannot allocate).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: i64) {
        if v < 0 {
            self.push(b"-");
            v = -v;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

fn install_reporter() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO, installed
    // for SIGSYS only; the handler is async-signal-safe (see on_sigsys).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(Error::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

type Job = Box<dyn FnOnce() + Send>;

/// The spawner: a thread started by `set_mode` before any filter exists, so
/// the threads it starts inherit at most the VMM role's filter (the main
/// thread's, which the spawner does not carry either: it is its own
/// thread). It takes `enter(Vmm)` itself once, so that a compromised
/// caller cannot use it to get an unfiltered thread.
fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                if let Err(e) = enter(Role::Vmm) {
                    tracing::error!("spawner: {e}");
                    return;
                }
                for job in rx {
                    job();
                }
            })
            .expect("starting the seccomp spawner thread at start-up");
        Mutex::new(tx)
    })
}

/// Starts a thread named `name` that installs `role`'s filter, then runs
/// `body`. With filters on, the spawner thread makes the `clone`, so the
/// new thread does not inherit its caller's (perhaps narrower) filter. A
/// thread whose filter cannot go in does not run `body`: it ends, logging
/// why, and its join gives `None`.
pub fn spawn<T: Send + 'static>(
    name: String,
    role: Role,
    body: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Option<T>>> {
    let start = move || -> Option<T> {
        if let Err(e) = enter(role) {
            tracing::error!("{}: {e}", std::thread::current().name().unwrap_or("?"));
            return None;
        }
        Some(body())
    };
    let builder = std::thread::Builder::new().name(name);
    if mode() == Mode::Off {
        return builder.spawn(start);
    }
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(start));
    });
    let sent = spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job);
    if sent.is_err() {
        return Err(std::io::Error::other("the seccomp spawner thread is gone"));
    }
    rx.recv()
        .map_err(|_| std::io::Error::other("the seccomp spawner thread is gone"))?
}

/// Test hook: `NFVISOR_TEST_SECCOMP_PROBE=ROLE` makes the first thread of
/// that role, right after its filter went in, make one system call no role
/// but the VMM's allows (`socket(AF_INET, SOCK_DGRAM)`), so the suite sees
/// what each mode does with it. Says what came back on stderr.
pub fn test_probe(role: Role) {
    static FIRED: AtomicU8 = AtomicU8::new(0);
    // (read only in a build with the `test-hooks` feature: the suite's)
    if !cfg!(feature = "test-hooks") {
        return;
    }
    let Ok(wanted) = std::env::var("NFVISOR_TEST_SECCOMP_PROBE") else {
        return;
    };
    if wanted != role.name() || FIRED.swap(1, Ordering::SeqCst) != 0 {
        return;
    }
    // SAFETY: socket(2) with constant arguments; the descriptor, if any, is
    // closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd >= 0 {
        // SAFETY: closes the descriptor just made.
        unsafe { libc::close(fd) };
        eprintln!(
            "nfvisor: seccomp probe: socket() from a {} thread was allowed",
            role.name()
        );
    } else {
        eprintln!(
            "nfvisor: seccomp probe: socket() from a {} thread failed: {}",
            role.name(),
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests;
