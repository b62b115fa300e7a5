//! virtio-net link status as the driver sees it: `nfvisor net-link` flips
//! the NIC's link, and the bundled `net-probe` guest (`mode=link`), whose
//! configuration vector has an MSI-X entry and an interrupt vector of its
//! own, reads the new status from the device configuration each time the
//! configuration generation moves.

mod common;
use common::net::*;
use common::*;

use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// The guest's `R link` records that report a change (those with change=).
fn changes(output: &str) -> Vec<guests::protocol::Record> {
    let from = output.find("#NFV ").unwrap_or(0);
    let parsed = guests::protocol::parse(&output[from..])
        .unwrap_or_else(|e| panic!("the guest's output does not parse ({e}):\n{output}"));
    parsed
        .records
        .into_iter()
        .filter(|r| r.kind == "link" && r.get("change").is_some())
        .collect()
}

/// Link down, then up again: the guest is told each time (configuration
/// generation and interrupt) and reads status 0, then 1; at least one of
/// the two changes came by interrupt. The console goes to a file (--serial)
/// so that nfvisor's log lines cannot split the guest's.
#[test]
fn the_guest_sees_the_link_go_down_and_come_up_again() {
    let t0 = Instant::now();
    let ns = Netns::new();
    ns.add_tap(TAP);
    let dir = scratch("net-link-guest");
    let ctl = dir.join("vm.sock");
    let serial = dir.join("serial.txt");
    let mut cmd = ns.exec(NFVISOR);
    cmd.args(["run", "--guest", "net-probe", "--control-socket"])
        .arg(&ctl)
        .arg("--serial")
        .arg(&serial)
        .arg("--net")
        .arg(format!("tap={TAP}"))
        .args(["--cmdline", "mode=link count=2"]);
    let vm = Vm::start(cmd);
    wait_for_path(&ctl);
    let console = || std::fs::read_to_string(&serial).unwrap_or_default();
    let wait_console = |needle: &str| {
        let deadline = Instant::now() + T;
        loop {
            let out = console();
            if out.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console within {T:?}; it said:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let c = ctl.to_str().unwrap();
    let link = |action: &str| {
        let r = nfvisor(&["net-link", "--control-socket", c, action], T);
        assert_eq!(r.code, 0, "net-link {action}: {}", r.stderr);
    };

    wait_console("R link status=1 ");
    link("down");
    wait_console("R link status=0 change=1 ");
    link("up");
    wait_console("R link status=1 change=2 ");

    let (code, log) = vm.finish(T);
    let out = console();
    assert_eq!(code, 0, "the VM's exit code; console:\n{out}\nlog:\n{log}");
    let first = record(&out, "link");
    assert_eq!(first.get("status").map(String::as_str), Some("1"), "{out}");
    assert_eq!(first.get("msix").map(String::as_str), Some("1"), "{out}");
    let seen = changes(&out);
    let status: Vec<_> = seen.iter().map(|r| r.u64("status")).collect();
    assert_eq!(status, [Some(0), Some(1)], "{out}");
    let count: Vec<_> = seen.iter().map(|r| r.u64("change")).collect();
    assert_eq!(count, [Some(1), Some(2)], "{out}");
    assert!(
        seen.iter().any(|r| r.get("via") == Some("irq")),
        "no change came by the configuration interrupt:\n{out}"
    );
    let parsed = guests::protocol::parse(&out[out.find("#NFV ").unwrap_or(0)..]).unwrap();
    let last = parsed
        .records
        .iter()
        .find(|r| r.kind == "link" && r.get("changes").is_some())
        .unwrap_or_else(|| panic!("no R link changes= record:\n{out}"));
    assert_eq!(last.u64("changes"), Some(2), "{out}");
    assert!(last.u64("irqs").unwrap_or(0) >= 1, "{out}");
    assert_eq!(parsed.end_status, Some(0), "{out}");
    eprintln!("the link test took {:?}:\n{out}", t0.elapsed());
}
