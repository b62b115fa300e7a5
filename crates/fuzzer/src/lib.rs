//! nfvisor's fuzz targets, and a driver that runs on the stable toolchain
//! these machines have.
//!
//! cargo-fuzz needs nightly (and `fuzz/` keeps its libFuzzer target for
//! whoever has one); here inputs are random bytes from a seeded generator,
//! mutated from the corpus, turned into structured input by `arbitrary`
//! inside each target, so they get past the checks a raw byte string never
//! passes (a CRC, a descriptor table's shape). There is no coverage
//! feedback: this finds what random structure finds, and says so.

use arbitrary::Unstructured;

/// A target: it must not panic on any input.
pub type Target = fn(&[u8]);

pub const TARGETS: &[(&str, Target)] = &[
    ("blk", |d| {
        let _ = virtio::fuzzing::blk(&mut Unstructured::new(d));
    }),
    ("vsock", |d| {
        let _ = virtio::fuzzing::vsock(&mut Unstructured::new(d));
    }),
    ("stream", stream),
    ("http", |d| {
        let _ = http(&mut Unstructured::new(d));
    }),
    ("ch_config", |d| {
        let _ = ch_config(&mut Unstructured::new(d));
    }),
    ("net", |d| {
        let _ = virtio::fuzzing::net(&mut Unstructured::new(d));
    }),
    ("rng", |d| {
        let _ = virtio::fuzzing::rng(&mut Unstructured::new(d));
    }),
    ("net_ctrl", |d| {
        let _ = virtio::fuzzing::net_ctrl(&mut Unstructured::new(d));
    }),
    ("pci", |d| {
        let _ = virtio::fuzzing::pci(&mut Unstructured::new(d));
    }),
    ("migration_state", |d| {
        let _ = migration_state(&mut Unstructured::new(d));
    }),
    ("control", |d| {
        let _ = control(&mut Unstructured::new(d));
    }),
    ("ivshmem", |d| {
        let _ = ivshmem::ivshmem(&mut Unstructured::new(d));
    }),
    ("switch_ring", |d| {
        let _ = switch::fuzzing::ring(&mut Unstructured::new(d));
    }),
    ("switch_control", |d| {
        let _ = switch::fuzzing::control(&mut Unstructured::new(d));
    }),
];

mod ivshmem;
mod state;
pub use state::{control, migration_state};

/// A piece of what a client writes: request lines, headers and bodies as
/// clients write them, and bytes that are not.
#[derive(Debug, arbitrary::Arbitrary)]
enum Piece {
    RequestLine(u8, u8, u8),
    Header(u8, u32),
    ContentLength(u16),
    End,
    Body(Vec<u8>),
    Raw(Vec<u8>),
}

/// The API socket's HTTP codec on what a client writes (one write, then its
/// end closed): every request it reads, until it refuses or ends.
fn http(u: &mut Unstructured) -> arbitrary::Result<()> {
    use arbitrary::Arbitrary;
    use std::io::Write;
    use std::time::Duration;
    const METHODS: &[&str] = &["GET", "PUT", "POST", "PATCH", "", "G\0T"];
    const PATHS: &[&str] = &[
        "/api/v1/vmm.ping",
        "/api/v1/vm.create",
        "/api/v1/vm.add-net",
        "/api/v1/vm.info?x=1",
        "*",
        "/",
        "/api/v1/",
        "/api/v1/vm.boot",
    ];
    const VERSIONS: &[&str] = &["HTTP/1.1", "HTTP/1.0", "HTTP/2", "", "HTTP/1.1 extra"];
    const HEADERS: &[&str] = &[
        "Host",
        "Content-Type",
        "content-length",
        "Transfer-Encoding",
        "Accept",
        "",
        ":",
    ];
    let mut data = Vec::new();
    for p in Vec::<Piece>::arbitrary(u)?.into_iter().take(64) {
        match p {
            Piece::RequestLine(m, a, v) => data.extend_from_slice(
                format!(
                    "{} {} {}\r\n",
                    METHODS[m as usize % METHODS.len()],
                    PATHS[a as usize % PATHS.len()],
                    VERSIONS[v as usize % VERSIONS.len()]
                )
                .as_bytes(),
            ),
            Piece::Header(h, v) => data.extend_from_slice(
                format!("{}: {v}\r\n", HEADERS[h as usize % HEADERS.len()]).as_bytes(),
            ),
            Piece::ContentLength(n) => {
                data.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes())
            }
            Piece::End => data.extend_from_slice(b"\r\n"),
            Piece::Body(b) | Piece::Raw(b) => data.extend_from_slice(&b),
        }
    }
    let Ok((server, mut client)) = std::os::unix::net::UnixStream::pair() else {
        return Ok(());
    };
    let n = data.len().min(32 << 10);
    // (a socket buffer holds this much: the write does not block)
    let _ = client.write_all(&data[..n]);
    drop(client);
    let mut conn = ch_api::http::Conn::new(server);
    let t = Duration::from_millis(20);
    for _ in 0..64 {
        if conn.read_request(t, t).is_err() {
            break;
        }
        DEPTH[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// A JSON value built from arbitrary input whose object keys come from
/// Cloud Hypervisor's config vocabulary, so objects reach real fields.
#[derive(Debug, arbitrary::Arbitrary)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Small(u16),
    Float(f64),
    Str(u8),
    Array(Vec<Json>),
    Object(Vec<(u8, Json)>),
}

const KEYS: &[&str] = &[
    "payload",
    "kernel",
    "cmdline",
    "initramfs",
    "firmware",
    "cpus",
    "boot_vcpus",
    "max_vcpus",
    "affinity",
    "vcpu",
    "host_cpus",
    "topology",
    "kvm_hyperv",
    "features",
    "memory",
    "size",
    "hotplug_size",
    "hugepages",
    "hugepage_size",
    "prefault",
    "zones",
    "mergeable",
    "shared",
    "serial",
    "console",
    "mode",
    "file",
    "socket",
    "disks",
    "path",
    "readonly",
    "direct",
    "num_queues",
    "queue_size",
    "vhost_user",
    "rate_limiter_config",
    "bandwidth",
    "ops",
    "refill_time",
    "one_time_burst",
    "image_type",
    "id",
    "iommu",
    "pci_segment",
    "net",
    "tap",
    "mac",
    "mtu",
    "fds",
    "rng",
    "src",
    "vsock",
    "cid",
    "platform",
    "num_pci_segments",
    "iommu_segments",
    "tdx",
    "sev_snp",
    "nfvisor_rt",
    "rt_priority",
    "realtime_vcpus",
    "mlock",
    "disable_exits",
    "watchdog",
    "pvpanic",
    "balloon",
    "fs",
    "pmem",
    "devices",
    "numa",
    "landlock_enable",
];

const STRINGS: &[&str] = &[
    "",
    "/",
    "/dev/urandom",
    "/tmp/x.img",
    "Raw",
    "Qcow2",
    "Off",
    "Null",
    "Tty",
    "File",
    "Pty",
    "52:54:00:12:34:56",
    "0-3",
    "1,2",
    "hlt",
    "2M",
    "a,b",
    "\u{0}",
    "Socket",
];

impl Json {
    pub(crate) fn value(self, depth: u8) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(b),
            Json::Int(i) => Value::from(i),
            Json::Small(n) => Value::from(n),
            Json::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
            Json::Str(i) => Value::from(STRINGS[i as usize % STRINGS.len()]),
            Json::Array(v) if depth < 6 => {
                Value::Array(v.into_iter().take(8).map(|j| j.value(depth + 1)).collect())
            }
            Json::Object(v) if depth < 6 => Value::Object(
                v.into_iter()
                    .take(12)
                    .map(|(k, j)| {
                        (
                            KEYS[k as usize % KEYS.len()].to_string(),
                            j.value(depth + 1),
                        )
                    })
                    .collect(),
            ),
            _ => Value::Null,
        }
    }
}

/// Cloud Hypervisor's VM configuration (what vm.create takes) mapped onto
/// nfvisor's: any structure with the real field names.
fn ch_config(u: &mut Unstructured) -> arbitrary::Result<()> {
    use arbitrary::Arbitrary;
    let v = Json::arbitrary(u)?.value(0);
    if let Ok(c) = serde_json::from_value::<ch_api::config::ChVmConfig>(v) {
        DEPTH[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let taps: Vec<ch_api::config::TapFrom> = c
            .net
            .iter()
            .flatten()
            .map(|n| ch_api::config::TapFrom::Name(n.tap.clone().unwrap_or_default()))
            .collect();
        if c.to_vm_config(&taps).is_ok() {
            DEPTH[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        for d in c.disks.iter().flatten() {
            let _ = ch_api::config::disk_spec(d);
        }
    }
    Ok(())
}

/// The migration/snapshot stream reader on any bytes (what a hostile
/// source sends): frames, pages and zero-page lists decoded to the end.
fn stream(data: &[u8]) {
    if let Ok(mut reader) = migration::Reader::new(data) {
        while let Ok(Some(frame)) = reader.next_frame() {
            let _ = frame.pages();
            let _ = frame.zero_pages();
        }
    }
}

/// How deep the inputs of the last target run got: http: requests read
/// whole; ch_config: bodies that parsed as a VmConfig, and of those the
/// ones nfvisor took; migration_state: streams whose configuration
/// parsed, and state frames that decoded; control: lines that parsed as a
/// request, and of those the migrations whose options passed.
pub static DEPTH: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

pub fn find(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// xorshift64*: small, seeded, enough for input generation.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A fresh input, or one from `corpus` mutated (bytes flipped, a run
    /// copied, the length changed).
    pub fn input(&mut self, corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
        if !corpus.is_empty() && self.below(2) == 0 {
            let mut v = corpus[self.below(corpus.len() as u64) as usize].clone();
            for _ in 0..1 + self.below(8) {
                match self.below(3) {
                    0 if !v.is_empty() => {
                        let i = self.below(v.len() as u64) as usize;
                        v[i] ^= 1 << self.below(8);
                    }
                    1 if !v.is_empty() => {
                        let i = self.below(v.len() as u64) as usize;
                        v[i] = self.next_u64() as u8;
                    }
                    _ => v.truncate(self.below(max_len as u64 + 1) as usize),
                }
            }
            v
        } else {
            let n = self.below(max_len as u64 + 1) as usize;
            (0..n).map(|_| self.next_u64() as u8).collect()
        }
    }
}

/// Where the corpora live, under the repository: committed (unlike
/// cargo-fuzz's own `fuzz/corpus`, which libFuzzer fills with thousands of
/// files), so the suite replays the seeds and every regression input.
pub const CORPUS: &str = "fuzz/seeds";

/// The corpus of `target` (files under `fuzz/seeds/TARGET`).
pub fn corpus(root: &std::path::Path, target: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let dir = root.join(CORPUS).join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok().map(|d| (e.path(), d)))
        .collect();
    out.sort();
    out
}
