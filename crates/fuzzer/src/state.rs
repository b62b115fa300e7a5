//! Targets past the framing: the migration stream's payloads (well-formed
//! frames, correct CRCs, written by the migration crate's own writer,
//! holding arbitrary structured state) through the decoders a destination
//! runs before it touches KVM, and the control socket's request parser on
//! lines built from the real commands and fields.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use devices::Stateful;
use migration::Kind;

use crate::{Json, DEPTH};

/// A change to a JSON object: a field set to a value (the key from the
/// object's own keys, or from the config vocabulary), or removed.
#[derive(Debug, Arbitrary)]
enum Bend {
    Set {
        key: u8,
        value: Json,
    },
    Remove(u8),
    Number {
        key: u8,
        n: i64,
    },
    /// Into the VM configuration (`vm`), one level down.
    Vm {
        key: u8,
        value: Json,
    },
}

/// A device state blob: a real device's saved state, bent.
#[derive(Debug, Arbitrary)]
enum BlobBend {
    Flip(u16, u8),
    Cut(u16),
    Append(Vec<u8>),
    Kind(u8),
    Version(u16),
    Replace(Vec<u8>),
}

/// One frame of the stream, as a (hostile) source would write it.
#[derive(Debug, Arbitrary)]
enum StateFrame {
    /// The configuration a default VM writes, bent.
    Config(Vec<Bend>),
    /// The machine state: the VM's KVM state (default structures), and
    /// device blobs keyed by id (the real devices' saved states, bent).
    Machine {
        blobs: Vec<(u8, u8, Vec<BlobBend>)>,
        pit_flags: u32,
        clock: u64,
        cut: Option<u16>,
    },
    /// One vCPU's state.
    Vcpu {
        id: u32,
        saved_at_ns: u64,
        rip: u64,
        rflags: u64,
        msrs: Vec<(u32, u64)>,
        tsc_offset: Option<u64>,
        cut: Option<u16>,
        flip: Option<(u16, u8)>,
    },
    Pages(Vec<(u32, u8)>),
    ZeroPages(Vec<u64>),
    Sync(u64),
    /// Any bytes under a right checksum.
    Raw(u8, Vec<u8>),
}

/// A hand-over line as either side writes one.
#[derive(Debug, Arbitrary)]
enum HandOver {
    Open,
    Challenge(u8),
    Response(u8),
    Ok,
    Denied,
    Prepared(u64),
    Synced(u16, u64, Option<i64>),
    Ready,
    Error(u8),
    Go(u64),
    Running(Option<i64>, Vec<(u8, i64)>),
    Words(Vec<u8>),
}

const WORDS: &[&str] = &[
    "NFV-MIGRATE",
    "1",
    "2",
    "OPEN",
    "CHALLENGE",
    "RESPONSE",
    "OK",
    "DENIED",
    "PREPARED",
    "SYNCED",
    "READY",
    "ERROR",
    "GO",
    "RUNNING",
    "state_ns=5",
    "downtime_ns=-1",
    "-170141183460469231731687303715884105728",
    "18446744073709551616",
    "a=b",
    "=",
    "",
    "\u{0}",
    "é",
];

const IDS: &[&str] = &["com1", "debug-exit", "net0", "rng0", "", "x"];

fn handover(h: HandOver) {
    use migration::control::Line;
    let text = |i: u8| WORDS[i as usize % WORDS.len()].to_string();
    let line = match h {
        HandOver::Open => Line::Open,
        HandOver::Challenge(n) => Line::Challenge { nonce: text(n) },
        HandOver::Response(n) => Line::Response {
            mac: text(n),
            nonce: text(n.wrapping_add(1)),
        },
        HandOver::Ok => Line::Ok { proof: text(0) },
        HandOver::Denied => Line::Denied,
        HandOver::Prepared(n) => Line::Prepared { state_ns: n },
        HandOver::Synced(stream, seq, clock) => Line::Synced {
            stream: stream as usize,
            seq,
            clock_ns: clock.map(i128::from),
        },
        HandOver::Ready => Line::Ready,
        HandOver::Error(n) => Line::Error { why: text(n) },
        HandOver::Go(n) => Line::Go {
            paused_at_ns: n as u128,
        },
        HandOver::Running(d, steps) => Line::Running {
            downtime_ns: d.map(i128::from),
            steps: steps
                .into_iter()
                .take(8)
                .map(|(w, t)| (text(w), t as i128))
                .collect(),
        },
        HandOver::Words(w) => {
            let l: Vec<&str> = w
                .iter()
                .take(12)
                .map(|i| WORDS[*i as usize % WORDS.len()])
                .collect();
            let _ = Line::parse(&l.join(" "));
            return;
        }
    };
    // what one side writes, the other reads back as it was meant (a line
    // whose words cannot travel must at least not be misread as another)
    if let Ok(back) = Line::parse(&line.to_wire()) {
        let words_ok = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
        let plain = match &line {
            Line::Challenge { nonce: s } | Line::Ok { proof: s } => words_ok(s),
            Line::Response { mac, nonce } => words_ok(mac) && words_ok(nonce),
            // (a writer always has the downtime: None is the reader's
            // "could not read it", and steps follow it)
            Line::Running { downtime_ns, steps } => {
                downtime_ns.is_some() && steps.iter().all(|(s, _)| words_ok(s) && !s.contains('='))
            }
            Line::Error { .. } => false,
            _ => true,
        };
        if plain {
            assert_eq!(back, line, "a hand-over line reads back otherwise");
        }
    }
}

/// The devices a destination builds without KVM, for their blobs.
fn devices() -> Vec<(&'static str, Box<dyn Stateful>)> {
    let mut v: Vec<(&'static str, Box<dyn Stateful>)> = Vec::new();
    if let Ok(irq) = vmm_sys_util::eventfd::EventFd::new(libc_nonblock()) {
        v.push((
            "com1",
            Box::new(devices::SerialConsole::new(
                irq,
                devices::ConsoleBuffer::new(4096),
            )),
        ));
    }
    v.push((
        "debug-exit",
        Box::new(devices::DebugExit::new(Arc::new(
            devices::GuestExit::default(),
        ))),
    ));
    v
}

fn libc_nonblock() -> i32 {
    // EFD_NONBLOCK (O_NONBLOCK on Linux)
    0o4000
}

fn bend_blob(b: &mut devices::DeviceBlob, bend: BlobBend) {
    match bend {
        BlobBend::Flip(i, x) => {
            if !b.data.is_empty() {
                let n = b.data.len();
                b.data[i as usize % n] ^= x;
            }
        }
        BlobBend::Cut(n) => b.data.truncate(n as usize),
        BlobBend::Append(d) => b.data.extend(d.into_iter().take(64)),
        BlobBend::Kind(k) => {
            b.kind = ["uart-16550", "debug-exit", "virtio-net", ""][k as usize % 4].into()
        }
        BlobBend::Version(v) => b.version = v,
        BlobBend::Replace(d) => b.data = d,
    }
}

fn set(map: &mut serde_json::Map<String, serde_json::Value>, key: u8, value: serde_json::Value) {
    let keys: Vec<String> = map.keys().cloned().collect();
    let k = if !keys.is_empty() && !key.is_multiple_of(4) {
        keys[key as usize % keys.len()].clone()
    } else {
        crate::KEYS[key as usize % crate::KEYS.len()].to_string()
    };
    map.insert(k, value);
}

fn config(bends: Vec<Bend>) -> Vec<u8> {
    let c = vmm::snapshot::SnapshotConfig {
        vm: vmm::VmConfig::default(),
        tsc_khz: 2_000_000,
        cpu_features: Vec::new(),
        ivshmem: None,
        connections: 1,
    };
    let mut v = serde_json::to_value(&c).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        for b in bends.into_iter().take(16) {
            match b {
                Bend::Set { key, value } => set(map, key, value.value(2)),
                Bend::Number { key, n } => set(map, key, n.into()),
                Bend::Remove(key) => {
                    let keys: Vec<String> = map.keys().cloned().collect();
                    if !keys.is_empty() {
                        map.remove(&keys[key as usize % keys.len()]);
                    }
                }
                Bend::Vm { key, value } => {
                    if let Some(vm) = map.get_mut("vm").and_then(|v| v.as_object_mut()) {
                        set(vm, key, value.value(2));
                    }
                }
            }
        }
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn machine(
    blobs: Vec<(u8, u8, Vec<BlobBend>)>,
    pit_flags: u32,
    clock: u64,
    devs: &[(&'static str, Box<dyn Stateful>)],
) -> Vec<u8> {
    let mut states = devices::DeviceStates::new();
    for (id, dev, bends) in blobs.into_iter().take(8) {
        let mut blob = match devs.get(dev as usize % (devs.len() + 1)) {
            Some((_, d)) => d.save_blob(),
            None => devices::DeviceBlob {
                kind: "virtio-rng".into(),
                version: 1,
                data: Vec::new(),
            },
        };
        for b in bends.into_iter().take(8) {
            bend_blob(&mut blob, b);
        }
        states.insert(IDS[id as usize % IDS.len()].to_string(), blob);
    }
    let mut vm = vmm::snapshot::VmState {
        pic_master: Default::default(),
        pic_slave: Default::default(),
        ioapic: Default::default(),
        pit: Default::default(),
        clock: Default::default(),
    };
    vm.pit.flags = pit_flags;
    vm.clock.clock = clock;
    vmm::snapshot::encode_state(&vmm::snapshot::MachineState {
        vm,
        devices: states,
    })
}

#[allow(clippy::too_many_arguments)]
fn vcpu(
    id: u32,
    saved_at_ns: u64,
    rip: u64,
    rflags: u64,
    msrs: Vec<(u32, u64)>,
    tsc_offset: Option<u64>,
) -> Vec<u8> {
    let mut s = vmm::snapshot::VcpuState {
        id,
        saved_at_ns: saved_at_ns as u128,
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: msrs
            .into_iter()
            .take(32)
            .map(|(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect(),
        events: Default::default(),
        mp_state: Default::default(),
        tsc_offset,
    };
    s.regs.rip = rip;
    s.regs.rflags = rflags;
    vmm::snapshot::encode_state(&s)
}

fn cut_flip(mut p: Vec<u8>, cut: Option<u16>, flip: Option<(u16, u8)>) -> Vec<u8> {
    if let Some(n) = cut {
        p.truncate(n as usize);
    }
    if let (Some((i, x)), false) = (flip, p.is_empty()) {
        let n = p.len();
        p[i as usize % n] ^= x;
    }
    p
}

/// The migration stream past the CRC: a stream written by the migration
/// crate's own writer (every frame checksummed, the End frame counting
/// them) whose payloads are structured state: the configuration a VM
/// writes, bent (parsed by the destination's `RestoreSource`); machine
/// states with the real devices' saved blobs, bent (decoded, then each blob
/// checked and taken by the device it names, as a restore does); vCPU
/// states; page and zero-page records; Sync sequence numbers; and the
/// hand-over lines both sides exchange.
pub fn migration_state(u: &mut Unstructured) -> arbitrary::Result<()> {
    let frames = Vec::<StateFrame>::arbitrary(u)?;
    let lines = Vec::<HandOver>::arbitrary(u)?;
    let end = bool::arbitrary(u)?;
    for h in lines.into_iter().take(8) {
        handover(h);
    }
    let devs = devices();
    let mut w = migration::Writer::new(Vec::new()).expect("a Vec takes writes");
    for f in frames.into_iter().take(12) {
        let (kind, payload) = match f {
            StateFrame::Config(b) => (Kind::Config, config(b)),
            StateFrame::Machine {
                blobs,
                pit_flags,
                clock,
                cut,
            } => (
                Kind::DeviceState,
                cut_flip(machine(blobs, pit_flags, clock, &devs), cut, None),
            ),
            StateFrame::Vcpu {
                id,
                saved_at_ns,
                rip,
                rflags,
                msrs,
                tsc_offset,
                cut,
                flip,
            } => (
                Kind::VcpuState,
                cut_flip(
                    vcpu(id, saved_at_ns, rip, rflags, msrs, tsc_offset),
                    cut,
                    flip,
                ),
            ),
            StateFrame::Pages(p) => {
                let mut buf = Vec::new();
                for (gpa, fill) in p.into_iter().take(4) {
                    buf.extend_from_slice(&((gpa as u64) << 12 | (gpa as u64 >> 20)).to_le_bytes());
                    buf.extend(std::iter::repeat_n(fill, migration::PAGE_SIZE));
                }
                (Kind::Pages, buf)
            }
            StateFrame::ZeroPages(z) => (
                Kind::ZeroPages,
                z.iter().take(64).flat_map(|g| g.to_le_bytes()).collect(),
            ),
            StateFrame::Sync(n) => (Kind::Sync, n.to_le_bytes().to_vec()),
            StateFrame::Raw(k, d) => {
                let kind = match k % 7 {
                    0 => Kind::Config,
                    1 => Kind::Pages,
                    2 => Kind::ZeroPages,
                    3 => Kind::DeviceState,
                    4 => Kind::VcpuState,
                    5 => Kind::Sync,
                    _ => Kind::End,
                };
                (kind, d)
            }
        };
        if payload.len() <= migration::MAX_PAYLOAD {
            let _ = w.frame(kind, &payload);
        }
    }
    let stream = if end {
        w.finish().map(|(v, _)| v).unwrap_or_default()
    } else {
        let _ = w.flush();
        // (cut where a frame ends: the reader must say so)
        let mut v = Vec::new();
        if let Ok((all, _)) = w.finish() {
            v = all;
            v.truncate(v.len().saturating_sub(17));
        }
        v
    };
    // the destination: its configuration first (RestoreSource), then every
    // frame decoded as `snapshot::apply` decodes it before using it
    if let Ok((_src, cfg)) = vmm::snapshot::RestoreSource::new(
        "fuzz",
        Box::new(std::io::Cursor::new(stream.clone())),
        None,
    ) {
        DEPTH[0].fetch_add(1, Ordering::Relaxed);
        let _ = cfg.vm.guest_part();
        let _ = cfg.vm.dirty_ring_bytes();
    }
    let Ok(mut reader) = migration::Reader::new(&stream[..]) else {
        return Ok(());
    };
    while let Ok(Some(f)) = reader.next_frame() {
        match f.kind {
            Kind::Pages => {
                let _ = f.pages();
            }
            Kind::ZeroPages => {
                let _ = f.zero_pages();
            }
            Kind::DeviceState => {
                if let Ok(m) = vmm::snapshot::MachineState::decode(&f.payload, "fuzz") {
                    DEPTH[1].fetch_add(1, Ordering::Relaxed);
                    for (id, blob) in &m.devices {
                        if let Some((_, d)) = devs.iter().find(|(n, _)| n == id) {
                            if d.check_blob(id, blob).is_ok() {
                                // what passed the check must be taken
                                assert!(
                                    d.restore_blob(id, blob).is_ok(),
                                    "device {id}: a checked state was refused"
                                );
                            }
                        }
                    }
                }
            }
            Kind::VcpuState
                if postcard::from_bytes::<vmm::snapshot::VcpuState>(&f.payload).is_ok() =>
            {
                DEPTH[1].fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    Ok(())
}

/// A field of a control request: the real names with values of the right
/// shape, the wrong shape, or none.
#[derive(Debug, Arbitrary)]
enum Field {
    V(i64),
    Cmd(u8),
    To(u8),
    Link(u8),
    Window(u8),
    Id(u8),
    Downtime(f64),
    Timeout(f64),
    OnTimeout(u8),
    TokenFile(u8),
    Bandwidth(i64),
    Connections(i64),
    Other(u8, Json),
}

const CMDS: &[&str] = &[
    "status", "pause", "resume", "snapshot", "migrate", "net", "ivshmem", "Status", "",
];
const TOS: &[&str] = &[
    "unix:/tmp/nfv-fuzz-none.sock",
    "tcp:127.0.0.1:1",
    "tcp:[::1]:0",
    "tcp:host:99999",
    "unix:",
    "/dir",
    "tcp:",
    "",
];
const ACTIONS: &[&str] = &["up", "down", "map", "unmap", "UP", ""];
const NAMES: &[&str] = &[
    "v",
    "cmd",
    "to",
    "link",
    "window",
    "id",
    "downtime_ms",
    "timeout_s",
    "on_timeout",
    "token_file",
    "bandwidth_limit",
    "connections",
    "extra",
];

#[derive(Debug, Arbitrary)]
enum ControlInput {
    /// A request object from fields.
    Fields(Vec<Field>),
    /// Raw bytes as the socket reads them (lines, no lines, not UTF-8).
    Raw(Vec<u8>),
}

fn request_line(fields: Vec<Field>) -> String {
    use serde_json::Value;
    let mut m = serde_json::Map::new();
    let pick = |t: &[&str], i: u8| Value::from(t[i as usize % t.len()]);
    for f in fields.into_iter().take(16) {
        let (k, v) = match f {
            Field::V(n) => ("v", Value::from(if n % 3 == 0 { n } else { 1 })),
            Field::Cmd(i) => ("cmd", pick(CMDS, i)),
            Field::To(i) => ("to", pick(TOS, i)),
            Field::Link(i) => ("link", pick(ACTIONS, i)),
            Field::Window(i) => ("window", pick(ACTIONS, i)),
            Field::Id(i) => ("id", pick(IDS, i)),
            Field::Downtime(x) => (
                "downtime_ms",
                serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
            ),
            Field::Timeout(x) => (
                "timeout_s",
                serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
            ),
            Field::OnTimeout(i) => ("on_timeout", pick(&["abort", "force", "Force", ""], i)),
            Field::TokenFile(i) => (
                "token_file",
                pick(&["/nonexistent/nfv-fuzz-token", "", "/"], i),
            ),
            Field::Bandwidth(n) => ("bandwidth_limit", Value::from(n)),
            Field::Connections(n) => ("connections", Value::from(n)),
            Field::Other(i, j) => {
                m.insert(NAMES[i as usize % NAMES.len()].into(), j.value(3));
                continue;
            }
        };
        m.insert(k.into(), v);
    }
    Value::Object(m).to_string()
}

/// The control socket's request reader and parser (`control.rs`'s line
/// reader, `api::parse_line`) on request lines built from the real
/// command names and fields (right and wrong shapes) and on raw bytes; a
/// parsed request must read back the same from its own line, and a
/// migration's options are checked as `execute` checks them.
pub fn control(u: &mut Unstructured) -> arbitrary::Result<()> {
    let inputs = Vec::<ControlInput>::arbitrary(u)?;
    let mut bytes = Vec::new();
    for i in inputs.into_iter().take(8) {
        match i {
            ControlInput::Fields(f) => {
                bytes.extend_from_slice(request_line(f).as_bytes());
                bytes.push(b'\n');
            }
            ControlInput::Raw(r) => bytes.extend_from_slice(&r),
        }
    }
    let mut reader = std::io::BufReader::new(&bytes[..]);
    for _ in 0..16 {
        let line = match vmm::control::fuzz_read_request(&mut reader) {
            Ok(Some(l)) => l,
            _ => break,
        };
        if line.trim().is_empty() {
            continue;
        }
        let Ok(req) = vmm::api::parse_line(&line) else {
            continue;
        };
        DEPTH[0].fetch_add(1, Ordering::Relaxed);
        let again = vmm::api::parse_line(&vmm::api::line_of(&req));
        assert_eq!(
            again.as_ref(),
            Ok(&req),
            "a request does not read back from its own line"
        );
        if let vmm::api::Request::Migrate(m) = &req {
            if m.fuzz_options().is_ok() {
                DEPTH[1].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}
