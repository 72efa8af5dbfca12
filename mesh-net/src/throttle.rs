//! Logging a recurring event at a bounded rate: the first occurrence is
//! logged, then at most one line per interval, each saying how many
//! occurrences it stands for. An attacker who makes an error happen a million
//! times a second gets a few log lines, not a full disk.

use std::time::Duration;

use tokio::time::Instant;

/// Decides when a recurring event may be logged again.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use mesh_net::Throttle;
///
/// let mut throttle = Throttle::new(Duration::from_secs(5));
/// assert_eq!(throttle.tick(), Some(1)); // the first one is logged
/// assert_eq!(throttle.tick(), None); // then nothing for 5 s
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Throttle {
    every: Duration,
    next: Option<Instant>,
    pending: u64,
}

impl Throttle {
    /// Logs at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            next: None,
            pending: 0,
        }
    }

    /// Counts one occurrence. `Some(n)` when it may be logged now: `n`
    /// occurrences (this one included) since the last line.
    pub fn tick(&mut self) -> Option<u64> {
        self.pending += 1;
        let now = Instant::now();
        if self.next.is_some_and(|next| now < next) {
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_counting_what_it_stands_for() {
        let mut throttle = Throttle::new(Duration::from_secs(5));
        assert_eq!(throttle.tick(), Some(1));
        for _ in 0..999 {
            assert_eq!(throttle.tick(), None);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(throttle.tick(), Some(1000), "the suppressed ones and this");
        assert_eq!(throttle.tick(), None);
    }
}
