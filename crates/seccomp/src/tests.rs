use super::*;

#[test]
fn every_role_builds_for_every_mode() {
    for role in Role::ALL {
        for mode in [Mode::On, Mode::Log] {
            let program = filter(role, mode).unwrap();
            assert!(!program.is_empty(), "{role:?}");
        }
        assert!(!answers(role).unwrap().is_empty());
    }
}

#[test]
fn the_roles_nest_inside_the_vmms() {
    let vmm: std::collections::BTreeSet<_> = lists::allowed(Role::Vmm).into_iter().collect();
    for role in Role::ALL {
        for call in lists::allowed(role) {
            assert!(
                vmm.contains(&call),
                "{role:?} allows {call:?}, the VMM does not"
            );
        }
        for n in lists::narrowed(role) {
            assert!(vmm.iter().any(|(nr, _)| *nr == n.call), "{role:?}");
        }
    }
}

#[test]
fn names_and_modes_read_back() {
    assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
    assert_eq!(syscall_name(100_000), None);
    for m in [Mode::On, Mode::Log, Mode::Off] {
        assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
    }
    let e = "strict".parse::<Mode>().unwrap_err();
    assert!(e.contains("strict") && e.contains("on, log, off"), "{e}");
}

/// A filter really goes in and really narrows: in a child process (a
/// filter cannot be taken off), the device worker's list, answering EPERM
/// instead of trapping, refuses an AF_INET socket and a call on no list,
/// lets an AF_UNIX socket through; clone3 gets ENOSYS, openat EACCES.
#[test]
fn a_device_workers_filter_refuses_what_it_must_in_a_forked_child() {
    // built before the fork: the child of a threaded process must not
    // allocate
    let role = filter_with(Role::DeviceWorker, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
    let answers = answers(Role::DeviceWorker).unwrap();
    // SAFETY: fork in a test process; the child makes raw system calls only
    // and _exits, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: raw calls on constants and the programs built above.
        let code = unsafe {
            let errno = || *libc::__errno_location();
            if answers
                .iter()
                .any(|a| seccompiler::apply_filter(a).is_err())
                || seccompiler::apply_filter(&role).is_err()
            {
                1
            } else if libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) != -1
                || errno() != libc::EPERM
            {
                2
            } else if libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0) < 0 {
                3
            } else if libc::syscall(libc::SYS_getppid) != -1 || errno() != libc::EPERM {
                4
            } else if libc::syscall(libc::SYS_clone3, 0usize, 0usize) != -1
                || errno() != libc::ENOSYS
            {
                5
            } else if libc::open(c"/proc/self/stat".as_ptr(), libc::O_RDONLY) != -1
                || errno() != libc::EACCES
            {
                6
            } else {
                0
            }
        };
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child failed check {}",
        libc::WEXITSTATUS(status)
    );
}
