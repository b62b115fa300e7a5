//! `nfvisor flavor`: a Nova flavor as `openstack flavor show -f json`
//! prints it becomes the TOML file `nfvisor run --config` takes; what
//! Nova or nfvisor refuses exits 78 naming the key and its value.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// What `openstack flavor show -f json` prints for a realtime vRAN flavor
/// (recent clients: properties as an object).
const FLAVOR: &str = r#"{
  "OS-FLV-DISABLED:disabled": false,
  "OS-FLV-EXT-DATA:ephemeral": 0,
  "access_project_ids": null,
  "description": "vRAN DU, realtime",
  "disk": 20,
  "id": "6b1c2d8e-1c1f-4f43-9a8b-2f5e0c9d7a10",
  "name": "vran.du.rt4",
  "os-flavor-access:is_public": true,
  "properties": {
    "aggregate_instance_extra_specs:pinned": "true",
    "hw:cpu_policy": "dedicated",
    "hw:cpu_realtime": "yes",
    "hw:cpu_realtime_mask": "^0",
    "hw:cpu_thread_policy": "isolate",
    "hw:emulator_threads_policy": "isolate",
    "hw:mem_page_size": "1GB",
    "hw:numa_nodes": "1",
    "hw:pmu": "false",
    "hw:vif_multiqueue_enabled": "true",
    "quota:cpu_quota": "10000"
  },
  "ram": 4096,
  "rxtx_factor": 1.0,
  "swap": 0,
  "vcpus": 4
}"#;

/// Older clients print the properties as one string.
const MIXED_FLAVOR: &str = r#"{
  "OS-FLV-DISABLED:disabled": false,
  "OS-FLV-EXT-DATA:ephemeral": 0,
  "disk": 10,
  "id": "0c1d5e3a-8f61-4b8e-9d1f-3e2a7b6c5d40",
  "name": "vnf.mixed",
  "os-flavor-access:is_public": true,
  "properties": "hw:cpu_dedicated_mask='^0-1', hw:cpu_policy='mixed', hw:emulator_threads_policy='share', hw:mem_page_size='large', trait:HW_CPU_X86_AVX2='required'",
  "ram": 2048,
  "rxtx_factor": 1.0,
  "swap": "",
  "vcpus": 4
}"#;

/// A host tree: 16 cores of 2 threads (n, n+16); node 0 holds cores 0-7,
/// node 1 cores 8-15. With `smt` false: CPUs 0-31, one thread each.
fn host_root(dir: &Path, smt: bool) -> PathBuf {
    let root = dir.join(if smt { "smt-root" } else { "flat-root" });
    for c in 0..32 {
        let t = root.join(format!("sys/devices/system/cpu/cpu{c}/topology"));
        std::fs::create_dir_all(&t).unwrap();
        let siblings = if smt {
            format!("{},{}\n", c % 16, c % 16 + 16)
        } else {
            format!("{c}\n")
        };
        std::fs::write(t.join("thread_siblings_list"), siblings).unwrap();
    }
    for (n, list) in [(0, "0-7,16-23"), (1, "8-15,24-31")] {
        let d = root.join(format!("sys/devices/system/node/node{n}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpulist"), format!("{list}\n")).unwrap();
    }
    root
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn a_realtime_flavor_becomes_a_config_file() {
    let dir = scratch("flavor-rt");
    let root = host_root(&dir, true);
    let f = write(&dir, "flavor.json", FLAVOR);
    let r = nfvisor(
        &[
            "flavor",
            "--extra-specs",
            &f,
            "--cpu-dedicated-set",
            "2-7,18-23",
            "--cpu-shared-set",
            "0-1,16-17",
            "--root",
            root.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = &r.stdout;
    // the mapping table and the notes are comments above the settings
    for line in [
        "# nfvisor configuration from OpenStack flavor \"vran.du.rt4\"",
        "# vCPU  host CPU  from               FIFO",
        "# 0     2         cpu_dedicated_set  -",
        "# 1     3         cpu_dedicated_set  80",
        "# VMM threads (housekeeping): 6",
        "# kept idle (SMT siblings): 18-22",
        "hw:vif_multiqueue_enabled=true: a NIC's queue pairs are the port's",
        "hw:pmu=false: the guest sees KVM's CPUID PMU leaf",
        "# ignored (not hw: keys): aggregate_instance_extra_specs:pinned='true', quota:cpu_quota='10000'",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    // ... and the rest is the configuration file's type
    let c: vmm::VmConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.vcpus, Some(4));
    assert_eq!(c.memory, Some(vmm::config::Size::MiB(4096)));
    // isolate: one thread per core; one more core for the VMM's threads
    assert_eq!(c.rt.cpus.as_deref(), Some("2-5"), "{text}");
    assert_eq!(c.rt.housekeeping_cpus.as_deref(), Some("6"));
    assert_eq!(c.rt.realtime_vcpus.as_deref(), Some("1-3"));
    assert_eq!(c.rt.rt_priority, Some(80));
    assert_eq!(c.rt.mlock, Some(true));
    assert_eq!(c.rt.hugepages.as_deref(), Some("1G"));
    assert_eq!(c.rt.numa_node, Some(0));
    // the real-time settings check out as `run` checks them
    let (spec, mem) = c.rt.resolve().unwrap();
    assert_eq!(spec.cpus, Some(vec![2, 3, 4, 5]));
    assert!(mem.mlock);
    // and the file round-trips
    let again: vmm::VmConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(again, c);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_older_clients_string_properties_as_json() {
    let dir = scratch("flavor-mixed");
    let root = host_root(&dir, true);
    let f = write(&dir, "mixed.json", MIXED_FLAVOR);
    let r = nfvisor(
        &[
            "flavor",
            "--extra-specs",
            &f,
            "--cpu-dedicated-set",
            "2-7,18-23",
            "--cpu-shared-set",
            "0-1,16-17",
            "--root",
            root.to_str().unwrap(),
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = json(&r);
    assert_eq!(j["flavor"], "vnf.mixed");
    let c: vmm::VmConfig = serde_json::from_value(j["config"].clone()).unwrap();
    // vCPUs 0-1 shared (one CPU of the shared set each), 2-3 dedicated
    assert_eq!(c.rt.cpus.as_deref(), Some("0-3"));
    let sets: Vec<&str> = j["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["set"].as_str().unwrap())
        .collect();
    assert_eq!(sets, ["shared", "shared", "dedicated", "dedicated"]);
    assert_eq!(c.rt.housekeeping_cpus.as_deref(), Some("0-1,16-17"));
    assert_eq!(c.rt.hugepages.as_deref(), Some("2M"));
    assert_eq!((c.rt.rt_priority, c.rt.realtime_vcpus), (None, None));
    assert_eq!(c.rt.numa_node, Some(0));
    assert_eq!(j["ignored"][0], "trait:HW_CPU_X86_AVX2='required'");
    assert!(j["notes"].to_string().contains("mixed"), "{}", j["notes"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn refusals_name_the_key_and_exit_78() {
    let dir = scratch("flavor-refused");
    let smt = host_root(&dir, true);
    let flat = host_root(&dir, false);
    for (i, (specs, flags, root, needles)) in [
        (
            r#"{"hw:cpu_realtime": "yes", "hw:cpu_realtime_mask": "^0"}"#,
            &["--cpu-dedicated-set", "2-7"][..],
            &smt,
            &["hw:cpu_realtime='yes'", "Cannot set realtime policy in a non dedicated cpu pinning policy"][..],
        ),
        (
            r#"{"hw:cpu_policy": "dedicated", "hw:cpu_realtime": "yes", "hw:cpu_realtime_mask": "0-3"}"#,
            &["--cpu-dedicated-set", "2-7"],
            &smt,
            &["hw:cpu_realtime_mask='0-3'", "at least 1 RT vCPU and 1 ordinary vCPU"],
        ),
        (
            r#"{"hw:emulator_threads_policy": "isolate"}"#,
            &[],
            &smt,
            &["hw:emulator_threads_policy='isolate'", "requires a dedicated CPU policy"],
        ),
        (
            r#"{"hw:locked_memory": "true"}"#,
            &[],
            &smt,
            &["hw:locked_memory='true'", "forbidden when mem_page_size is not set"],
        ),
        (
            r#"{"hw:numa_nodes": "2"}"#,
            &[],
            &smt,
            &["hw:numa_nodes='2'", "nfvisor does not model NUMA guests yet"],
        ),
        (
            r#"{"hw:cpu_policy": "dedicated", "hw:cpu_sockets": "2"}"#,
            &["--cpu-dedicated-set", "2-7"],
            &smt,
            &["hw:cpu_sockets='2'", "nfvisor does not map this key"],
        ),
        (
            r#"{"hw:cpu_policy": "dedicated"}"#,
            &["--cpu-dedicated-set", "2-3"],
            &smt,
            &["hw:cpu_policy='dedicated'", "needs 4 CPU(s) from --cpu-dedicated-set, it has 2 (2-3)"],
        ),
        (
            r#"{"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "require"}"#,
            &["--cpu-dedicated-set", "2-7"],
            &flat,
            &["hw:cpu_thread_policy='require'", "Host does not support hyperthreading or hyperthreading is disabled, but 'require' threads policy was requested"],
        ),
        (
            r#"{"hw:cpu_policy": "dedicated", "hw:mem_page_size": "3MB"}"#,
            &["--cpu-dedicated-set", "2-7"],
            &smt,
            &["hw:mem_page_size='3MB'"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let f = write(&dir, &format!("specs{i}.json"), specs);
        let mut args = vec![
            "flavor",
            "--extra-specs",
            &f,
            "--vcpus",
            "4",
            "--memory",
            "2048",
            "--root",
            root.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        let r = nfvisor(&args, T);
        assert_eq!(r.code, 78, "{specs}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{specs}: printed {}", r.stdout);
        for n in needles {
            assert!(r.stderr.contains(n), "{specs}: no {n:?} in {}", r.stderr);
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The file boots the hello guest here, the real-time parts best-effort
/// (hugepages or mlock may be missing on a test host): only the masked-in
/// vCPU gets SCHED_FIFO.
#[test]
fn run_takes_the_generated_file() {
    let dir = scratch("flavor-run");
    let online = rt::online_cpus().unwrap();
    let (specs, vcpus) = if online.len() >= 2 {
        (
            r#"{"hw:cpu_policy": "dedicated", "hw:cpu_realtime": "yes", "hw:cpu_realtime_mask": "^0", "hw:mem_page_size": "2MB", "hw:locked_memory": "true"}"#,
            2,
        )
    } else {
        (
            r#"{"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2MB"}"#,
            1,
        )
    };
    let set: Vec<String> = online[..vcpus].iter().map(|c| c.to_string()).collect();
    let f = write(&dir, "specs.json", specs);
    let r = nfvisor(
        &[
            "flavor",
            "--extra-specs",
            &f,
            "--vcpus",
            &vcpus.to_string(),
            "--memory",
            "64M",
            "--cpu-dedicated-set",
            &set.join(","),
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cfg = write(&dir, "vm.toml", &r.stdout);
    let run = nfvisor(
        &[
            "run",
            "--config",
            &cfg,
            "--guest",
            "hello",
            "--rt-best-effort",
            "--json",
        ],
        T,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = json(&run);
    let names: Vec<&str> = report["vm"]["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"vcpu0.cpu"), "{names:?}");
    if vcpus == 2 {
        assert!(names.contains(&"vcpu1.rt-priority"), "{names:?}");
        assert!(!names.contains(&"vcpu0.rt-priority"), "{names:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
