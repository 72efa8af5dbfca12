//! Retry delays that grow exponentially and are spread at random, so that
//! many clients cut off at once (a control plane restart) do not all come
//! back at the same instant.
//!
//! Each delay lies between half and all of the exponential step ("equal
//! jitter"): the first in `[initial/2, initial)`, doubling, then in
//! `[max/2, max)` once the step reaches `max`. The delays come from
//! [`backon`]'s exponential backoff.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The shortest first delay: a backoff configured to start at zero (or a
/// nanosecond) starts here, so that it grows instead of spinning.
pub const MIN_DELAY: Duration = Duration::from_millis(1);

/// Exponential backoff with jitter; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Delays from about `initial` doubling up to about `max` (see the
    /// module docs for the exact ranges).
    /// Both are at least [`MIN_DELAY`]: a zero start would never grow.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(MIN_DELAY);
        let max = max.max(initial);
        // backon adds a jitter in [0, step) to each step: halving both
        // bounds gives steps of [d/2, d).
        let builder = ExponentialBuilder::new()
            .with_min_delay(initial / 2)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // Never exhausted: built without a maximum number of attempts.
        self.delays.next().unwrap_or(self.max)
    }

    /// Starts again from the first delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_their_jitter_range_up_to_the_cap() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(15);
        let mut backoff = Backoff::new(initial, max);
        let mut step = initial;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(max);
        }
    }

    #[test]
    fn delays_are_spread() {
        let mut first = std::collections::HashSet::new();
        for _ in 0..20 {
            first
                .insert(Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).next_delay());
        }
        assert!(first.len() > 1, "20 clients got the same first delay");
    }

    #[test]
    fn a_zero_start_still_grows() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(
            delays.iter().all(|delay| *delay >= MIN_DELAY / 2),
            "{delays:?}"
        );
        assert!(delays[11] >= Duration::from_millis(500), "{delays:?}");
    }

    #[test]
    fn reset_starts_again() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
