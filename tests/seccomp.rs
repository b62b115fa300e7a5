//! Seccomp: every thread that runs a guest carries its role's filter, and
//! a call outside a vCPU's list is stopped and reported (`on`) or let
//! through for the kernel to log (`log`). The test hook
//! NFVISOR_TEST_SECCOMP_PROBE=vcpu makes vCPU 0 call socket(AF_INET) right
//! after its filter went in.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn probed(mode: &str) -> Run {
    nfvisor_env(
        &["run", "--guest", "hello", "--seccomp", mode, "--json"],
        &[("NFVISOR_TEST_SECCOMP_PROBE", "vcpu")],
        T,
    )
}

#[test]
fn every_thread_of_a_run_is_filtered_by_default() {
    let r = nfvisor(&["run", "--guest", "hello", "--vcpus", "2", "--json"], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    assert_eq!(doc["seccomp"]["mode"], "on", "{doc}");
    // the main thread, the spawner, the console, two vCPUs
    let n = doc["seccomp"]["filtered_threads"].as_u64().unwrap();
    assert!(n >= 5, "{n} filtered threads\n{doc}");
}

#[test]
fn a_forbidden_call_from_a_vcpu_stops_the_vmm_and_says_which() {
    let r = probed("on");
    assert_eq!(r.code, 128 + 31, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "thread 'vcpu0' (role vcpu) made system call {} (socket), which its filter forbids",
            libc::SYS_socket
        )),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("guest exited"), "{}", r.stdout);
}

#[test]
fn log_mode_lets_the_call_through_and_off_installs_nothing() {
    for mode in ["log", "off"] {
        let r = probed(mode);
        assert_eq!(r.code, 0, "--seccomp {mode}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("seccomp probe: socket() from a vcpu thread was allowed"),
            "--seccomp {mode}: {}",
            r.stderr
        );
        let doc = json(&r);
        assert_eq!(doc["seccomp"]["mode"], mode);
        let n = doc["seccomp"]["filtered_threads"].as_u64().unwrap();
        assert_eq!(
            n == 0,
            mode == "off",
            "--seccomp {mode}: {n} filtered threads"
        );
    }
}

#[test]
fn a_bad_mode_is_refused_before_anything_runs() {
    let r = nfvisor(&["run", "--guest", "hello", "--seccomp", "strict"], T);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("strict"), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
}
