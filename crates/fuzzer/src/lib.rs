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
];

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

/// The corpus of `target` (files under `fuzz/corpus/TARGET`).
pub fn corpus(root: &std::path::Path, target: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let dir = root.join("fuzz/corpus").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok().map(|d| (e.path(), d)))
        .collect();
    out.sort();
    out
}
