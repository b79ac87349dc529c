//! Start a node from a config: bind the sockets, start the media engine,
//! serve HTTP until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moselle_signaling::token::KeySet;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::cluster::redis::RedisRegistry;
use crate::cluster::{Cluster, NodeInfo};
use crate::config::Config;
use crate::matrix::homeserver::{Homeservers, Membership};
use crate::matrix::limits::RateLimiter;
use crate::matrix::service::TokenService;
use crate::media::engine::Directory;
use crate::media::engine::EngineConfig;
use crate::media::handle::MediaHandle;
use crate::netinfo;
use crate::transport::udp::UdpIo;

pub struct Running {
    pub http_addr: SocketAddr,
    pub udp_port: u16,
    /// The ICE-TCP port, if on.
    pub tcp_port: Option<u16>,
    pub media: Arc<MediaHandle>,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub async fn start(cfg: &Config) -> anyhow::Result<Running> {
    cfg.validate()?;
    let mut udp = UdpIo::bind(cfg.server.bind, cfg.server.udp_port).with_context(|| {
        format!(
            "cannot bind the media UDP port {}:{}",
            cfg.server.bind, cfg.server.udp_port
        )
    })?;
    udp.set_gso(cfg.rtc.udp_gso);
    if cfg.rtc.udp_gso && !udp.gso() {
        tracing::info!("this kernel has no UDP GSO: datagrams are sent one by one");
    }
    let udp_port = udp.local_port();
    let turn = crate::transport::turn::load(&cfg.turn, &cfg.cluster.allowed_jurisdictions)?;
    // Hand out only relays in this node's own jurisdiction: a room here may
    // be restricted to it.
    let (turn, elsewhere): (Vec<_>, Vec<_>) = turn
        .into_iter()
        .partition(|t| t.jurisdiction == cfg.server.jurisdiction);
    for t in &elsewhere {
        tracing::warn!(urls = ?t.urls, jurisdiction = %t.jurisdiction, "TURN server not in this node's jurisdiction: not handed out by this node");
    }
    let tcp = if cfg.rtc.ice_tcp {
        let fds = raise_fd_limit();
        if (fds as usize) < cfg.rtc.tcp_max_connections + 256 {
            tracing::warn!(
                open_files = fds,
                tcp_max_connections = cfg.rtc.tcp_max_connections,
                "the open-file limit is too low for rtc.tcp_max_connections: raise it (LimitNOFILE)"
            );
        }
        let l = std::net::TcpListener::bind((cfg.server.bind, cfg.rtc.tcp_port)).with_context(
            || {
                format!(
                    "cannot bind the ICE-TCP port {}:{} (rtc.tcp_port; rtc.ice_tcp = false turns it off)",
                    cfg.server.bind, cfg.rtc.tcp_port
                )
            },
        )?;
        Some(l)
    } else {
        None
    };
    let tcp_port = tcp
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?
        .map(|a| a.port());
    let ips = netinfo::announce_ips(&cfg.server.node_ips, cfg.server.bind);
    let engine_cfg = EngineConfig {
        node_id: cfg.server.node_id.clone(),
        jurisdiction: cfg.server.jurisdiction.clone(),
        candidates: ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, udp_port))
            .collect(),
        tcp_candidates: tcp_port
            .map(|port| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
            .unwrap_or_default(),
        auto_create: cfg.room.auto_create,
        empty_timeout_secs: cfg.room.empty_timeout_secs,
        departure_timeout_secs: cfg.room.departure_timeout_secs,
        max_participants: cfg.room.max_participants,
        pli_throttle: Duration::from_millis(cfg.rtc.pli_throttle_ms),
        resume_window: Duration::from_secs(cfg.room.resume_window_secs),
        turn: Arc::new(turn),
        fallback_memory: Duration::from_secs(cfg.rtc.fallback_memory_secs),
        bwe_initial: cfg
            .rtc
            .downlink_bwe
            .then(|| str0m::bwe::Bitrate::kbps(cfg.rtc.bwe_initial_kbps.max(30))),
        webhooks: crate::webhook::start(&cfg.webhook, &KeySet::new(cfg.keys.clone()))?,
        limits: cfg.limits.clone(),
    };
    let listener = tokio::net::TcpListener::bind((cfg.server.bind, cfg.server.http_port))
        .await
        .with_context(|| {
            format!(
                "cannot bind HTTP port {}:{}",
                cfg.server.bind, cfg.server.http_port
            )
        })?;
    let http_addr = listener.local_addr()?;
    let tls = match cfg.server.tls_files() {
        Some(files) => {
            let slot: crate::tls::Slot =
                Arc::new(std::sync::RwLock::new(crate::tls::load(&files)?));
            crate::tls::reload_on_sighup(files, slot.clone())
                .context("cannot watch for SIGHUP (TLS reload)")?;
            Some(slot)
        }
        None => {
            crate::tls::ignore_sighup().context("cannot watch for SIGHUP")?;
            None
        }
    };
    let me = NodeInfo {
        id: cfg.server.node_id.clone(),
        jurisdiction: cfg.server.jurisdiction.clone(),
        url: if cfg.server.public_url.is_empty() {
            let ip = ips.first().copied().unwrap_or(http_addr.ip());
            let scheme = if tls.is_some() { "wss" } else { "ws" };
            format!("{scheme}://{}", SocketAddr::new(ip, http_addr.port()))
        } else {
            cfg.server.public_url.clone()
        },
    };
    let local_rooms: Directory = Arc::new(std::sync::RwLock::new(Default::default()));
    let c = &cfg.cluster;
    let redis = if c.redis_url.is_empty() {
        None
    } else {
        let r = RedisRegistry::connect(
            &c.redis_url,
            me.clone(),
            cfg.server.capacity,
            Duration::from_secs(c.node_ttl_secs),
            Duration::from_secs(c.room_ttl_secs.max(1)),
        )
        .await
        .context("cannot reach Redis at cluster.redis_url")?;
        Some(r)
    };
    let clustered = redis.is_some();
    let cluster = Arc::new(Cluster {
        me,
        allowed: c.allowed_jurisdictions.clone(),
        per_homeserver: c.homeserver_jurisdictions.clone(),
        counters: Default::default(),
        draining: AtomicBool::new(false),
        local_rooms: local_rooms.clone(),
        redis,
    });
    if !cluster.allowed.contains(&cluster.me.jurisdiction) {
        tracing::warn!(
            jurisdiction = %cluster.me.jurisdiction,
            "this node's jurisdiction is not in cluster.allowed_jurisdictions: it will host no room"
        );
    }
    if clustered {
        tokio::spawn(crate::cluster::redis::heartbeat(
            cluster.clone(),
            Duration::from_secs(c.heartbeat_secs.max(1)),
        ));
    }
    let workers = cfg.rtc.worker_count();
    let media = MediaHandle::start(
        engine_cfg,
        udp,
        tcp.map(|l| (l, cfg.rtc.tcp_limits())),
        workers,
        KeySet::new(cfg.keys.clone()),
        local_rooms,
        cluster.clone(),
    )
    .context("cannot start the media engine")?;
    // Addresses only at debug: info-level logs carry no IP address.
    tracing::debug!(http = %http_addr, candidates = ?ips, "bound");
    tracing::info!(
        http_port = http_addr.port(),
        udp_port,
        tcp_port = tcp_port.unwrap_or(0),
        candidates = ips.len(),
        workers,
        node = %cfg.server.node_id,
        jurisdiction = %cfg.server.jurisdiction,
        "moselle listening"
    );
    let key = signing_key(cfg);
    let call_page = if cfg.call_page.enabled {
        tracing::warn!("call page enabled at /call/: anyone who reaches it can join any room");
        Some(crate::callpage::CallPage {
            keys: KeySet::new(cfg.keys.clone()),
            key: key.clone(),
            assets_dir: cfg.call_page.assets_dir.clone(),
            token_ttl: Duration::from_secs(cfg.call_page.token_ttl_secs.max(60)),
            tls: !cfg.server.tls_cert_file.is_empty(),
        })
    } else {
        None
    };
    let tokens = if cfg.matrix.enabled {
        let m = &cfg.matrix;
        let timeout = Duration::from_millis(m.request_timeout_ms.max(100));
        let homeservers = Homeservers::new(timeout, m.homeserver_urls.clone())
            .context("cannot set up the HTTP client for homeservers")?;
        let membership = Membership {
            http: homeservers.http().clone(),
            method: m.membership.method,
            base_url: m
                .membership
                .homeserver_url
                .trim_end_matches('/')
                .to_string(),
            access_token: m.membership.access_token.clone(),
        };
        let svc = Arc::new(TokenService {
            cfg: m.clone(),
            keys: KeySet::new(cfg.keys.clone()),
            key: key.clone(),
            homeservers,
            membership,
            media: media.clone(),
            per_address: RateLimiter::new(
                m.requests_per_minute_per_address,
                m.requests_per_minute_per_address,
            ),
            per_user: RateLimiter::new(
                m.requests_per_minute_per_user,
                m.requests_per_minute_per_user,
            ),
            issued: Default::default(),
            counters: Default::default(),
            delegations: Default::default(),
        });
        tokio::spawn(crate::matrix::watch::run(svc.clone()));
        tokio::spawn(crate::matrix::delegation::run(svc.clone()));
        tracing::info!(
            "MatrixRTC token service at /get_token, /sfu/get and /delegate_delayed_leave"
        );
        Some(svc)
    } else {
        None
    };
    let app = crate::http::app(media.clone(), call_page, tokens);
    let drain_timeout = Duration::from_secs(cfg.cluster.drain_timeout_secs);
    let drain_media = media.clone();
    let stop = async move {
        shutdown_signal().await;
        drain(&drain_media, drain_timeout).await;
    };
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    use axum::serve::ListenerExt;
    let server = match tls {
        // Signaling is small messages each way: without TCP_NODELAY an answer
        // waited on the client's delayed ACK of the last one (~85 ms a join).
        None => {
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(async move {
                axum::serve(listener, make)
                    .with_graceful_shutdown(stop)
                    .await
            })
        }
        Some(slot) => {
            // `tap_io` only so axum hands handlers the peer address.
            let tls = crate::tls::TlsListener::new(listener, slot)?.tap_io(|_| {});
            tokio::spawn(async move { axum::serve(tls, make).with_graceful_shutdown(stop).await })
        }
    };
    Ok(Running {
        http_addr,
        udp_port,
        tcp_port,
        media,
        server,
    })
}

/// Raise the soft open-file limit to the hard one (each ICE-TCP connection
/// is a descriptor); returns the limit now in force.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct we own.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur < l.rlim_max {
            let want = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        l.rlim_cur
    }
}

/// The API key this node signs its own tokens with: the dev key if there is
/// one, else the first by name.
fn signing_key(cfg: &Config) -> String {
    if cfg.keys.contains_key(crate::config::DEV_KEY) {
        return crate::config::DEV_KEY.to_string();
    }
    let mut names: Vec<&String> = cfg.keys.keys().collect();
    names.sort();
    names.first().map(|s| s.to_string()).unwrap_or_default()
}

/// Take no new rooms; let running calls end, up to `timeout`.
async fn drain(media: &MediaHandle, timeout: Duration) {
    media.cluster.draining.store(true, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = media.members().await.len();
        if n == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(
                participants = n,
                "drain timeout: stopping with calls still running"
            );
            break;
        }
        tracing::info!(
            participants = n,
            "draining: no new rooms, waiting for calls to end"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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
