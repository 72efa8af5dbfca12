//! Reporting a manifest directory that cannot be read, without flooding the
//! log: the first failure is logged, then again after 1 s, 2 s, 4 s, ... (at
//! most once an hour), or at once when the error changes; recovery is logged
//! once, with how long it lasted.

use std::time::Duration;

use tokio::time::Instant;

/// The first gap between two reports of the same failure.
const FIRST_GAP: Duration = Duration::from_secs(1);
/// The longest gap between two reports.
const MAX_GAP: Duration = Duration::from_secs(3600);

/// The failures since the directory was last read.
#[derive(Debug)]
pub(super) struct Outage {
    since: Instant,
    failures: u64,
    /// What was last logged, and when the next report of it is due.
    error: String,
    next_report: Instant,
    gap: Duration,
}

/// What to log about a failed poll.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Report {
    /// The first failure (or a new error): log it.
    First,
    /// Still failing, `failures` times for `duration`: log it; the next report
    /// is after `next` unless the error changes.
    Still {
        failures: u64,
        duration: Duration,
        next: Duration,
    },
    /// Nothing to log.
    Quiet,
}

impl Outage {
    /// An outage starting with a failure at `now`.
    pub(super) fn start(error: String, now: Instant) -> Self {
        Self {
            since: now,
            failures: 1,
            error,
            next_report: now + FIRST_GAP,
            gap: FIRST_GAP,
        }
    }

    /// One more failed poll at `now`.
    pub(super) fn failed(&mut self, error: String, now: Instant) -> Report {
        self.failures += 1;
        if error != self.error {
            self.error = error;
            self.gap = FIRST_GAP;
            self.next_report = now + FIRST_GAP;
            return Report::First;
        }
        if now < self.next_report {
            return Report::Quiet;
        }
        self.gap = (self.gap * 2).min(MAX_GAP);
        self.next_report = now + self.gap;
        Report::Still {
            failures: self.failures,
            duration: now - self.since,
            next: self.gap,
        }
    }

    /// How many polls failed, and for how long, as of `now`.
    pub(super) fn ended(&self, now: Instant) -> (u64, Duration) {
        (self.failures, now - self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_grow_apart_and_a_new_error_is_reported_at_once() {
        let start = Instant::now();
        let mut outage = Outage::start("gone".into(), start);
        let mut reported = Vec::new();
        // Four polls a second for three hours.
        for tick in 1..=(4 * 10800) {
            let now = start + Duration::from_millis(250 * tick);
            if outage.failed("gone".into(), now) != Report::Quiet {
                reported.push(now - start);
            }
        }
        let seconds: Vec<u64> = reported.iter().map(Duration::as_secs).collect();
        assert_eq!(
            seconds,
            [1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095, 7695],
            "the first failure, then after 1 s, 2 s, 4 s, ... capped at an hour"
        );
        let now = start + Duration::from_secs(10801);
        assert_eq!(outage.failed("denied".into(), now), Report::First);
        assert_eq!(
            outage.ended(now),
            (4 * 10800 + 2, Duration::from_secs(10801))
        );
    }
}
