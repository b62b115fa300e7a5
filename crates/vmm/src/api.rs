//! The one typed request set of a running VM. Every frontend (the CLI, the
//! JSON-lines control socket, a REST API) builds a [`Request`], hands it to
//! [`execute`] and shows the [`Response`] or the error; none of them knows
//! how a pause or a migration is done.
//!
//! On the control socket a request is its JSON form with the schema
//! version beside it: `{"v":1,"cmd":"snapshot","to":"/dir"}`; a reply is
//! `{"v":1,"ok":true,...the response's fields}` or
//! `{"v":1,"ok":false,"error":"..."}`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::migrate::{MigrateOptions, MigrationReport, Progress};
use crate::snapshot::SnapshotReport;
use crate::vm_handle::{FailedMigration, RunState, VmHandle};
use crate::{Error, Result};

/// The control schema's version.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The VM's state, uptime, exits and devices.
    Status,
    /// Park every vCPU outside KVM_RUN.
    Pause,
    Resume,
    /// Pause, save to the directory `to`, resume if it was running.
    Snapshot {
        to: PathBuf,
    },
    /// Live-migrate to `to` (unix:PATH or tcp:HOST:PORT).
    Migrate(MigrateRequest),
    /// Take a NIC's link down or bring it up (the guest sees STATUS
    /// change; frames are dropped both ways while it is down).
    Net {
        link: LinkAction,
        /// Which NIC (net0, net1, ...; the only one when omitted).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Open (map) or close (unmap) the ivshmem window.
    Ivshmem {
        window: WindowAction,
        /// Which ivshmem device (when there is more than one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

impl Request {
    /// The command's name, as the wire spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Snapshot { .. } => "snapshot",
            Request::Migrate(_) => "migrate",
            Request::Ivshmem { .. } => "ivshmem",
            Request::Net { .. } => "net",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkAction {
    Up,
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowAction {
    Map,
    Unmap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// The guest runs on here.
    #[default]
    Abort,
    /// Stop the guest and complete.
    Force,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub to: String,
    /// Pre-copy stops when the rest fits in this.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: f64,
    /// Give up pre-copy after this long.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// A file holding the destination's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Bytes per second pre-copy may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
    /// Streams in parallel, 1 to 16.
    #[serde(default = "one")]
    pub connections: u32,
    /// TCP without a token: guest memory crosses the network with nobody
    /// proven at either end. Refused unless asked for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// How long one write of the stream may wait for the destination.
    #[serde(default = "default_io_timeout_s")]
    pub io_timeout_s: f64,
}

fn default_io_timeout_s() -> f64 {
    crate::migrate::DEFAULT_IO_TIMEOUT_S
}

fn default_downtime_ms() -> f64 {
    10.0
}
fn default_timeout_s() -> f64 {
    60.0
}
fn one() -> u32 {
    1
}

impl MigrateRequest {
    /// A migration to `to` with every default.
    pub fn to(to: impl Into<String>) -> Self {
        MigrateRequest {
            to: to.into(),
            downtime_ms: default_downtime_ms(),
            timeout_s: default_timeout_s(),
            on_timeout: OnTimeout::Abort,
            token_file: None,
            bandwidth_limit: None,
            connections: 1,
            insecure: false,
            io_timeout_s: default_io_timeout_s(),
        }
    }

    /// Checks every field; reads the token file.
    /// The destination, and whether going there unauthenticated was asked
    /// for: TCP without a token needs `insecure`.
    pub fn check_transport(&self) -> Result<crate::migrate::Endpoint> {
        let endpoint = crate::migrate::Endpoint::parse(&self.to).map_err(Error::Config)?;
        if matches!(endpoint, crate::migrate::Endpoint::Tcp(_))
            && self.token_file.is_none()
            && !self.insecure
        {
            return Err(Error::Config(format!(
                "migrate: {} is TCP and there is no token: guest memory would cross the network to whoever answers; give both ends --token-file, or --insecure",
                self.to
            )));
        }
        Ok(endpoint)
    }

    fn options(&self) -> Result<MigrateOptions> {
        self.check_transport()?;
        if !(self.downtime_ms.is_finite() && self.downtime_ms > 0.0) {
            return Err(Error::Config(format!(
                "migrate: downtime_ms {} must be a positive number",
                self.downtime_ms
            )));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err(Error::Config(format!(
                "migrate: timeout_s {} must be a positive number",
                self.timeout_s
            )));
        }
        if !(1..=16).contains(&self.connections) {
            return Err(Error::Config(format!(
                "migrate: connections {} must be 1 to 16",
                self.connections
            )));
        }
        if self.bandwidth_limit == Some(0) {
            return Err(Error::Config("migrate: bandwidth_limit must be > 0".into()));
        }
        if !(self.io_timeout_s.is_finite() && self.io_timeout_s > 0.0) {
            return Err(Error::Config(format!(
                "migrate: io_timeout_s {} must be a positive number",
                self.io_timeout_s
            )));
        }
        let token = match &self.token_file {
            Some(f) => Some(crate::migrate::read_token(f)?),
            None => None,
        };
        let seconds = |v: f64, what: &str| {
            Duration::try_from_secs_f64(v)
                .map_err(|_| Error::Config(format!("migrate: {what} {v:e} is out of range")))
        };
        Ok(MigrateOptions {
            token,
            downtime: seconds(self.downtime_ms / 1000.0, "downtime_ms")?,
            timeout: seconds(self.timeout_s, "timeout_s")?,
            force: self.on_timeout == OnTimeout::Force,
            bandwidth_limit: self.bandwidth_limit,
            io_timeout: seconds(self.io_timeout_s, "io_timeout_s")?,
            connections: self.connections as usize,
        })
    }
}

#[cfg(feature = "fuzzing")]
impl MigrateRequest {
    /// `options` (every field checked), for the fuzz target (crates/fuzzer).
    pub fn fuzz_options(&self) -> Result<MigrateOptions> {
        self.options()
    }
}

/// One vCPU's exits so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuExits {
    pub vcpu: u32,
    /// Exits that reached the VMM (by reason).
    pub total: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// Every exit KVM counted, those it handled itself included (KVM's
    /// binary statistics), where readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_exits: Option<u64>,
}

/// A migration in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationInFlight {
    pub to: String,
    pub progress: Option<Progress>,
}

/// What `status` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// running, paused, migrating, migrated, or failed (a migration left
    /// the guest paused, its outcome unknown, until the operator resumes).
    pub state: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: String,
    pub uptime_ms: u64,
    pub exits: Vec<VcpuExits>,
    /// Each device's counters, by device id.
    pub devices: BTreeMap<String, BTreeMap<String, u64>>,
    /// The devices' own threads (queue workers) and where they run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub device_threads: BTreeMap<String, Vec<devices::state::DeviceThread>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationInFlight>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_migration: Option<FailedMigration>,
}

/// What a request answers (on the control socket, its fields follow
/// `"ok":true`). Serialised only: the shapes overlap, so a reply is read
/// back as JSON, not as this type.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Response {
    Status(Status),
    Paused {
        state: RunState,
        pause_us: u64,
    },
    Resumed {
        state: RunState,
    },
    Snapshot {
        snapshot: SnapshotReport,
        state: RunState,
    },
    Migrated {
        migration: MigrationReport,
        state: String,
    },
    Window {
        window: String,
    },
    Link {
        link: String,
    },
}

/// What `status` reports: running, paused, migrating (pre-copy or
/// stop-and-copy in flight), migrated (handed over, ending here) or
/// failed (a migration left the guest paused, its outcome unknown,
/// until the operator resumes it); the last failed migration's reason.
pub fn status(h: &VmHandle) -> Status {
    let migrating = h
        .migration
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let migrated = h.migrated.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let failed = h
        .failed_migration
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let state = if migrated.is_some() {
        "migrated"
    } else if migrating.is_some() {
        "migrating"
    } else {
        match h.state() {
            RunState::Running => "running",
            RunState::Paused if failed.as_ref().is_some_and(|f| f.left_paused) => "failed",
            RunState::Paused => "paused",
        }
    };
    let exits = h
        .live_exits
        .iter()
        .enumerate()
        .map(|(id, l)| {
            let (by_reason, total) = l.read();
            VcpuExits {
                vcpu: id as u32,
                kvm_exits: h
                    .kvm_stats
                    .get(id)
                    .and_then(|s| s.get())
                    .and_then(|s| s.read().get("exits").copied()),
                total,
                by_reason: by_reason
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            }
        })
        .collect();
    Status {
        state: state.into(),
        vcpus: h.cmds.len() as u32,
        memory_mib: h
            .config
            .vm
            .memory
            .as_ref()
            .and_then(|m| m.bytes().ok())
            .unwrap_or(0)
            >> 20,
        kernel: h.kernel_name.clone(),
        uptime_ms: h.started.elapsed().as_millis() as u64,
        exits,
        devices: h.devices.counters(),
        device_threads: h.devices.threads(),
        migration: migrating.map(|(to, progress)| MigrationInFlight { to, progress }),
        migrated_to: migrated,
        last_failed_migration: failed,
    }
}

/// Runs `req` on the VM; `progress` hears each pre-copy round of a
/// migration.
pub fn execute(
    h: &VmHandle,
    req: &Request,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Response> {
    if matches!(
        req,
        Request::Pause | Request::Resume | Request::Snapshot { .. }
    ) {
        h.refuse_while_migrating(req.name())?;
    }
    match req {
        Request::Status => Ok(Response::Status(status(h))),
        Request::Pause => {
            let d = h.pause()?;
            Ok(Response::Paused {
                state: RunState::Paused,
                pause_us: d.as_micros() as u64,
            })
        }
        Request::Resume => {
            h.resume();
            Ok(Response::Resumed {
                state: RunState::Running,
            })
        }
        Request::Snapshot { to } => {
            let snapshot = h.snapshot(to)?;
            Ok(Response::Snapshot {
                snapshot,
                state: h.state(),
            })
        }
        Request::Ivshmem { window, id } => {
            let action = match window {
                WindowAction::Map => "map",
                WindowAction::Unmap => "unmap",
            };
            let done = h.device_control("ivshmem", id.as_deref(), action)?;
            Ok(Response::Window { window: done })
        }
        Request::Net { link, id } => {
            let action = match link {
                LinkAction::Up => "link-up",
                LinkAction::Down => "link-down",
            };
            let done = h.device_control("virtio-net", id.as_deref(), action)?;
            Ok(Response::Link { link: done })
        }
        Request::Migrate(m) => {
            let opts = m.options()?;
            h.begin_migration(&m.to)?;
            let mut on_progress = |p: &Progress| {
                progress(p);
                h.note_progress(p);
            };
            let outcome = crate::migrate::migrate(h, &m.to, &opts, &mut on_progress);
            h.end_migration(&m.to, outcome.as_ref().err());
            if let Ok(r) = &outcome {
                h.note_migration(crate::vm_handle::LastMigration {
                    role: "source",
                    downtime_ms: r.downtime_ms,
                    total_ms: Some(r.total_ms),
                    bytes: Some(r.bytes),
                    rounds: Some(r.rounds),
                });
            }
            outcome.map(|migration| Response::Migrated {
                migration,
                state: "migrated".into(),
            })
        }
    }
}

/// The control socket's envelope: the schema version beside the request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// Reads one control line: the request, or why it is refused.
pub fn parse_line(line: &str) -> std::result::Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not a JSON request: {e}"))?;
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == SCHEMA as u64 => {}
        other => {
            return Err(format!(
                "schema version {} is not supported (use {SCHEMA})",
                other.map_or("(none)".to_string(), |v| v.to_string())
            ))
        }
    }
    serde_json::from_value::<Envelope>(value)
        .map(|e| e.request)
        .map_err(|e| {
            format!("{e} (commands: status, pause, resume, snapshot {{to}}, migrate {{to, ...}}, ivshmem {{window: map|unmap}}, net {{link: up|down}})")
        })
}

/// The request as a control line.
pub fn line_of(req: &Request) -> String {
    serde_json::to_string(&Envelope {
        v: SCHEMA,
        request: req.clone(),
    })
    .expect("a request always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_lines() {
        let reqs = [
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::Snapshot {
                to: "/tmp/s".into(),
            },
            Request::Migrate(MigrateRequest {
                connections: 4,
                token_file: Some("/etc/t".into()),
                ..MigrateRequest::to("tcp:10.0.0.2:4444")
            }),
            Request::Ivshmem {
                window: WindowAction::Unmap,
                id: None,
            },
            Request::Net {
                link: LinkAction::Down,
                id: Some("net1".into()),
            },
        ];
        for r in reqs {
            assert_eq!(parse_line(&line_of(&r)).unwrap(), r);
        }
    }

    #[test]
    fn the_wire_form_is_the_documented_one() {
        assert_eq!(
            parse_line(r#"{"v":1,"cmd":"migrate","to":"unix:/x","downtime_ms":3}"#).unwrap(),
            Request::Migrate(MigrateRequest {
                downtime_ms: 3.0,
                ..MigrateRequest::to("unix:/x")
            })
        );
        assert_eq!(
            parse_line(r#"{"v":1,"cmd":"ivshmem","window":"map"}"#).unwrap(),
            Request::Ivshmem {
                window: WindowAction::Map,
                id: None
            }
        );
    }

    #[test]
    fn bad_lines_are_refused_with_the_reason() {
        for (line, why) in [
            ("not json", "not a JSON request"),
            (r#"{"v":9,"cmd":"status"}"#, "schema version 9"),
            (r#"{"cmd":"status"}"#, "schema version (none)"),
            (r#"{"v":1,"cmd":"explode"}"#, "explode"),
            (r#"{"v":1,"cmd":"snapshot"}"#, "to"),
            (r#"{"v":1,"cmd":"ivshmem","window":"open"}"#, "open"),
            (
                r#"{"v":1,"cmd":"migrate","to":"x","connections":"many"}"#,
                "\"many\"",
            ),
        ] {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
    }

    #[test]
    fn impossible_migrations_are_refused_before_anything_starts() {
        for (m, why) in [
            (MigrateRequest::to("ftp:x"), "unix:PATH"),
            (
                MigrateRequest {
                    connections: 17,
                    ..MigrateRequest::to("unix:/x")
                },
                "connections 17",
            ),
            (
                MigrateRequest {
                    downtime_ms: -1.0,
                    ..MigrateRequest::to("unix:/x")
                },
                "downtime_ms",
            ),
            (
                MigrateRequest {
                    timeout_s: 1e300,
                    ..MigrateRequest::to("unix:/x")
                },
                "timeout_s 1e300 is out of range",
            ),
            (
                MigrateRequest {
                    token_file: Some("/nonexistent/token".into()),
                    ..MigrateRequest::to("unix:/x")
                },
                "/nonexistent/token",
            ),
        ] {
            let e = m.options().unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
