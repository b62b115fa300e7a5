//! Real-time settings, read back from the kernel while the VM runs. These
//! tests take a lock so they run one at a time: on two cores a SCHED_FIFO
//! vCPU starves a parallel test.

mod common;
use common::*;
use std::sync::Mutex;
use std::time::Duration;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
const T: Duration = Duration::from_secs(120);

fn vcpu_tid(line: &str) -> i32 {
    line.rsplit(' ').next().unwrap().trim().parse().unwrap()
}

fn status_field(pid: u32, tid: i32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap()
        .trim()
        .to_string()
}

fn policy(tid: i32) -> (i32, i32) {
    // SAFETY: reads the policy of a thread that exists (checked by the caller).
    let p = unsafe { libc::sched_getscheduler(tid) };
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is valid for the write.
    unsafe { libc::sched_getparam(tid, &mut param) };
    (p, param.sched_priority)
}

fn last_cpu() -> usize {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    *rt::parse_cpu_list(online.trim()).unwrap().last().unwrap()
}

#[test]
fn vcpu_threads_have_the_asked_affinity_and_policy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = last_cpu().to_string();
    let mut vm = Running::start(&[
        "run",
        "--cmdline",
        "samples=200000 period_us=500",
        "--cpus",
        &cpu,
        "--rt-priority",
        "10",
        "--housekeeping-cpus",
        "0",
        "--mlock",
        "--prefault",
    ]);
    let tid = vcpu_tid(&vm.wait_for("vCPU 0 runs on host thread"));
    let pid = vm.pid();
    assert_eq!(status_field(pid, tid, "Cpus_allowed_list:"), cpu);
    assert_eq!(policy(tid), (libc::SCHED_FIFO, 10));
    // only the vCPU threads are real-time: the main thread stays SCHED_OTHER on the housekeeping CPU
    assert_eq!(policy(pid as i32).0, libc::SCHED_OTHER);
    assert_eq!(status_field(pid, pid as i32, "Cpus_allowed_list:"), "0");
    // guest memory is locked
    let locked_kb: u64 = status_field(pid, pid as i32, "VmLck:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    assert!(locked_kb >= 32 * 1024, "VmLck {locked_kb} kB");
    vm.wait_for("applied mlock");
}

#[test]
fn exits_can_be_disabled_and_halt_polling_set() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let r = nfvisor(
        &[
            "run",
            "--cmdline",
            "samples=200 period_us=200",
            "--disable-exits",
            "hlt,pause",
            "--halt-poll-ns",
            "0",
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    let settings = doc["vm"]["settings"].as_array().unwrap();
    let applied = |name: &str| {
        settings
            .iter()
            .any(|s| s["name"] == name && s["applied"] == true)
    };
    assert!(
        applied("disable-exits") && applied("halt-poll-ns"),
        "{settings:?}"
    );
    // with HLT exits disabled the guest halts inside the vCPU: KVM counts no
    // halt exits. A paravirtual KVM accepts the capability but still traps
    // HLT: then the report must say so instead of claiming it.
    let halts = doc["vm"]["vcpus"][0]["kvm_stats"]["halt_exits"]
        .as_u64()
        .unwrap();
    if doc["vm"]["kvm_kind"] == "hardware" {
        assert_eq!(halts, 0);
    } else if halts > 0 {
        let warnings = doc["vm"]["warnings"].as_array().unwrap();
        assert!(
            warnings
                .iter()
                .any(|w| w.as_str().unwrap().contains("not honoured")),
            "{warnings:?}"
        );
    }
    assert_eq!(doc["guest"]["histograms"][0]["count"], 200);
}

/// A 2 MiB hugepage count from sysfs (nr_hugepages, free_hugepages, ...).
fn hugepages_2m(f: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn set_hugepages(n: u64) -> u64 {
    let before = hugepages_2m("nr_hugepages");
    std::fs::write(
        "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
        n.to_string(),
    )
    .unwrap();
    before
}

#[test]
fn hugepages_are_used_when_reserved_and_refused_with_the_fix_when_not() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // the pool goes back however the test ends (the vhost-user tests'
    // testpmd needs it after this)
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_hugepages(self.0);
        }
    }
    let _restore = Restore(set_hugepages(0));
    let r = nfvisor(&["run", "--guest", "hello", "--hugepages", "2M"], T);
    assert_eq!(r.code, 71, "{}", r.stderr);
    assert!(
        r.stderr.contains("nr_hugepages"),
        "the error says how to reserve them: {}",
        r.stderr
    );
    // best effort: runs without them and says so
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--hugepages",
            "2M",
            "--rt-best-effort",
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let settings = json(&r)["vm"]["settings"].as_array().unwrap().clone();
    assert!(settings
        .iter()
        .any(|s| s["name"] == "hugepages Size2M" && s["applied"] == false));

    // 32 more than are in use (a testpmd's or another run's pages stay
    // theirs: an absolute 32 could leave none free)
    set_hugepages(hugepages_2m("nr_hugepages") - hugepages_2m("free_hugepages") + 32);
    let mut vm = Running::start(&[
        "run",
        "--cmdline",
        "samples=200000",
        "--hugepages",
        "2M",
        "--memory",
        "32M",
    ]);
    vm.wait_for("vCPU 0 runs on host thread");
    let read = hugepages_2m;
    // pages in use plus pages reserved for the mapping (faulted in lazily)
    let (total, free, reserved) = (
        read("nr_hugepages"),
        read("free_hugepages"),
        read("resv_hugepages"),
    );
    drop(vm);
    assert!(
        total - free + reserved >= 16,
        "16 hugepages for 32 MiB: total {total} free {free} reserved {reserved}"
    );
}

#[test]
fn memory_binds_to_a_numa_node() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--numa-node",
            "0",
            "--cpus",
            "0",
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    let settings = doc["vm"]["settings"].as_array().unwrap();
    assert!(
        settings
            .iter()
            .any(|s| s["name"] == "numa-node" && s["applied"] == true),
        "{settings:?}"
    );
}

/// Only the vCPUs named by --realtime-vcpus get SCHED_FIFO (Nova's
/// hw:cpu_realtime_mask): vCPU 0 stays ordinary, vCPU 1 is real-time; a
/// vCPU the VM lacks is refused by name.
#[test]
fn only_the_named_vcpus_are_real_time() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut vm = Running::start(&[
        "run",
        "--vcpus",
        "2",
        "--cmdline",
        "samples=200000 period_us=500",
        "--rt-priority",
        "10",
        "--realtime-vcpus",
        "1",
    ]);
    let t0 = vcpu_tid(&vm.wait_for("vCPU 0 runs on host thread"));
    let t1 = vcpu_tid(&vm.wait_for("vCPU 1 runs on host thread"));
    assert_eq!(policy(t0).0, libc::SCHED_OTHER);
    assert_eq!(policy(t1), (libc::SCHED_FIFO, 10));
    drop(vm);
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--rt-priority",
            "10",
            "--realtime-vcpus",
            "3",
        ],
        T,
    );
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(
        r.stderr.contains("names vCPU 3, but the VM has 1"),
        "{}",
        r.stderr
    );
}
