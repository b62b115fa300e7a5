//! `nfvisor host check` and `host tune` through the binary: fixture roots
//! modelled on real hosts, and the real machine once.

mod common;
use common::*;
use rt::host::fixture::{build, HostModel};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn fixture(name: &str, model: HostModel) -> std::path::PathBuf {
    let dir = scratch(name);
    build(&dir, model).unwrap();
    dir
}

fn status_of(doc: &serde_json::Value, id: &str) -> String {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == id)
        .unwrap_or_else(|| panic!("no {id}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn check_gives_each_host_model_its_verdicts() {
    let tuned = fixture("tuned", HostModel::Tuned);
    let r = nfvisor(
        &["host", "check", "--json", "--root", tuned.to_str().unwrap()],
        T,
    );
    assert_eq!(r.code, 0, "a tuned host has no failure: {}", r.stdout);
    let doc = json(&r);
    assert_eq!(doc["rt_cpus"], serde_json::json!([2, 3]));
    assert_eq!(status_of(&doc, "isolation.rt-cpus"), "pass");
    assert_eq!(status_of(&doc, "firmware.smt"), "firmware");

    let untuned = fixture("untuned", HostModel::Untuned);
    let r = nfvisor(
        &[
            "host",
            "check",
            "--cpus",
            "2-3",
            "--root",
            untuned.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(r.code, 1, "an untuned host fails: {}", r.stdout);
    assert!(r.stdout.contains("FAIL") && r.stdout.contains("isolation.rt-cpus"));
    assert!(
        r.stdout
            .contains("fix: echo -1 > /proc/sys/kernel/sched_rt_runtime_us"),
        "{}",
        r.stdout
    );

    let nokvm = fixture("nokvm", HostModel::NoKvm);
    let doc = json(&nfvisor(
        &[
            "host",
            "check",
            "--cpus",
            "2",
            "--json",
            "--root",
            nokvm.to_str().unwrap(),
        ],
        T,
    ));
    assert_eq!(status_of(&doc, "kvm.dev"), "fail");
    assert_eq!(doc["kvm"], "none");

    let nested = fixture("nested", HostModel::NestedPvm);
    let doc = json(&nfvisor(
        &[
            "host",
            "check",
            "--cpus",
            "2",
            "--json",
            "--root",
            nested.to_str().unwrap(),
        ],
        T,
    ));
    assert_eq!(doc["kvm"], "nested-pvm");
    assert_eq!(status_of(&doc, "kvm.virtualization"), "warn");
}

#[test]
fn check_runs_on_this_machine() {
    let r = nfvisor(&["host", "check", "--cpus", "0", "--json"], T);
    assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
    let doc = json(&r);
    assert!(doc["findings"].as_array().unwrap().len() > 20);
    assert_eq!(status_of(&doc, "kvm.dev"), "pass");
}

#[test]
fn tune_dry_run_apply_and_undo() {
    let root = fixture("tune", HostModel::Untuned);
    let rs = root.to_str().unwrap();
    let thp = root.join("sys/kernel/mm/transparent_hugepage/enabled");
    let rt_runtime = root.join("proc/sys/kernel/sched_rt_runtime_us");
    let before = (
        std::fs::read_to_string(&thp).unwrap(),
        std::fs::read_to_string(&rt_runtime).unwrap(),
    );

    let r = nfvisor(&["host", "tune", "--cpus", "2-3", "--root", rs], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("echo -1 > /proc/sys/kernel/sched_rt_runtime_us"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("isolcpus=managed_irq,domain,2-3"),
        "the reboot-only fixes are printed: {}",
        r.stdout
    );
    assert_eq!(
        std::fs::read_to_string(&rt_runtime).unwrap(),
        before.1,
        "a dry run changes nothing"
    );

    let undo = root.join("undo.json");
    let r = nfvisor(
        &[
            "host",
            "tune",
            "--cpus",
            "2-3",
            "--apply",
            "--hugepages",
            "64",
            "--undo-file",
            undo.to_str().unwrap(),
            "--root",
            rs,
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("REFUSED") && r.stdout.contains("/proc/irq/24/"),
        "managed IRQ reported: {}",
        r.stdout
    );
    assert_eq!(
        std::fs::read_to_string(&thp).unwrap().trim(),
        "always madvise [never]"
    );
    assert_eq!(std::fs::read_to_string(&rt_runtime).unwrap().trim(), "-1");
    let after = json(&nfvisor(
        &["host", "check", "--cpus", "2-3", "--json", "--root", rs],
        T,
    ));
    assert_eq!(status_of(&after, "sched.rt-throttling"), "pass");
    assert_eq!(status_of(&after, "mem.thp"), "pass");

    let r = nfvisor(
        &[
            "host",
            "tune",
            "--undo",
            undo.to_str().unwrap(),
            "--root",
            rs,
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        (
            std::fs::read_to_string(&thp).unwrap(),
            std::fs::read_to_string(&rt_runtime).unwrap()
        ),
        before
    );
}

#[test]
fn tune_and_check_refuse_bad_input_and_change_nothing() {
    let root = fixture("tune-bad", HostModel::Untuned);
    let rs = root.to_str().unwrap();
    let r = nfvisor(&["host", "tune", "--cpus", "", "--apply", "--root", rs], T);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("empty"), "{}", r.stderr);
    let r = nfvisor(&["host", "check", "--cpus", "12", "--root", rs], T);
    assert_eq!(r.code, 78);
    assert!(r.stderr.contains("CPU 12 does not exist"), "{}", r.stderr);
    let r = nfvisor(&["host", "check", "--root", "/nonexistent/root"], T);
    assert_eq!(r.code, 78);
    assert!(r.stderr.contains("/nonexistent/root"), "{}", r.stderr);
    // an unwritable file half way through: everything rolled back
    std::fs::write(
        root.join(".fixture/deny"),
        "/sys/devices/virtual/workqueue/cpumask\n",
    )
    .unwrap();
    let rt_runtime = root.join("proc/sys/kernel/sched_rt_runtime_us");
    let r = nfvisor(
        &[
            "host",
            "tune",
            "--cpus",
            "2-3",
            "--apply",
            "--undo-file",
            root.join("u.json").to_str().unwrap(),
            "--root",
            rs,
        ],
        T,
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("rolled back"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(&rt_runtime).unwrap().trim(),
        "950000"
    );
    assert!(!root.join("u.json").exists());
    // a corrupt /proc file stops the plan before any change
    std::fs::write(root.join(".fixture/deny"), "").unwrap();
    std::fs::write(root.join("proc/sys/kernel/timer_migration"), "maybe\n").unwrap();
    let r = nfvisor(
        &["host", "tune", "--cpus", "2-3", "--apply", "--root", rs],
        T,
    );
    assert_eq!(r.code, 78);
    assert!(
        r.stderr.contains("timer_migration") && r.stderr.contains("maybe"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&rt_runtime).unwrap().trim(),
        "950000"
    );
    // an undo file that is not one
    let bogus = root.join("bogus.json");
    std::fs::write(&bogus, "{}").unwrap();
    let r = nfvisor(
        &[
            "host",
            "tune",
            "--undo",
            bogus.to_str().unwrap(),
            "--root",
            rs,
        ],
        T,
    );
    assert_eq!(r.code, 78);
    assert!(r.stderr.contains("bogus.json"), "{}", r.stderr);
}

/// Every file under `dir` (but `skip`) with its contents.
fn tree(dir: &std::path::Path, skip: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            if name == skip || name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.insert(name, bytes);
            }
        }
    }
    out
}

/// The undo journal is on disk (0600) before the first change: a `tune
/// --apply` killed after any one of its writes is undone to the byte by
/// `--undo`.
#[test]
fn a_tune_killed_after_any_write_is_undone_from_its_journal() {
    let plan = {
        let root = fixture("tune-plan", HostModel::Untuned);
        let rs = root.to_str().unwrap();
        let r = nfvisor(
            &[
                "host",
                "tune",
                "--cpus",
                "2-3",
                "--hugepages",
                "64",
                "--json",
                "--root",
                rs,
            ],
            T,
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        json(&r)["plan"]["changes"].as_array().unwrap().len()
    };
    assert!(plan >= 5, "{plan} changes planned");
    for n in 1..=plan {
        let root = fixture(&format!("tune-kill-{n}"), HostModel::Untuned);
        let rs = root.to_str().unwrap();
        let pristine = tree(&root, "undo.json");
        let undo = root.join("undo.json");
        let u = undo.to_str().unwrap();
        let r = nfvisor_env(
            &[
                "host",
                "tune",
                "--cpus",
                "2-3",
                "--hugepages",
                "64",
                "--apply",
                "--undo-file",
                u,
                "--root",
                rs,
            ],
            &[("NFVISOR_TEST_TUNE_KILL_AFTER", &n.to_string())],
            T,
        );
        assert_eq!(r.code, 86, "write {n}: {}", r.stderr);
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&undo).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "write {n}");
        }
        assert_ne!(
            tree(&root, "undo.json"),
            pristine,
            "write {n} changed nothing"
        );
        let r = nfvisor(&["host", "tune", "--undo", u, "--root", rs], T);
        assert_eq!(r.code, 0, "undo after write {n}: {}", r.stderr);
        assert_eq!(tree(&root, "undo.json"), pristine, "undo after write {n}");
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// An undo file naming a path `host tune` never writes is refused whole.
#[test]
fn an_undo_file_naming_another_path_is_refused() {
    let root = fixture("tune-evil", HostModel::Untuned);
    let rs = root.to_str().unwrap();
    let victim = root.join("etc/shadow");
    std::fs::create_dir_all(victim.parent().unwrap()).unwrap();
    std::fs::write(&victim, "root:x:...\n").unwrap();
    let undo = root.join("evil.json");
    for path in ["/etc/shadow", "/proc/irq/../../etc/shadow"] {
        std::fs::write(
            &undo,
            serde_json::json!({
                "nfvisor_undo": 1,
                "root": rs,
                "changes": [{"what": "x", "path": path, "old": "owned\n", "new": "", "kind": "file"}]
            })
            .to_string(),
        )
        .unwrap();
        let r = nfvisor(
            &[
                "host",
                "tune",
                "--undo",
                undo.to_str().unwrap(),
                "--root",
                rs,
            ],
            T,
        );
        assert_ne!(r.code, 0, "{path}: {}", r.stderr);
        assert!(r.stderr.contains("never changes"), "{path}: {}", r.stderr);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root:x:...\n");
    }
}
