//! A budget for log lines a guest can trigger: a guest that repeats an
//! access at full speed must not fill the host's disk or the journal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines let through per second, per call site.
const PER_SECOND: u64 = 5;

/// One call site's budget: up to `PER_SECOND` lines in each second, the
/// rest counted and reported with the next line let through. Lock-free
/// and approximate under races (a line more or less), which is all a log
/// budget needs.
#[derive(Default)]
pub struct LogLimit {
    /// The second (since the process's first use) the budget counts in.
    second: AtomicU64,
    /// Lines let through in that second.
    used: AtomicU64,
    /// Lines held back since the last one let through.
    suppressed: AtomicU64,
}

fn now_s() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl LogLimit {
    pub const fn new() -> Self {
        LogLimit {
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may go out now, `n` being how many were held
    /// back before it (say so in the line); `None` when it is held back.
    pub fn allow(&self) -> Option<u64> {
        let now = now_s();
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!` (or another level) through a per-call-site
/// [`LogLimit`]: `limited!(warn, "fmt", args..)`. Held-back lines are
/// counted and the next line says how many.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new();
        if let Some(held) = LIMIT.allow() {
            if held > 0 {
                tracing::$level!("{} ({held} more like it not logged)", format_args!($($arg)+));
            } else {
                tracing::$level!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_gets_a_few_lines_a_second_and_the_count() {
        let l = LogLimit::new();
        let allowed = (0..100_000).filter(|_| l.allow().is_some()).count() as u64;
        // the loop may straddle one second boundary
        assert!(
            (PER_SECOND..=2 * PER_SECOND).contains(&allowed),
            "{allowed}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let held = l.allow().expect("a new second has a new budget");
        assert_eq!(held, 100_000 - allowed);
        assert_eq!(l.allow(), Some(0));
    }
}
