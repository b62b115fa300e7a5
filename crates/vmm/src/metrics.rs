//! Prometheus metrics of a running VM, for an operator's scraper:
//! `--metrics-listen ADDR:PORT` serves `GET /metrics` over HTTP on TCP
//! (Prometheus cannot scrape a UNIX socket). Read at scrape time from the
//! VM's handle: per-vCPU exits by reason (those that reached the VMM), the
//! time spent handling them, and KVM's own count; every device's counters,
//! uptime, memory, state.
//!
//! The text exposition format (version 0.0.4) is written by hand: it is
//! four kinds of line, and every value here is read at scrape time from
//! counters the VM already keeps; a client library's registry would hold a
//! second copy of each.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::vm_handle::VmHandle;
use crate::{Error, Result};

/// Device counters that are levels, not counts.
const GAUGES: &[&str] = &[
    "link_up",
    "engine_io_uring",
    "latency_p50_ns",
    "latency_p99_ns",
];

/// One metric family: name, help, type, and its samples (labels, value).
struct Family {
    help: String,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric name part: [a-z0-9_] only.
fn name_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The VM's metrics in Prometheus' text format.
pub fn render(h: &VmHandle) -> String {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    let mut add = |name: String, help: &str, kind: &'static str, labels: String, v: f64| {
        fams.entry(name)
            .or_insert_with(|| Family {
                help: help.to_string(),
                kind,
                samples: Vec::new(),
            })
            .samples
            .push((labels, v));
    };
    let status = crate::api::status(h);
    for e in &status.exits {
        for (reason, n) in &e.by_reason {
            add(
                "nfvisor_vcpu_exits_total".into(),
                "VM exits that reached the VMM, by vCPU and reason.",
                "counter",
                format!("vcpu=\"{}\",reason=\"{}\"", e.vcpu, label_value(reason)),
                *n as f64,
            );
        }
        if let Some(k) = e.kvm_exits {
            add(
                "nfvisor_vcpu_kvm_exits_total".into(),
                "Every exit KVM counted for the vCPU, those it handled itself included.",
                "counter",
                format!("vcpu=\"{}\"", e.vcpu),
                k as f64,
            );
        }
    }
    for (id, live) in h.live_exits.iter().enumerate() {
        for (reason, ns) in live.handling_ns() {
            add(
                "nfvisor_vcpu_exit_handling_seconds_total".into(),
                "Time the VMM spent handling the exits that reached it, by vCPU and reason.",
                "counter",
                format!("vcpu=\"{id}\",reason=\"{}\"", label_value(reason)),
                ns as f64 / 1e9,
            );
        }
    }
    for (dev, counters) in &status.devices {
        for (c, v) in counters {
            // a figure in ns goes out in base units (seconds), as
            // Prometheus names want
            let (part, v) = match c.strip_suffix("_ns") {
                Some(base) => (format!("{}_seconds", name_part(base)), *v as f64 / 1e9),
                None => (name_part(c), *v as f64),
            };
            // (a disk's queues have their own latency levels: qN_latency_*)
            let level = GAUGES
                .iter()
                .any(|g| c == g || c.ends_with(&format!("_{g}")));
            let (name, kind) = if level {
                (format!("nfvisor_device_{part}"), "gauge")
            } else {
                (format!("nfvisor_device_{part}_total"), "counter")
            };
            add(
                name,
                &format!("The device's {c} counter, by device."),
                kind,
                format!("device=\"{}\"", label_value(dev)),
                v,
            );
        }
    }
    // each vCPU thread's time, as the kernel accounts it: in the guest
    // (KVM_RUN in guest mode; on a host that emulates guest code this is
    // system time instead), in the VMM (user), in the kernel (system)
    for (id, &tid) in h.vcpu_tids.get().into_iter().flatten().enumerate() {
        let (user_ms, system_ms, guest_ms) = crate::vm::thread_times(tid);
        for (name, help, ms) in [
            (
                "nfvisor_vcpu_guest_seconds_total",
                "Time the vCPU thread ran the guest (the kernel's guest time).",
                guest_ms,
            ),
            (
                "nfvisor_vcpu_user_seconds_total",
                "Time the vCPU thread ran in the VMM (user time).",
                user_ms,
            ),
            (
                "nfvisor_vcpu_system_seconds_total",
                "Time the vCPU thread ran in the host kernel (system time, guest time included by some kernels).",
                system_ms,
            ),
        ] {
            add(
                name.into(),
                help,
                "counter",
                format!("vcpu=\"{id}\""),
                ms as f64 / 1e3,
            );
        }
    }
    // the last migration that completed from here
    if let Some(m) = h
        .last_migration
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        for (name, help, v) in [
            (
                "nfvisor_migration_last_downtime_seconds",
                "The last migration's downtime (source pause to destination resume), by this end's role.",
                Some(m.downtime_ms / 1e3),
            ),
            (
                "nfvisor_migration_last_total_seconds",
                "The last migration's total time (its source knows it).",
                m.total_ms.map(|t| t / 1e3),
            ),
            (
                "nfvisor_migration_last_bytes",
                "Bytes the last migration sent (its source knows them).",
                m.bytes.map(|b| b as f64),
            ),
            (
                "nfvisor_migration_last_rounds",
                "The last migration's pre-copy rounds (its source knows them).",
                m.rounds.map(|r| r as f64),
            ),
        ] {
            if let Some(v) = v {
                add(name.into(), help, "gauge", format!("role=\"{}\"", m.role), v);
            }
        }
    }
    add(
        "nfvisor_uptime_seconds".into(),
        "Time since the VM started here.",
        "gauge",
        String::new(),
        status.uptime_ms as f64 / 1e3,
    );
    add(
        "nfvisor_guest_memory_bytes".into(),
        "The guest's memory size.",
        "gauge",
        String::new(),
        (status.memory_mib << 20) as f64,
    );
    add(
        "nfvisor_vcpus".into(),
        "The VM's vCPUs.",
        "gauge",
        String::new(),
        status.vcpus as f64,
    );
    for s in ["running", "paused", "migrating", "migrated", "failed"] {
        add(
            "nfvisor_vm_state".into(),
            "1 for the state the VM is in.",
            "gauge",
            format!("state=\"{s}\""),
            (status.state == s) as u8 as f64,
        );
    }
    let mut out = String::new();
    for (name, f) in &fams {
        let _ = writeln!(out, "# HELP {name} {}", f.help);
        let _ = writeln!(out, "# TYPE {name} {}", f.kind);
        for (labels, v) in &f.samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    }
    out
}

/// Serves the metrics on `addr` (HOST:PORT; port 0 picks one, logged)
/// until the VM stops.
pub fn serve(addr: &str, h: Arc<VmHandle>) -> Result<thread::JoinHandle<Option<()>>> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| Error::Config(format!("--metrics-listen {addr}: {e}")))?;
    let local = server
        .server_addr()
        .to_ip()
        .map_or_else(|| addr.to_string(), |a| a.to_string());
    tracing::info!("serving metrics on http://{local}/metrics");
    seccomp::spawn("metrics".into(), seccomp::Role::Metrics, move || {
        while !h.stop.load(Ordering::Acquire) {
            let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            let found = req.method() == &tiny_http::Method::Get
                && (req.url() == "/metrics" || req.url().starts_with("/metrics?"));
            let resp = if found {
                let ct = tiny_http::Header::from_bytes(
                    &b"Content-Type"[..],
                    &b"text/plain; version=0.0.4; charset=utf-8"[..],
                )
                .expect("a valid header");
                tiny_http::Response::from_string(render(&h)).with_header(ct)
            } else {
                tiny_http::Response::from_string("not found: GET /metrics\n").with_status_code(404)
            };
            let _ = req.respond(resp);
        }
    })
    .map_err(|e| Error::Device(format!("spawning the metrics thread: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_values_are_escaped() {
        assert_eq!(name_part("rx-frames.x"), "rx_frames_x");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
