//! The scenarios (after LiveKit's published benchmark) and one measured run
//! of a given size: join everyone, settle, measure a window, leave.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::client::{self, Ctx, Plan};
use crate::server::{Sample, Server};
use crate::stats::{JoinPhase, Stats};
use moselle::metrics::process_usage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Audio-only large room: a few speakers, many listeners.
    Audio,
    /// 720p meeting: everyone publishes simulcast video and audio and
    /// watches everyone else in a grid.
    Meeting,
    /// Livestream: one publisher, many viewers on the top layer.
    Livestream,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Audio => "audio",
            Kind::Meeting => "meeting",
            Kind::Livestream => "livestream",
        }
    }

    /// LiveKit's published forwarded packets per CPU-second for this shape
    /// (16-core c2-standard-16 figures divided by cores and utilisation).
    pub fn livekit_per_core(self) -> f64 {
        match self {
            Kind::Audio => 959_000.0 / (16.0 * 0.80),
            Kind::Meeting => 763_000.0 / (16.0 * 0.85),
            Kind::Livestream => 561_000.0 / (16.0 * 0.92),
        }
    }

    /// The participants of a room of `n` (for audio: `n` listeners plus
    /// the speakers).
    pub fn plans(self, room: &str, n: usize, speakers: usize) -> Vec<Plan> {
        let p = |identity: String, audio, video, subscribe, view| Plan {
            room: room.to_string(),
            identity,
            audio,
            video,
            subscribe,
            view,
        };
        match self {
            Kind::Audio => (0..speakers)
                .map(|i| p(format!("speaker-{i}"), true, false, true, (0, 0)))
                .chain((0..n).map(|i| p(format!("listener-{i}"), false, false, true, (0, 0))))
                .collect(),
            Kind::Meeting => {
                // Everyone else in a grid in a 1280x720 window.
                let others = n.saturating_sub(1).max(1);
                let cols = (others as f64).sqrt().ceil() as u32;
                let view = (1280 / cols, 720 / cols);
                (0..n)
                    .map(|i| p(format!("member-{i}"), true, true, true, view))
                    .collect()
            }
            Kind::Livestream => std::iter::once(p("host".into(), true, true, false, (0, 0)))
                .chain((0..n).map(|i| p(format!("viewer-{i}"), false, false, true, (1280, 720))))
                .collect(),
        }
    }
}

/// The SFU under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Moselle,
    /// Janus VideoRoom (Debian `janus`), side by side: see `janus.rs`.
    Janus,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Moselle => "moselle",
            Target::Janus => "janus",
        }
    }
}

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct RunOpts {
    pub kind: Kind,
    pub size: usize,
    pub speakers: usize,
    pub warmup: Duration,
    pub window: Duration,
    /// Participants started per second.
    pub join_rate: f64,
    /// Rooms of `size` side by side.
    pub rooms: usize,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Measurement {
    pub target: String,
    pub scenario: String,
    pub size: usize,
    pub rooms: usize,
    pub participants: usize,
    pub joined: u64,
    pub join_failures: u64,
    pub window_s: f64,
    pub sent_pps: f64,
    pub received_pps: f64,
    pub forwarded_pps: f64,
    /// RTP packets the server received from publishers.
    pub server_received_pps: f64,
    /// Mean RTP payload the publishers sent.
    pub avg_payload_bytes: f64,
    pub server_cpu_cores: f64,
    pub server_us_per_forwarded: Option<f64>,
    pub forwarded_per_cpu_second: Option<f64>,
    pub server_rss_mib: f64,
    pub server_kib_per_participant: Option<f64>,
    pub generator_cpu_cores: f64,
    pub loss: f64,
    pub keyframes_received: u64,
    pub delay_p50_ms: Option<f64>,
    pub delay_p99_ms: Option<f64>,
    pub join_p50_ms: Option<f64>,
    pub join_p99_ms: Option<f64>,
    /// Packets the clients received per server CPU-second: the figure
    /// that compares servers whatever they count.
    pub received_per_cpu_second: Option<f64>,
    /// Median token to each step of those joins (`JoinPhase::NAMES`).
    pub join_phases_p50_ms: Vec<(String, Option<f64>)>,
    pub send_late_fraction: f64,
    /// Datagrams the server's socket would not take during the window.
    pub server_send_drops: u64,
    /// Share of the server's media input that came over ICE-TCP.
    pub tcp_share: f64,
    /// "none", or what limited the run instead of the server.
    pub bottleneck: String,
}

pub struct Runner {
    pub target: Target,
    pub server: Server,
    pub ctx: Arc<Ctx>,
    pub cores: usize,
    pub quiet: bool,
}

impl Runner {
    /// One run of `opts.size` in a fresh room.
    pub async fn run(&self, opts: &RunOpts, room: &str) -> anyhow::Result<Measurement> {
        let s = self.ctx.stats.clone();
        let idle = self.server.sample().await?;
        let plans: Vec<Plan> = (0..opts.rooms)
            .flat_map(|r| {
                opts.kind
                    .plans(&format!("{room}-r{r}"), opts.size, opts.speakers)
            })
            .collect();
        let (stop_tx, stop_rx) = watch::channel(false);
        let before = snapshot(&s);
        self.ctx
            .media_since
            .store(0, std::sync::atomic::Ordering::Relaxed);
        s.join_us.reset();
        for h in &s.join_phase_us {
            h.reset();
        }
        let mut tasks = Vec::new();
        let gap = Duration::from_secs_f64(1.0 / opts.join_rate.max(0.1));
        let n = plans.len();
        if self.target == Target::Janus {
            for r in 0..opts.rooms {
                crate::janus::create_room(&self.ctx.url, &format!("{room}-r{r}")).await?;
            }
        }
        for plan in plans {
            let ctx = self.ctx.clone();
            let stop = stop_rx.clone();
            let target = self.target;
            tasks.push(tokio::spawn(async move {
                let who = plan.identity.clone();
                let r = match target {
                    Target::Moselle => client::run(ctx.clone(), plan, stop).await,
                    Target::Janus => crate::janus::run(ctx.clone(), plan, stop).await,
                };
                if let Err(e) = r {
                    Stats::add(&ctx.stats.join_failures, 1);
                    tracing::warn!(participant = %who, error = %format!("{e:#}"), "participant failed");
                }
            }));
            self.progress(opts, n, before.joined + before.join_failures)
                .await;
            tokio::time::sleep(gap).await;
        }
        // Settle: everyone joined (or failed), then the warm-up.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Stats::get(&s.joined) + Stats::get(&s.join_failures)
            < before.joined + before.join_failures + n as u64
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let warm_end = Instant::now() + opts.warmup;
        while Instant::now() < warm_end {
            self.progress(opts, n, before.joined + before.join_failures)
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The measured window.
        s.delay_us.reset();
        let a = snapshot(&s);
        let sa = self.server.sample().await?;
        let ga = process_usage(None).map_or(0.0, |u| u.cpu_seconds);
        let t0 = Instant::now();
        let end = t0 + opts.window;
        let mut last = Instant::now();
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if last.elapsed() >= Duration::from_secs(1) {
                self.progress(opts, n, before.joined + before.join_failures)
                    .await;
                last = Instant::now();
            }
        }
        let b = snapshot(&s);
        let sb = self.server.sample().await?;
        let gb = process_usage(None).map_or(0.0, |u| u.cpu_seconds);
        let dt = t0.elapsed().as_secs_f64();
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let m = self.measure(opts, n, dt, &idle, (&before, &a, &b), (&sa, &sb), gb - ga);
        if !self.quiet {
            eprintln!();
        }
        Ok(m)
    }

    #[allow(clippy::too_many_arguments)]
    fn measure(
        &self,
        opts: &RunOpts,
        n: usize,
        dt: f64,
        idle: &Sample,
        (before, a, b): (&Snap, &Snap, &Snap),
        (sa, sb): (&Sample, &Sample),
        gen_cpu: f64,
    ) -> Measurement {
        let s = &self.ctx.stats;
        let cpu = (sb.cpu_s - sa.cpu_s).max(0.0);
        let sent = (b.sent - a.sent) as f64;
        let recv = (b.recv - a.recv) as f64;
        // Janus counts nothing for us: what it forwarded is what arrived.
        let fwd = if self.server.janus {
            recv
        } else {
            sb.forwarded.saturating_sub(sa.forwarded) as f64
        };
        let expected = (b.expected - a.expected) as f64;
        let late = (b.late - a.late) as f64;
        let ms = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
        let gen_cores = gen_cpu / dt;
        let server_cores = cpu / dt;
        let late_fraction = if sent > 0.0 { late / sent } else { 0.0 };
        let bottleneck = if late_fraction > 0.01 || gen_cores > 0.9 * self.cores as f64 {
            "generator"
        } else if gen_cores + server_cores > 0.9 * self.cores as f64 {
            "machine"
        } else {
            "none"
        };
        let mem = sb.rss_bytes.saturating_sub(idle.rss_bytes) as f64;
        Measurement {
            target: self.target.name().into(),
            scenario: opts.kind.name().into(),
            size: opts.size,
            rooms: opts.rooms,
            participants: n,
            joined: b.joined - before.joined,
            join_failures: b.join_failures - before.join_failures,
            window_s: dt,
            sent_pps: sent / dt,
            received_pps: recv / dt,
            forwarded_pps: fwd / dt,
            server_received_pps: sb.rtp_in.saturating_sub(sa.rtp_in) as f64 / dt,
            avg_payload_bytes: if sent > 0.0 {
                (b.sent_bytes - a.sent_bytes) as f64 / sent
            } else {
                0.0
            },
            server_cpu_cores: server_cores,
            // A generator that could not keep up measured itself, not the
            // server: no figure then (the bottleneck field says why).
            server_us_per_forwarded: (fwd > 0.0 && bottleneck != "generator")
                .then(|| cpu * 1e6 / fwd),
            forwarded_per_cpu_second: (cpu > 0.0 && bottleneck != "generator").then(|| fwd / cpu),
            received_per_cpu_second: (cpu > 0.0 && bottleneck != "generator").then(|| recv / cpu),
            server_rss_mib: sb.rss_bytes as f64 / (1024.0 * 1024.0),
            server_kib_per_participant: (n > 0 && sb.rss_bytes > 0)
                .then(|| mem / 1024.0 / n as f64),
            generator_cpu_cores: gen_cores,
            loss: if expected > 0.0 {
                ((expected - recv) / expected).max(0.0)
            } else {
                0.0
            },
            keyframes_received: b.keyframes - a.keyframes,
            delay_p50_ms: ms(s.delay_us.quantile(0.50)),
            delay_p99_ms: ms(s.delay_us.quantile(0.99)),
            join_p50_ms: ms(s.join_us.quantile(0.50)),
            join_p99_ms: ms(s.join_us.quantile(0.99)),
            join_phases_p50_ms: JoinPhase::NAMES
                .iter()
                .zip(&s.join_phase_us)
                .map(|(n, h)| (n.to_string(), ms(h.quantile(0.50))))
                .collect(),
            send_late_fraction: late_fraction,
            server_send_drops: sb.send_drops.saturating_sub(sa.send_drops),
            tcp_share: {
                let udp = sb.udp_in.saturating_sub(sa.udp_in) as f64;
                let tcp = sb.tcp_in.saturating_sub(sa.tcp_in) as f64;
                if udp + tcp > 0.0 {
                    tcp / (udp + tcp)
                } else {
                    0.0
                }
            },
            bottleneck: bottleneck.into(),
        }
    }

    async fn progress(&self, opts: &RunOpts, n: usize, base: u64) {
        if self.quiet {
            return;
        }
        let s = &self.ctx.stats;
        let sample = self.server.sample().await.unwrap_or_default();
        eprint!(
            "\r[{} {}] joined {}/{} (failed in all {}) | sent {} recv {} pkts | server fwd {} pkts, {:.1} CPU-s, {} MiB | p99 delay {} ms   ",
            opts.kind.name(),
            opts.size,
            (Stats::get(&s.joined) + Stats::get(&s.join_failures)).saturating_sub(base),
            n,
            Stats::get(&s.join_failures),
            Stats::get(&s.sent_packets),
            Stats::get(&s.recv_packets),
            sample.forwarded,
            sample.cpu_s,
            sample.rss_bytes / (1024 * 1024),
            s.delay_us
                .quantile(0.99)
                .map(|v| format!("{:.1}", v as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
        );
    }
}

struct Snap {
    joined: u64,
    join_failures: u64,
    sent: u64,
    sent_bytes: u64,
    recv: u64,
    expected: u64,
    late: u64,
    keyframes: u64,
}

fn snapshot(s: &Stats) -> Snap {
    Snap {
        joined: Stats::get(&s.joined),
        join_failures: Stats::get(&s.join_failures),
        sent: Stats::get(&s.sent_packets),
        sent_bytes: Stats::get(&s.sent_bytes),
        recv: Stats::get(&s.recv_packets),
        expected: Stats::get(&s.recv_expected),
        late: Stats::get(&s.send_late),
        keyframes: Stats::get(&s.recv_keyframes),
    }
}

/// A fresh context for a run.
pub fn context(
    url: String,
    key: String,
    secret: String,
    bind_ip: std::net::IpAddr,
    flavor: client::Flavor,
    transport: client::Transport,
) -> Arc<Ctx> {
    let mut keys = std::collections::HashMap::new();
    keys.insert(key.clone(), secret);
    Arc::new(Ctx {
        url,
        keys: moselle::signaling::token::KeySet::new(keys),
        key,
        bind_ip,
        stats: Arc::new(Stats::default()),
        media_since: AtomicU64::new(0),
        flavor,
        transport,
    })
}
