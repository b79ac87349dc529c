//! Counters and their Prometheus text exposition. The media thread adds to
//! atomics (relaxed, no locks); `/metrics` reads them.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A per-participant limit (`[limits]`), the label of its refusals.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Tracks,
    Metadata,
    Attributes,
    DataSize,
    DataRate,
}

impl Limit {
    const ALL: [Limit; 5] = [
        Limit::Tracks,
        Limit::Metadata,
        Limit::Attributes,
        Limit::DataSize,
        Limit::DataRate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Tracks => "tracks",
            Limit::Metadata => "metadata",
            Limit::Attributes => "attributes",
            Limit::DataSize => "data_size",
            Limit::DataRate => "data_rate",
        }
    }
}

#[derive(Debug, Default)]
pub struct MediaCounters {
    pub udp_datagrams_in: AtomicU64,
    pub udp_unroutable: AtomicU64,
    pub udp_rejected: AtomicU64,
    pub udp_send_drops: AtomicU64,
    pub udp_gso_datagrams: AtomicU64,
    pub udp_gso_messages: AtomicU64,
    pub udp_overload_drops: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub tcp_accepted: AtomicU64,
    pub tcp_refused: AtomicU64,
    pub tcp_rejected: AtomicU64,
    pub tcp_timeouts: AtomicU64,
    pub tcp_bad_frames: AtomicU64,
    pub tcp_frames_in: AtomicU64,
    pub tcp_frames_rejected: AtomicU64,
    pub tcp_send_drops: AtomicU64,
    pub ice_fallbacks: AtomicU64,
    pub rtp_packets_in: AtomicU64,
    pub rtp_packets_forwarded: AtomicU64,
    pub rtp_bytes_forwarded: AtomicU64,
    pub keyframe_requests: AtomicU64,
    pub keyframe_requests_ignored: AtomicU64,
    pub bwe_downgrades: AtomicU64,
    pub bwe_pauses: AtomicU64,
    pub bwe_paused_tracks: AtomicU64,
    /// Per open room: (video tracks paused for bandwidth now, downgrades
    /// for bandwidth so far). Written by the workers' housekeeping.
    pub room_bandwidth: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
    pub sdp_errors: AtomicU64,
    pub signal_errors: AtomicU64,
    /// Refusals per [`Limit`].
    pub limit_refusals: [AtomicU64; 5],
    pub rooms: AtomicU64,
    pub participants: AtomicU64,
    pub tracks: AtomicU64,
}

impl MediaCounters {
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        if n > 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Move a gauge shared by several workers from this worker's old
    /// share to its new one.
    pub fn shift(c: &AtomicU64, old: u64, new: u64) {
        if new > old {
            c.fetch_add(new - old, Ordering::Relaxed);
        } else if old > new {
            c.fetch_sub(old - new, Ordering::Relaxed);
        }
    }

    /// A gauge one owner keeps.
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn refused(&self, limit: Limit) {
        Self::add(&self.limit_refusals[limit as usize], 1);
    }

    fn snapshot(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        let g = Self::get;
        vec![
            (
                "udp_datagrams_in_total",
                "counter",
                "UDP datagrams received on the media port",
                g(&self.udp_datagrams_in),
            ),
            (
                "udp_unroutable_total",
                "counter",
                "UDP datagrams matching no peer (dropped)",
                g(&self.udp_unroutable),
            ),
            (
                "udp_overload_drops_total",
                "counter",
                "UDP datagrams dropped because their forwarding worker was too far behind",
                g(&self.udp_overload_drops),
            ),
            (
                "tcp_connections",
                "gauge",
                "Open ICE-TCP connections",
                g(&self.tcp_connections),
            ),
            (
                "tcp_accepted_total",
                "counter",
                "ICE-TCP connections accepted",
                g(&self.tcp_accepted),
            ),
            (
                "tcp_refused_total",
                "counter",
                "ICE-TCP connections refused at once: over the limit in all or per source address",
                g(&self.tcp_refused),
            ),
            (
                "tcp_rejected_total",
                "counter",
                "ICE-TCP connections closed because their first frame was no STUN request for a known peer",
                g(&self.tcp_rejected),
            ),
            (
                "tcp_timeouts_total",
                "counter",
                "ICE-TCP connections closed for silence: no first STUN request in time, or idle",
                g(&self.tcp_timeouts),
            ),
            (
                "tcp_bad_frames_total",
                "counter",
                "ICE-TCP connections closed for a frame of length 0 or over the limit",
                g(&self.tcp_bad_frames),
            ),
            (
                "tcp_frames_in_total",
                "counter",
                "ICE-TCP frames received",
                g(&self.tcp_frames_in),
            ),
            (
                "tcp_frames_rejected_total",
                "counter",
                "ICE-TCP frames matching no peer, or refused by it",
                g(&self.tcp_frames_rejected),
            ),
            (
                "tcp_send_drops_total",
                "counter",
                "ICE-TCP frames dropped on sending: the connection's output was full or gone",
                g(&self.tcp_send_drops),
            ),
            (
                "ice_fallbacks_total",
                "counter",
                "Sessions whose ICE failed while signaling lived, asked to rejoin on the next connectivity rung",
                g(&self.ice_fallbacks),
            ),
            (
                "udp_rejected_total",
                "counter",
                "UDP datagrams a peer rejected as malformed (dropped)",
                g(&self.udp_rejected),
            ),
            (
                "udp_send_drops_total",
                "counter",
                "Outgoing datagrams the kernel did not take",
                g(&self.udp_send_drops),
            ),
            (
                "udp_gso_datagrams_total",
                "counter",
                "Outgoing datagrams sent inside UDP GSO messages (cut by the kernel)",
                g(&self.udp_gso_datagrams),
            ),
            (
                "udp_gso_messages_total",
                "counter",
                "UDP GSO messages sent (each carries two datagrams or more)",
                g(&self.udp_gso_messages),
            ),
            (
                "rtp_packets_in_total",
                "counter",
                "RTP packets received from publishers",
                g(&self.rtp_packets_in),
            ),
            (
                "rtp_packets_forwarded_total",
                "counter",
                "RTP packets forwarded to subscribers",
                g(&self.rtp_packets_forwarded),
            ),
            (
                "rtp_bytes_forwarded_total",
                "counter",
                "RTP payload bytes forwarded to subscribers",
                g(&self.rtp_bytes_forwarded),
            ),
            (
                "keyframe_requests_total",
                "counter",
                "Keyframe requests sent to publishers",
                g(&self.keyframe_requests),
            ),
            (
                "keyframe_requests_ignored_total",
                "counter",
                "Subscribers' keyframe requests held back because the keyframes sent to them did not help",
                g(&self.keyframe_requests_ignored),
            ),
            (
                "bandwidth_downgrades_total",
                "counter",
                "Subscribed video moved to a lower layer, or paused, to fit a subscriber's downlink estimate",
                g(&self.bwe_downgrades),
            ),
            (
                "bandwidth_pauses_total",
                "counter",
                "Subscribed video tracks paused because not even their lowest layer fitted the subscriber's downlink",
                g(&self.bwe_pauses),
            ),
            (
                "bandwidth_paused_tracks",
                "gauge",
                "Subscribed video tracks paused for bandwidth now",
                g(&self.bwe_paused_tracks),
            ),
            (
                "sdp_errors_total",
                "counter",
                "SDP offers or answers refused",
                g(&self.sdp_errors),
            ),
            (
                "signal_request_errors_total",
                "counter",
                "Signal requests refused (bad grant, unknown track, ...)",
                g(&self.signal_errors),
            ),
            ("rooms", "gauge", "Open rooms", g(&self.rooms)),
            (
                "participants",
                "gauge",
                "Connected participants",
                g(&self.participants),
            ),
            ("tracks", "gauge", "Published tracks", g(&self.tracks)),
        ]
    }
}

pub fn render(media: &MediaCounters, signal: &moselle_signaling::SignalCounters) -> String {
    let mut s = String::new();
    for (name, kind, help, v) in media.snapshot() {
        let _ = writeln!(
            s,
            "# HELP moselle_{name} {help}\n# TYPE moselle_{name} {kind}\nmoselle_{name} {v}"
        );
    }
    render_rooms(&mut s, media);
    render_limits(&mut s, media, signal);
    render_counters(&mut s, signal.snapshot());
    render_log_errors(&mut s);
    render_process(&mut s);
    s
}

/// Per-room series, labelled by room name (escaped as Prometheus wants).
fn render_rooms(s: &mut String, media: &MediaCounters) {
    let rooms: Vec<(String, (u64, u64))> = match media.room_bandwidth.lock() {
        Ok(m) => m.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        Err(_) => return,
    };
    let label = |r: &str| {
        r.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    for (name, kind, help, pick) in [
        (
            "room_bandwidth_paused_tracks",
            "gauge",
            "Subscribed video tracks paused for bandwidth now, per room",
            0,
        ),
        (
            "room_bandwidth_downgrades_total",
            "counter",
            "Subscribed video moved to a lower layer or paused for a subscriber's bandwidth, per room",
            1,
        ),
    ] {
        let _ = writeln!(s, "# HELP moselle_{name} {help}\n# TYPE moselle_{name} {kind}");
        for (room, v) in &rooms {
            let v = if pick == 0 { v.0 } else { v.1 };
            let _ = writeln!(s, "moselle_{name}{{room=\"{}\"}} {v}", label(room));
        }
    }
}

/// Refusals by limit; signaling's own rate limit is one of them.
fn render_limits(
    s: &mut String,
    media: &MediaCounters,
    signal: &moselle_signaling::SignalCounters,
) {
    let name = "moselle_limit_refusals_total";
    let _ = writeln!(
        s,
        "# HELP {name} Requests refused for a per-participant limit ([limits])\n# TYPE {name} counter"
    );
    for l in Limit::ALL {
        let v = MediaCounters::get(&media.limit_refusals[l as usize]);
        let _ = writeln!(s, "{name}{{limit=\"{}\"}} {v}", l.label());
    }
    let v = signal.rate_limited.load(Ordering::Relaxed);
    let _ = writeln!(s, "{name}{{limit=\"signal_rate\"}} {v}");
}

/// Log lines the node could not write (see `log_writer`).
fn render_log_errors(s: &mut String) {
    let name = "moselle_log_write_errors_total";
    let v = crate::log_writer::failed_writes();
    let _ = writeln!(
        s,
        "# HELP {name} Log writes that failed (a full disk, a closed pipe): the log cannot say so itself\n# TYPE {name} counter\n{name} {v}"
    );
}

/// The standard Prometheus process metrics, so a load generator (or an
/// operator) reads the server's CPU time and memory without /proc access.
fn render_process(s: &mut String) {
    let Some(u) = process_usage(None) else {
        return;
    };
    let (cpu, rss) = (u.cpu_seconds, u.rss_bytes);
    let _ = writeln!(
        s,
        "# HELP process_cpu_seconds_total User and system CPU time spent, seconds\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n# HELP process_resident_memory_bytes Resident memory size, bytes\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
    );
}

/// A process's CPU time and resident memory.
#[derive(Debug, Clone, Copy)]
pub struct ProcessUsage {
    /// User plus system time.
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// Read `/proc/<pid>/stat` (this process with `None`).
pub fn process_usage(pid: Option<u32>) -> Option<ProcessUsage> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    // The command name may hold spaces: fields are counted after it, from
    // the state (field 3 of proc(5)) at index 0.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcessUsage {
        cpu_seconds: (num(11)? + num(12)?) as f64 / ticks,
        rss_bytes: num(21)? * page,
    })
}

/// Append counters given as (name, help, value).
pub fn render_counters(s: &mut String, counters: Vec<(&'static str, &'static str, u64)>) {
    for (name, help, v) in counters {
        let _ = writeln!(
            s,
            "# HELP moselle_{name} {help}\n# TYPE moselle_{name} counter\nmoselle_{name} {v}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_usage_is_read() {
        let u = process_usage(None).expect("/proc/self/stat");
        assert!(u.rss_bytes > 0 && u.cpu_seconds >= 0.0, "{u:?}");
        assert!(process_usage(Some(u32::MAX)).is_none());
    }

    #[test]
    fn room_series_carry_escaped_room_names() {
        let m = MediaCounters::default();
        m.room_bandwidth
            .lock()
            .unwrap()
            .insert("a\"b\\c\nd".into(), (2, 5));
        let mut s = String::new();
        render_rooms(&mut s, &m);
        assert!(
            s.contains("moselle_room_bandwidth_paused_tracks{room=\"a\\\"b\\\\c\\nd\"} 2"),
            "{s}"
        );
        assert!(
            s.contains("moselle_room_bandwidth_downgrades_total{room=\"a\\\"b\\\\c\\nd\"} 5"),
            "{s}"
        );
        assert!(s.contains("# TYPE moselle_room_bandwidth_downgrades_total counter"));
    }
}
