//! What each role may call. Read off `strace -ff` of the whole test suite
//! (every device, migration both ways, snapshots, the control socket and
//! the REST API), then kept to what the role's code does: a call a role
//! makes only on a path the suite does not reach shows up as a clear
//! report under `--seccomp on` and as an audit record under `log`.

use crate::Role;

macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name)),)*]
    };
}

type List = &'static [(libc::c_long, &'static str)];

/// What every thread does whatever its job: memory, locks, time, signals
/// for the Rust runtime and the allocator, descriptor bookkeeping, and
/// the reads and writes of its eventfds and logs.
const BASE: List = calls!(
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_close,
    SYS_futex,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_brk,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_gettid,
    SYS_getpid,
    SYS_exit,
    SYS_exit_group,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_tgkill,
    SYS_getrandom,
    SYS_restart_syscall,
    SYS_statx,
    SYS_newfstatat,
    SYS_fstat,
    SYS_fcntl,
    SYS_lseek,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_poll,
    SYS_ppoll,
    // answered ENOSYS by a filter stacked on top (see `answered`)
    SYS_clone3,
    // glibc's free() may read /proc/sys/vm/overcommit_memory on any
    // thread; roles that open nothing get EACCES (see `answered`)
    SYS_openat,
);

/// A vCPU: KVM_RUN and what its exits do. Device activation runs here
/// (the driver's status write is a vCPU exit): eventfds, KVM's routes and
/// ioeventfds, the binary stats file, worker placement. Threads it starts
/// go through the spawner, so it needs no clone.
const VCPU: List = calls!(
    SYS_ioctl,
    SYS_pread64,
    SYS_eventfd2,
    SYS_sched_setaffinity,
    SYS_sched_getscheduler,
    SYS_sched_setscheduler,
    SYS_sched_getparam,
    SYS_dup,
    SYS_openat,
);

/// Any queue worker: its epoll, its stop and kick eventfds, its rate
/// limiter's timer.
const QUEUE_WORKER: List = calls!(
    SYS_ioctl,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_eventfd2,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
);

/// A net, vsock or rng queue worker: the TAP (read, write, its ioctls) and
/// the vsock's UNIX sockets toward the host; a vhost-user NIC's thread:
/// its backend's socket and, for a migration, the dirty log it shares
/// with the backend (a memfd it makes, sizes and maps).
const DEVICE_WORKER: List = calls!(
    SYS_socket,
    SYS_connect,
    SYS_accept4,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_unlink,
    SYS_memfd_create,
    SYS_ftruncate,
    // a queue worker placed as `cpus=` and `rt-priority=` say, and read
    // back
    SYS_sched_setaffinity,
    SYS_sched_getaffinity,
    SYS_sched_setscheduler,
    SYS_sched_getscheduler,
    SYS_sched_getparam,
);

/// A disk's queue worker and its I/O threads: the only role with io_uring,
/// which it sets up itself, restricted to the operations it submits.
const BLOCK_WORKER: List = calls!(
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_fdatasync,
    SYS_fsync,
    SYS_fallocate,
);

/// The metrics server: its socket, and /proc for the vCPU threads' times.
const METRICS: List = calls!(
    SYS_ioctl,
    SYS_accept4,
    SYS_recvfrom,
    SYS_sendto,
    SYS_shutdown,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_openat,
    SYS_pread64,
    SYS_sched_getscheduler,
    SYS_sched_getparam,
    SYS_getdents64,
);

/// The console copier and the interrupt injector: sleep, write, one KVM
/// interrupt ioctl, their own real-time placement.
const HELPER: List = calls!(SYS_ioctl, SYS_sched_setscheduler, SYS_sched_setaffinity);

/// A switch PMD: rings in memory it polls, eventfds and TAPs it writes
/// (in BASE); the socket of a frontend it cuts off.
const SWITCH_PMD: List = calls!(SYS_shutdown);

/// A switch port's protocol thread and the `vhost-user-backend` crate's
/// threads under it: the port's socket (accept or connect, messages with
/// descriptors, shutdown), epoll and eventfds, the threads it starts and
/// names.
const SWITCH_PORT: List = calls!(
    SYS_socket,
    SYS_connect,
    SYS_accept4,
    SYS_shutdown,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_eventfd2,
    SYS_prctl,
    SYS_set_robust_list,
    SYS_rseq,
);

/// The VMM's own threads: building and restoring VMs, files, sockets,
/// migration, memory policy, real-time placement, starting threads and
/// installing their filters. No exec, no process, no mount, no ptrace, no
/// module, no BPF, no key or namespace calls.
const VMM: List = calls!(
    SYS_ioctl,
    SYS_openat,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getdents64,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_unlink,
    SYS_unlinkat,
    SYS_rmdir,
    SYS_chmod,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_flock,
    SYS_statfs,
    SYS_fstatfs,
    SYS_copy_file_range,
    SYS_sendfile,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_pipe2,
    SYS_memfd_create,
    SYS_eventfd2,
    SYS_signalfd4,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_socket,
    SYS_socketpair,
    SYS_bind,
    SYS_listen,
    SYS_accept4,
    SYS_connect,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_mlock,
    SYS_mlock2,
    SYS_munlock,
    SYS_mlockall,
    SYS_mbind,
    SYS_set_mempolicy,
    SYS_get_mempolicy,
    SYS_sched_setaffinity,
    SYS_sched_getscheduler,
    SYS_sched_setscheduler,
    SYS_sched_getparam,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_getpriority,
    SYS_setpriority,
    SYS_prlimit64,
    SYS_getrlimit,
    SYS_uname,
    SYS_sysinfo,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_getcwd,
    SYS_kill,
    SYS_rt_sigaction,
    SYS_rt_sigtimedwait,
    SYS_set_robust_list,
    SYS_set_tid_address,
    SYS_rseq,
    SYS_prctl,
    SYS_seccomp,
    SYS_wait4,
    SYS_clock_getres,
    SYS_clock_gettime,
);

/// `role`'s allowed calls. The VMM's list holds every other role's too
/// (the roles nest: a thread inherits its spawner's filter).
pub fn allowed(role: Role) -> Vec<(libc::c_long, &'static str)> {
    let own: &[List] = match role {
        Role::Vmm => &[
            VMM,
            VCPU,
            QUEUE_WORKER,
            DEVICE_WORKER,
            BLOCK_WORKER,
            METRICS,
            HELPER,
            SWITCH_PMD,
            SWITCH_PORT,
        ],
        Role::Vcpu => &[VCPU],
        Role::DeviceWorker => &[QUEUE_WORKER, DEVICE_WORKER],
        Role::BlockWorker => &[QUEUE_WORKER, BLOCK_WORKER],
        Role::Metrics => &[METRICS],
        Role::Helper => &[HELPER],
        Role::SwitchPmd => &[SWITCH_PMD],
        Role::SwitchPort => &[SWITCH_PORT],
    };
    let mut all: Vec<_> = std::iter::once(BASE)
        .chain(own.iter().copied())
        .flat_map(|l| l.iter().copied())
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// An ioctl request's type byte (bits 8-15): 0xAE for KVM, 'T' for the TUN
/// device and the terminal/socket requests (FIONBIO, FIONREAD), 0x12 for
/// block devices.
const KVM_IOCTLS: u64 = 0xAE;
const TUN_AND_FIO_IOCTLS: u64 = b'T' as u64;
const BLOCK_DEVICE_IOCTLS: u64 = 0x12;

/// Calls a role may make only with certain arguments: (call, argument,
/// the mask of the argument compared, the values it may have).
pub struct Narrowed {
    pub call: libc::c_long,
    pub arg: u8,
    pub mask: u64,
    pub values: &'static [u64],
}

pub fn narrowed(role: Role) -> Vec<Narrowed> {
    let ioctl = |values: &'static [u64]| Narrowed {
        call: libc::SYS_ioctl,
        arg: 1,
        mask: 0xff00,
        values,
    };
    match role {
        // the VMM's own threads use every kind of ioctl they open a
        // device for
        Role::Vmm => vec![],
        Role::Vcpu | Role::Helper => vec![ioctl(&[KVM_IOCTLS << 8])],
        Role::DeviceWorker => vec![
            ioctl(&[TUN_AND_FIO_IOCTLS << 8]),
            // the vsock muxer reaches host services over UNIX sockets only
            Narrowed {
                call: libc::SYS_socket,
                arg: 0,
                mask: u32::MAX as u64,
                values: &[libc::AF_UNIX as u64],
            },
        ],
        Role::BlockWorker => vec![ioctl(&[BLOCK_DEVICE_IOCTLS << 8, TUN_AND_FIO_IOCTLS << 8])],
        Role::Metrics => vec![ioctl(&[TUN_AND_FIO_IOCTLS << 8])],
        Role::SwitchPmd => vec![],
        // a client port connects over UNIX sockets only
        Role::SwitchPort => vec![Narrowed {
            call: libc::SYS_socket,
            arg: 0,
            mask: u32::MAX as u64,
            values: &[libc::AF_UNIX as u64],
        }],
    }
}

/// Calls a role's list lets through only for a stacked filter to answer
/// them with an error instead (the stricter action wins, and an errno is
/// stricter than allow but milder than the trap a missing call gets):
/// clone3 gets ENOSYS so glibc falls back to clone, whose flags a filter
/// can read; the roles that have no file to open get EACCES for openat
/// (glibc's malloc then simply keeps its heap).
pub fn answered(role: Role) -> Vec<(libc::c_long, i32)> {
    let mut v = vec![(libc::SYS_clone3, libc::ENOSYS)];
    if matches!(
        role,
        Role::DeviceWorker | Role::BlockWorker | Role::Helper | Role::SwitchPmd | Role::SwitchPort
    ) {
        v.push((libc::SYS_openat, libc::EACCES));
    }
    v
}

/// The name of a call that some list names (for the reports).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    [
        BASE,
        VMM,
        VCPU,
        DEVICE_WORKER,
        BLOCK_WORKER,
        METRICS,
        HELPER,
        SWITCH_PMD,
        SWITCH_PORT,
    ]
    .iter()
    .flat_map(|l| l.iter())
    .find(|(n, _)| *n == nr)
    .map(|(_, name)| name.strip_prefix("SYS_").unwrap_or(name))
}
