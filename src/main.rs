//! The `moselle` command: `serve` runs a node, `token` mints a test token.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use moselle::config::{Config, LogFormat, DEV_KEY, DEV_SECRET};
use moselle::signaling::token::{join_claims, KeySet};

#[derive(Parser)]
#[command(
    name = "moselle",
    version,
    about = "A LiveKit-compatible SFU for Matrix calls"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML config file; without it the embedded default is used.
    #[arg(long, short, env = "MOSELLE_CONFIG")]
    config: Option<PathBuf>,
    /// Development mode: adds API key `devkey` with secret `secret`.
    #[arg(long)]
    dev: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Serve {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Address to listen on (HTTP and media).
        #[arg(long)]
        bind: Option<IpAddr>,
        #[arg(long)]
        http_port: Option<u16>,
        #[arg(long)]
        udp_port: Option<u16>,
        /// ICE-TCP port (`[rtc] tcp_port`; 0: any free port).
        #[arg(long)]
        tcp_port: Option<u16>,
        /// No ICE over TCP (`[rtc] ice_tcp = false`).
        #[arg(long)]
        no_ice_tcp: bool,
        /// Downlink bandwidth estimation on (`[rtc] downlink_bwe = true`).
        #[arg(long, conflicts_with = "no_downlink_bwe")]
        downlink_bwe: bool,
        /// No downlink bandwidth estimation (`[rtc] downlink_bwe = false`).
        #[arg(long)]
        no_downlink_bwe: bool,
        /// No UDP GSO: every datagram its own send (`[rtc] udp_gso = false`).
        #[arg(long)]
        no_udp_gso: bool,
        /// Forwarding worker threads (default: `[rtc] workers`, 0 = one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Address to announce in ICE candidates (repeatable).
        #[arg(long = "node-ip")]
        node_ips: Vec<IpAddr>,
        /// Logs as JSON lines.
        #[arg(long)]
        log_json: bool,
    },
    /// Check a config file: print the effective config (the file over the
    /// embedded default, secrets masked) and every problem found; exits
    /// non-zero on any.
    CheckConfig {
        /// The file; without it, the embedded default.
        file: Option<PathBuf>,
        /// Check as `serve --dev` would run it (short secrets allowed).
        #[arg(long)]
        dev: bool,
    },
    /// Mint an access token for testing.
    Token {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[arg(long)]
        room: String,
        #[arg(long)]
        identity: String,
        /// Validity, e.g. 30m, 1h, 90s.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        no_publish: bool,
        #[arg(long)]
        no_subscribe: bool,
        /// API key to sign with (default: the only one, or devkey with --dev).
        #[arg(long)]
        key: Option<String>,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 90s, 30m, 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("bad duration unit in {s:?}: use s, m, h or d")),
    };
    if secs == 0 {
        return Err("ttl must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::embedded()?,
    };
    cfg.load_secrets(|k| std::env::var(k).ok())?;
    if args.dev {
        cfg.dev = true;
        cfg.keys.insert(DEV_KEY.into(), DEV_SECRET.into());
        cfg.call_page.enabled = true;
    }
    Ok(cfg)
}

/// `moselle check-config`: what would run, and what is wrong with it.
fn check_config(file: Option<PathBuf>, dev: bool) -> anyhow::Result<()> {
    let cfg = match load(&ConfigArgs { config: file, dev }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("problem: {e:#}");
            std::process::exit(1);
        }
    };
    print!("{}", cfg.masked_toml()?);
    let problems = cfg.problems();
    for p in &problems {
        eprintln!("problem: {p}");
    }
    if !problems.is_empty() {
        std::process::exit(1);
    }
    eprintln!("config ok");
    Ok(())
}

fn init_logs(cfg: &Config, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},str0m=warn", cfg.log.level)));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(moselle::log_writer::Stdout);
    if json || cfg.log.format == LogFormat::Json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::CheckConfig { file, dev } => check_config(file, dev),
        Cmd::Serve {
            cfg,
            bind,
            http_port,
            udp_port,
            tcp_port,
            no_ice_tcp,
            downlink_bwe,
            no_downlink_bwe,
            no_udp_gso,
            workers,
            node_ips,
            log_json,
        } => {
            let dev = cfg.dev;
            let mut config = load(&cfg)?;
            if let Some(b) = bind {
                config.server.bind = b;
            }
            if let Some(p) = http_port {
                config.server.http_port = p;
            }
            if let Some(p) = udp_port {
                config.server.udp_port = p;
            }
            if let Some(p) = tcp_port {
                config.rtc.tcp_port = p;
            }
            if no_ice_tcp {
                config.rtc.ice_tcp = false;
            }
            if downlink_bwe {
                config.rtc.downlink_bwe = true;
            }
            if no_downlink_bwe {
                config.rtc.downlink_bwe = false;
            }
            if no_udp_gso {
                config.rtc.udp_gso = false;
            }
            if let Some(w) = workers {
                config.rtc.workers = w;
            }
            if !node_ips.is_empty() {
                config.server.node_ips = node_ips;
            }
            init_logs(&config, log_json);
            if dev {
                tracing::warn!("development mode: API key \"{DEV_KEY}\" with secret \"{DEV_SECRET}\" is accepted; never use --dev in production");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                let running = moselle::server::start(&config).await?;
                running.server.await.context("HTTP server task failed")??;
                tracing::info!("moselle stopped");
                Ok(())
            })
        }
        Cmd::Token {
            cfg,
            room,
            identity,
            ttl,
            name,
            no_publish,
            no_subscribe,
            key,
        } => {
            let config = load(&cfg)?;
            let keys = KeySet::new(config.keys.clone());
            let key = match key {
                Some(k) => k,
                None => {
                    let names: Vec<&str> = keys.key_names().collect();
                    match names.as_slice() {
                        [one] => one.to_string(),
                        [] => bail!("no API keys: pass --dev or a --config with a [keys] table"),
                        _ => bail!("several API keys configured: choose one with --key"),
                    }
                }
            };
            let mut claims = join_claims(&room, &identity, ttl);
            claims.name = name.unwrap_or_default();
            if let Some(v) = claims.video.as_mut() {
                if no_publish {
                    v.can_publish = Some(false);
                }
                if no_subscribe {
                    v.can_subscribe = Some(false);
                }
            }
            println!("{}", keys.mint(&key, &claims)?);
            Ok(())
        }
    }
}
