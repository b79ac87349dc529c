//! Counters and histograms shared by every simulated participant. All are
//! atomics: the receive loops of hundreds of tracks update them without a
//! lock, and the progress line reads them while they run.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// The generator's clock: microseconds since the process started. Senders
/// write it into each payload and receivers subtract it, so both ends read
/// the same monotonic clock.
pub fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A histogram of microsecond values in log-linear buckets (16 per power of
/// two, so any percentile is within about 4 % of the true value).
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

const SUB: u32 = 16;
const POWERS: u32 = 34;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..(SUB * POWERS) as usize)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let p = 63 - v.leading_zeros(); // >= 4
    let sub = ((v >> (p - 4)) & (SUB as u64 - 1)) as u32;
    (((p - 3) * SUB + sub) as usize).min((SUB * POWERS) as usize - 1)
}

fn lower_bound_of(b: usize) -> u64 {
    let b = b as u32;
    if b < SUB {
        return b as u64;
    }
    let p = b / SUB + 3;
    let sub = (b % SUB) as u64;
    (1u64 << p) | (sub << (p - 4))
}

impl Histogram {
    pub fn record(&self, v: u64) {
        self.buckets[bucket_of(v)].fetch_add(1, Relaxed);
    }

    pub fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Relaxed);
        }
    }

    /// The value below which a fraction `q` of the samples lie (the bucket's
    /// lower bound), or None without samples.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(lower_bound_of(i));
            }
        }
        None
    }
}

/// Everything the participants report.
#[derive(Default)]
pub struct Stats {
    pub joined: AtomicU64,
    pub join_failures: AtomicU64,
    pub sent_packets: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// Packets a sender produced later than their due time by more than a
    /// frame interval: the generator could not keep up.
    pub send_late: AtomicU64,
    pub send_errors: AtomicU64,
    pub recv_packets: AtomicU64,
    pub recv_bytes: AtomicU64,
    /// Packets the receivers' sequence numbers say should have arrived.
    pub recv_expected: AtomicU64,
    pub recv_video_packets: AtomicU64,
    pub recv_keyframes: AtomicU64,
    pub recv_tracks: AtomicU64,
    /// Sender-to-receiver delay through the SFU, microseconds.
    pub delay_us: Histogram,
    /// Token to first media packet, microseconds.
    pub join_us: Histogram,
    /// The same joins, token to each step on the way (see [`JoinPhase`]).
    pub join_phase_us: [Histogram; JoinPhase::COUNT],
}

/// Steps of a join, in the order they usually come.
#[derive(Debug, Clone, Copy)]
pub enum JoinPhase {
    /// The JoinResponse arrived.
    Signal = 0,
    /// The first offer went out (the client's own work before it).
    Offer,
    /// The first answer arrived (single PC) or was sent (two PCs).
    Answer,
    /// The peer connection is connected (ICE and DTLS done).
    Connected,
    /// The server asked for receive m-lines (single PC) or offered the
    /// subscriber connection (two PCs): it knows what to send.
    Subscribe,
}

impl JoinPhase {
    pub const COUNT: usize = 5;
    pub const NAMES: [&'static str; Self::COUNT] =
        ["signal", "offer", "answer", "connected", "subscribe"];
}

/// One participant's join steps, microseconds after its token (0: not yet).
#[derive(Default)]
pub struct JoinSteps {
    at: [AtomicU64; JoinPhase::COUNT],
}

impl JoinSteps {
    /// The first time only.
    pub fn mark(&self, phase: JoinPhase, since: u64) {
        let v = now_us().saturating_sub(since).max(1);
        let _ = self.at[phase as usize].compare_exchange(0, v, Relaxed, Relaxed);
    }

    /// Into the run's histograms (for the joins whose first media is
    /// counted).
    pub fn record(&self, into: &[Histogram; JoinPhase::COUNT]) {
        for (a, h) in self.at.iter().zip(into) {
            let v = a.load(Relaxed);
            if v != 0 {
                h.record(v);
            }
        }
    }
}

impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

/// CPU time of the calling thread, seconds.
pub fn thread_cpu_seconds() -> f64 {
    // SAFETY: clock_gettime writes into the timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in [
            0u64, 1, 15, 16, 17, 100, 1000, 12_345, 1_000_000, 50_000_000,
        ] {
            let b = bucket_of(v);
            assert!(b >= last, "bucket order at {v}");
            last = b;
            let lo = lower_bound_of(b);
            assert!(lo <= v, "{lo} > {v}");
            assert!(
                (v - lo) as f64 <= v as f64 * 0.07,
                "{v}: bucket starts at {lo}"
            );
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000u64 {
            h.record(v * 10);
        }
        let p50 = h.quantile(0.5).unwrap_or(0) as f64;
        let p99 = h.quantile(0.99).unwrap_or(0) as f64;
        assert!((p50 - 5000.0).abs() < 5000.0 * 0.07, "p50 {p50}");
        assert!((p99 - 9900.0).abs() < 9900.0 * 0.07, "p99 {p99}");
    }
}
