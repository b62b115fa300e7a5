//! Zero-page detection for snapshots and migration, at memory speed. With
//! `--prefault`, `--mlock` or hugepages every page of an idle guest is
//! present, so this scan is what the first round of an idle guest costs.
//!
//! Written with `std::arch` and chosen at run time (AVX-512, else AVX2, else
//! a word loop), rather than left to the compiler: the release build targets
//! baseline x86-64, where autovectorisation stops at 16-byte SSE2.

use std::sync::OnceLock;

/// The implementations, widest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    Avx512,
    Avx2,
    Scalar,
}

impl Scan {
    pub fn name(self) -> &'static str {
        match self {
            Scan::Avx512 => "avx512",
            Scan::Avx2 => "avx2",
            Scan::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Scan::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Scan::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            Scan::Scalar => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Whether `data` is all zero bytes.
    pub fn is_zero(self, data: &[u8]) -> bool {
        // SAFETY: a slice is readable for its length.
        unsafe { self.is_zero_at(data.as_ptr(), data.len()) }
    }

    /// Whether the `len` bytes at `ptr` are all zero, read through raw
    /// pointers only (no reference is formed), so the bytes may be guest
    /// memory a running vCPU writes meanwhile: the answer then describes
    /// some mix of old and new contents, which dirty tracking makes safe
    /// (a page written during the scan is dirty and is sent again).
    ///
    /// # Safety
    /// `ptr..ptr + len` must be mapped and readable.
    pub unsafe fn is_zero_at(self, ptr: *const u8, len: usize) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only when the CPU has AVX-512F (checked by `available`);
            // the range is readable (this function's contract).
            Scan::Avx512 if self.available() => unsafe { x86::zero_avx512(ptr, len) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only when the CPU has AVX2; the range is readable.
            Scan::Avx2 if self.available() => unsafe { x86::zero_avx2(ptr, len) },
            // SAFETY: the range is readable.
            _ => unsafe { zero_scalar(ptr, len) },
        }
    }
}

/// The widest implementation this CPU has (decided once).
pub fn best() -> Scan {
    static BEST: OnceLock<Scan> = OnceLock::new();
    *BEST.get_or_init(|| {
        [Scan::Avx512, Scan::Avx2, Scan::Scalar]
            .into_iter()
            .find(|s| s.available())
            .unwrap_or(Scan::Scalar)
    })
}

/// Whether `data` is all zero bytes, with the widest implementation.
pub fn is_zero(data: &[u8]) -> bool {
    best().is_zero(data)
}

/// Whether the `len` bytes at `ptr` are zero (see `Scan::is_zero_at`).
///
/// # Safety
/// `ptr..ptr + len` must be mapped and readable.
pub unsafe fn is_zero_at(ptr: *const u8, len: usize) -> bool {
    // SAFETY: passed on from the caller.
    unsafe { best().is_zero_at(ptr, len) }
}

/// # Safety
/// `ptr..ptr + len` must be readable.
unsafe fn zero_scalar(ptr: *const u8, len: usize) -> bool {
    let words = len / 8;
    // SAFETY: every read is inside the range; unaligned reads are allowed.
    unsafe {
        (0..words).all(|i| (ptr.add(i * 8) as *const u64).read_unaligned() == 0)
            && (words * 8..len).all(|i| ptr.add(i).read() == 0)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 256 bytes per step (four 64-byte loads OR-ed), stopping at the first
    /// step with a set bit.
    ///
    /// # Safety
    /// The CPU has AVX-512F, and `ptr..ptr + len` is readable.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn zero_avx512(ptr: *const u8, len: usize) -> bool {
        let steps = len / 256;
        for i in 0..steps {
            // SAFETY: inside the range the caller vouched for.
            let p = unsafe { ptr.add(i * 256) } as *const __m512i;
            // SAFETY: four unaligned 64-byte loads inside this 256-byte step.
            let acc = unsafe {
                _mm512_or_si512(
                    _mm512_or_si512(_mm512_loadu_si512(p), _mm512_loadu_si512(p.add(1))),
                    _mm512_or_si512(_mm512_loadu_si512(p.add(2)), _mm512_loadu_si512(p.add(3))),
                )
            };
            if _mm512_test_epi64_mask(acc, acc) != 0 {
                return false;
            }
        }
        // SAFETY: the tail of the same range.
        unsafe { super::zero_scalar(ptr.add(steps * 256), len - steps * 256) }
    }

    /// 128 bytes per step (four 32-byte loads OR-ed).
    ///
    /// # Safety
    /// The CPU has AVX2, and `ptr..ptr + len` is readable.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn zero_avx2(ptr: *const u8, len: usize) -> bool {
        let steps = len / 128;
        for i in 0..steps {
            // SAFETY: inside the range the caller vouched for.
            let p = unsafe { ptr.add(i * 128) } as *const __m256i;
            // SAFETY: four unaligned 32-byte loads inside this 128-byte step.
            let acc = unsafe {
                _mm256_or_si256(
                    _mm256_or_si256(_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))),
                    _mm256_or_si256(_mm256_loadu_si256(p.add(2)), _mm256_loadu_si256(p.add(3))),
                )
            };
            if _mm256_testz_si256(acc, acc) == 0 {
                return false;
            }
        }
        // SAFETY: the tail of the same range.
        unsafe { super::zero_scalar(ptr.add(steps * 128), len - steps * 128) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_implementation_finds_any_set_byte() {
        let scans: Vec<Scan> = [Scan::Avx512, Scan::Avx2, Scan::Scalar]
            .into_iter()
            .filter(|s| s.available())
            .collect();
        for len in [0usize, 7, 64, 100, 255, 4096, 4096 + 37] {
            let mut buf = vec![0u8; len];
            for s in &scans {
                assert!(s.is_zero(&buf), "{s:?} len {len}");
            }
            for at in 0..len {
                buf[at] = 0x80;
                for s in &scans {
                    assert!(!s.is_zero(&buf), "{s:?} missed byte {at} of {len}");
                }
                buf[at] = 0;
            }
        }
        assert!(is_zero(&[0u8; 4096]));
    }
}
