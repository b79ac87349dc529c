//! A token bucket: at most `per_sec` events a second on average, with a
//! burst of `burst` at once. Used per participant for signaling messages
//! and data packets, so one client cannot flood the node for the others.

use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `per_sec` 0: no limit.
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> Self {
        Self::with_rate(f64::from(per_sec), f64::from(burst.max(per_sec)), now)
    }

    /// `per_sec` may be a fraction (a few a minute); 0: no limit.
    pub fn with_rate(per_sec: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        TokenBucket {
            per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Whether one more event fits now (and count it if so).
    pub fn take(&mut self, now: Instant) -> bool {
        if self.per_sec == 0.0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When it was last asked.
    pub fn last(&self) -> Instant {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 20, t0);
        assert_eq!((0..25).filter(|_| b.take(t0)).count(), 20);
        // One second later, ten more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..25).filter(|_| b.take(t1)).count(), 10);
    }

    #[test]
    fn zero_is_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 0, t0);
        assert!((0..10_000).all(|_| b.take(t0)));
    }
}
