//! `loadtest`: simulated LiveKit participants on webrtc-rs against a
//! Moselle node (started here, or at a URL), measured the way LiveKit
//! publishes its benchmark, next to a same-run relay baseline.

mod baseline;
mod client;
mod janus;
mod media;
mod report;
mod scenario;
mod server;
mod signal;
mod stats;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use scenario::{Kind, Measurement, RunOpts, Runner, Target};

#[derive(Parser, Debug)]
#[command(name = "loadtest", about = "Load generator and benchmark for Moselle")]
struct Args {
    /// Scenarios to run (default: all three).
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Kind>,
    /// Raise the size step by step until loss passes 1 % or the p99
    /// forwarding delay passes 50 ms; report the largest size that held.
    #[arg(long)]
    ramp: bool,
    /// Sizes to run (participants; listeners for audio). Without --ramp,
    /// the first is used; with it, the ramp's steps.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Rooms of that size run side by side (rooms are spread over the
    /// server's workers; one room stays on one).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Speakers in the audio scenario.
    #[arg(long, default_value_t = 10)]
    speakers: usize,
    /// Seconds of warm-up after everyone joined [default: 3, smoke 1].
    #[arg(long)]
    warmup: Option<f64>,
    /// Seconds measured [default: 10, smoke 2].
    #[arg(long)]
    window: Option<f64>,
    /// Participants started per second.
    #[arg(long, default_value_t = 20.0)]
    join_rate: f64,
    /// Seconds, small sizes: a check that everything flows, not a benchmark.
    #[arg(long)]
    smoke: bool,
    /// Servers to run the scenarios against, one after the other (Janus:
    /// Debian's `janus`, on a non-loopback address; see loadtest/janus.sh).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "moselle")]
    target: Vec<Target>,
    /// The interface Janus gathers ICE candidates on (it ignores loopback).
    #[arg(long, default_value = "mlt0")]
    janus_iface: String,
    /// Target this server (ws:// or http:// base) instead of starting one.
    #[arg(long, requires_all = ["key", "secret"])]
    url: Option<String>,
    #[arg(long, env = "LIVEKIT_API_KEY")]
    key: Option<String>,
    #[arg(long, env = "LIVEKIT_API_SECRET")]
    secret: Option<String>,
    /// Server binary to start (default: `moselle` beside this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// More arguments for the local server's `moselle serve` (repeatable),
    /// e.g. `--server-arg=--no-downlink-bwe`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Forwarding worker counts to run the local server with, each in turn.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    workers: Vec<usize>,
    /// Address the simulated clients (and a local server) use.
    #[arg(long, default_value = "127.0.0.1")]
    ip: IpAddr,
    /// Signaling flavour of the simulated clients.
    #[arg(long, value_enum, default_value = "v1")]
    signal: client::Flavor,
    /// How the simulated clients' media travels: UDP, or ICE over TCP only.
    #[arg(long, value_enum, default_value = "udp")]
    transport: client::Transport,
    /// Skip the same-run relay baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Where report.json, report.svg and the server log go.
    #[arg(long, default_value = "loadtest/out")]
    out: PathBuf,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,webrtc=error,rtc=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()?;
    rt.block_on(run(args, cores))
}

async fn run(args: Args, cores: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let kinds = if args.scenarios.is_empty() {
        vec![Kind::Audio, Kind::Meeting, Kind::Livestream]
    } else {
        args.scenarios.clone()
    };
    let mut report = report::Report::new(cores, &args.out);
    let worker_counts: Vec<Option<usize>> = if args.url.is_some() {
        vec![None]
    } else {
        args.workers.iter().map(|w| Some(*w)).collect()
    };
    for target in &args.target {
        let worker_counts = if *target == Target::Janus {
            vec![None]
        } else {
            worker_counts.clone()
        };
        for workers in worker_counts {
            for kind in &kinds {
                let steps = steps(&args, *kind);
                let server = match (&args.url, target) {
                    (_, Target::Janus) => {
                        server::Server::start_janus(args.ip, &args.janus_iface, &args.out).await?
                    }
                    (Some(url), _) => server::Server::remote(url),
                    (None, _) => {
                        let bin = match &args.server_bin {
                            Some(b) => b.clone(),
                            None => std::env::current_exe()?
                                .parent()
                                .context("no directory for this executable")?
                                .join("moselle"),
                        };
                        server::Server::start_local(
                            &bin,
                            args.ip,
                            workers,
                            &args.server_args,
                            &args.out,
                        )
                        .await?
                    }
                };
                let (key, secret) = match (&args.key, &args.secret, &args.url) {
                    (Some(k), Some(s), _) => (k.clone(), s.clone()),
                    (_, _, None) => ("devkey".to_string(), "secret".to_string()),
                    _ => anyhow::bail!("--url needs --key and --secret"),
                };
                let runner = Runner {
                    target: *target,
                    ctx: scenario::context(
                        server.ws_url.clone(),
                        key,
                        secret,
                        args.ip,
                        args.signal,
                        args.transport,
                    ),
                    server,
                    cores,
                    quiet: args.quiet,
                };
                let mut held: Option<Measurement> = None;
                let mut steps_done = Vec::new();
                for (i, size) in steps.iter().enumerate() {
                    let opts = RunOpts {
                        kind: *kind,
                        size: *size,
                        speakers: if args.smoke {
                            args.speakers.min(2)
                        } else {
                            args.speakers
                        },
                        warmup: Duration::from_secs_f64(args.warmup.unwrap_or(if args.smoke {
                            1.0
                        } else {
                            3.0
                        })),
                        window: Duration::from_secs_f64(args.window.unwrap_or(if args.smoke {
                            2.0
                        } else {
                            10.0
                        })),
                        join_rate: args.join_rate,
                        rooms: args.rooms.max(1),
                    };
                    let room = format!(
                        "{}-{}-{}-{}-w{}",
                        target.name(),
                        kind.name(),
                        size,
                        i,
                        workers.unwrap_or(0)
                    );
                    let m = runner.run(&opts, &room).await?;
                    let ok = m.loss <= 0.01
                        && m.delay_p99_ms.is_some_and(|d| d <= 50.0)
                        && m.join_failures == 0;
                    eprintln!("{}", report::one_line(&m, ok));
                    let generator_bound = m.bottleneck == "generator";
                    steps_done.push(m.clone());
                    if ok && !generator_bound {
                        held = Some(m);
                    } else if args.ramp {
                        break;
                    }
                }
                let base = if args.no_baseline || *target == Target::Janus {
                    None
                } else if let Some(m) = held.as_ref().or(steps_done.last()) {
                    Some(baseline::measure_like(m, args.ip)?)
                } else {
                    None
                };
                report.add(*kind, workers, steps_done, held, base);
            }
        }
    }
    report.finish()?;
    Ok(())
}

/// The sizes a scenario runs at.
fn steps(args: &Args, kind: Kind) -> Vec<usize> {
    if !args.sizes.is_empty() {
        return if args.ramp {
            args.sizes.clone()
        } else {
            args.sizes[..1].to_vec()
        };
    }
    match (args.smoke, args.ramp, kind) {
        (true, true, _) => vec![2, 3],
        (true, false, Kind::Meeting) => vec![3],
        (true, false, _) => vec![3],
        (false, true, Kind::Audio) => vec![25, 50, 100, 150, 200, 300, 400],
        (false, true, Kind::Meeting) => vec![4, 8, 12, 16, 20, 24, 28, 32],
        (false, true, Kind::Livestream) => vec![25, 50, 100, 150, 200, 300, 400],
        (false, false, Kind::Audio) => vec![100],
        (false, false, Kind::Meeting) => vec![8],
        (false, false, Kind::Livestream) => vec![100],
    }
}
