//! Start a node from a config: bind the sockets, start the media engine,
//! serve HTTP until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moselle_signaling::token::KeySet;

use crate::config::Config;
use crate::media::engine::EngineConfig;
use crate::media::handle::MediaHandle;
use crate::media::udp::UdpIo;
use crate::netinfo;

pub struct Running {
    pub http_addr: SocketAddr,
    pub udp_port: u16,
    pub media: Arc<MediaHandle>,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub async fn start(cfg: &Config) -> anyhow::Result<Running> {
    cfg.validate()?;
    let udp = UdpIo::bind(cfg.server.bind, cfg.server.udp_port).with_context(|| {
        format!(
            "cannot bind the media UDP port {}:{}",
            cfg.server.bind, cfg.server.udp_port
        )
    })?;
    let udp_port = udp.local_port();
    let ips = netinfo::announce_ips(&cfg.server.node_ips, cfg.server.bind);
    let engine_cfg = EngineConfig {
        node_id: cfg.server.node_id.clone(),
        jurisdiction: cfg.server.jurisdiction.clone(),
        candidates: ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, udp_port))
            .collect(),
        auto_create: cfg.room.auto_create,
        empty_timeout_secs: cfg.room.empty_timeout_secs,
        departure_timeout_secs: cfg.room.departure_timeout_secs,
        max_participants: cfg.room.max_participants,
        pli_throttle: Duration::from_millis(cfg.rtc.pli_throttle_ms),
        resume_window: Duration::from_secs(cfg.room.resume_window_secs),
    };
    let media = MediaHandle::start(engine_cfg, udp, KeySet::new(cfg.keys.clone()))
        .context("cannot start the media engine")?;
    let listener = tokio::net::TcpListener::bind((cfg.server.bind, cfg.server.http_port))
        .await
        .with_context(|| {
            format!(
                "cannot bind HTTP port {}:{}",
                cfg.server.bind, cfg.server.http_port
            )
        })?;
    let http_addr = listener.local_addr()?;
    // Addresses only at debug: info-level logs carry no IP address.
    tracing::debug!(http = %http_addr, candidates = ?ips, "bound");
    tracing::info!(
        http_port = http_addr.port(),
        udp_port,
        candidates = ips.len(),
        node = %cfg.server.node_id,
        jurisdiction = %cfg.server.jurisdiction,
        "moselle listening"
    );
    let call_page = if cfg.call_page.enabled {
        // The dev key if there is one, else the first key by name.
        let mut names: Vec<&String> = cfg.keys.keys().collect();
        names.sort();
        let key = cfg
            .keys
            .get_key_value(crate::config::DEV_KEY)
            .map(|(k, _)| k)
            .or(names.first().copied())
            .cloned()
            .unwrap_or_default();
        tracing::warn!("call page enabled at /call/: anyone who reaches it can join any room");
        Some(crate::callpage::CallPage {
            keys: KeySet::new(cfg.keys.clone()),
            key,
            assets_dir: cfg.call_page.assets_dir.clone(),
            token_ttl: Duration::from_secs(cfg.call_page.token_ttl_secs.max(60)),
        })
    } else {
        None
    };
    let app = crate::http::app(media.clone(), call_page);
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
    });
    Ok(Running {
        http_addr,
        udp_port,
        media,
        server,
    })
}

/// SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
