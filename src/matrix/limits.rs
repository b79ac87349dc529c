//! Request rate limits for the token endpoints: a token bucket per key
//! (client address, Matrix user). Small and lock-protected: these requests
//! are few compared to media, and never on the media thread.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moselle_signaling::rate::TokenBucket;

pub struct RateLimiter {
    per_minute: u32,
    burst: u32,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        RateLimiter {
            per_minute: per_minute.max(1),
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one request for `key`; `false` when over the limit.
    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    pub fn allow_at(&self, key: &str, now: Instant) -> bool {
        let Ok(mut b) = self.buckets.lock() else {
            return false;
        };
        if b.len() > 100_000 {
            // Forget idle keys so an address sweep cannot grow this forever.
            let idle = Duration::from_secs(600);
            b.retain(|_, t| now.duration_since(t.last()) < idle);
        }
        let rate = f64::from(self.per_minute) / 60.0;
        b.entry(key.to_string())
            .or_insert_with(|| TokenBucket::with_rate(rate, f64::from(self.burst), now))
            .take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new(60, 3);
        let t = Instant::now();
        assert!(l.allow_at("a", t) && l.allow_at("a", t) && l.allow_at("a", t));
        assert!(!l.allow_at("a", t), "burst spent");
        assert!(l.allow_at("b", t), "keys are independent");
        assert!(
            l.allow_at("a", t + Duration::from_millis(1100)),
            "one per second refills"
        );
    }
}
