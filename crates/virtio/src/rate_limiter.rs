//! Token buckets that cap a device's operations and bytes per second (a
//! noisy neighbour's disk or NIC must not starve the others).
//!
//! Written here rather than taken from a crate: rust-vmm has no rate
//! limiter crate, and the one a device needs is a few lines: a bucket may
//! go into debt for one large request (so a request bigger than the bucket
//! is not starved for ever), and the next waits until the debt is repaid.

use std::time::{Duration, Instant};

/// Refills `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens now (negative: a debt).
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` a second; the bucket holds a tenth of a second's worth (at
    /// least one token).
    pub fn new(rate: u64) -> TokenBucket {
        let burst = (rate / 10).max(1);
        TokenBucket {
            rate,
            burst,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst as f64);
    }

    /// How long until a request may go (zero: now).
    fn wait(&self) -> Duration {
        if self.tokens > 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate as f64)
        }
    }
}

/// An operations bucket and a bytes bucket, either optional.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    pub ops: Option<TokenBucket>,
    pub bytes: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(ops_per_s: Option<u64>, bytes_per_s: Option<u64>) -> RateLimiter {
        RateLimiter {
            ops: ops_per_s.filter(|&r| r > 0).map(TokenBucket::new),
            bytes: bytes_per_s.filter(|&r| r > 0).map(TokenBucket::new),
        }
    }

    /// Whether an operation may go now (nothing taken): the size of what
    /// it moves is charged after, with `charge` (a frame's length is known
    /// once it was read).
    pub fn may_go(&mut self) -> Result<(), Duration> {
        self.take(0)
    }

    /// Charges `bytes` moved by an operation `may_go` let through (the
    /// bucket may go into debt).
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
    }

    pub fn is_limited(&self) -> bool {
        self.ops.is_some() || self.bytes.is_some()
    }

    /// Takes one operation of `bytes`, or says how long to wait before
    /// asking again (nothing taken then).
    pub fn take(&mut self, bytes: u64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for b in [&mut self.ops, &mut self.bytes].into_iter().flatten() {
            b.refill(now);
            wait = wait.max(b.wait());
        }
        if !wait.is_zero() {
            return Err(wait.max(Duration::from_micros(100)));
        }
        if let Some(b) = &mut self.ops {
            b.tokens -= 1.0;
        }
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_its_burst_through_then_asks_to_wait() {
        let mut r = RateLimiter::new(Some(100), None);
        // a tenth of a second's worth at once (and what trickled in
        // meanwhile), then a wait of about one operation's time
        let passed = (0..100).take_while(|_| r.take(0).is_ok()).count();
        assert!((10..=12).contains(&passed), "{passed} passed");
        let wait = r.take(0).unwrap_err();
        assert!(wait <= Duration::from_millis(20), "{wait:?}");
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_once_and_leaves_a_debt() {
        let mut r = RateLimiter::new(None, Some(1 << 20));
        assert!(r.take(4 << 20).is_ok());
        // four seconds' debt less the bucket
        let wait = r.take(4096).unwrap_err();
        assert!(wait > Duration::from_secs(3), "{wait:?}");
        assert!(!RateLimiter::new(None, None).is_limited());
        assert!(RateLimiter::new(None, None).take(1 << 30).is_ok());
    }
}
