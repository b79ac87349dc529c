//! The engine seen from other threads: start it, and implement the
//! signaling [`Backend`] by sending it commands.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use livekit_protocol as lk;
use moselle_signaling::backend::{
    Backend, JoinFuture, JoinTicket, OutboundTx, Refusal, SessionLink, SignalCounters,
};
use moselle_signaling::token::KeySet;
use tokio::sync::{mpsc, oneshot};

use super::admin::{AdminError, AdminOp, AdminReply};
use super::engine::{self, Command, Directory, EngineConfig};
use crate::cluster::Cluster;
use crate::metrics::MediaCounters;
use crate::transport::{self, tcp::TcpLimits, udp::UdpIo};

pub struct MediaHandle {
    /// One command channel per forwarding worker.
    workers: Vec<mpsc::UnboundedSender<Command>>,
    keys: KeySet,
    auto_create: bool,
    directory: Directory,
    pub cluster: Arc<Cluster>,
    pub signal_counters: Arc<SignalCounters>,
    pub media_counters: Arc<MediaCounters>,
    pub webhook_counters: Option<Arc<crate::webhook::WebhookCounters>>,
    threads: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
    /// Stops the transport's own threads (UDP dispatcher, TCP acceptor).
    transport_stop: Arc<AtomicBool>,
    /// Signaling requests a session may send a second ([limits]).
    signal_rate: u32,
}

impl MediaHandle {
    /// Start the engine on already bound sockets: `workers` forwarding
    /// threads (rooms are spread over them), with the transport's threads
    /// (a UDP dispatcher when there is more than one worker, the ICE-TCP
    /// acceptor when `tcp` is given).
    pub fn start(
        cfg: EngineConfig,
        udp: UdpIo,
        tcp: Option<(std::net::TcpListener, TcpLimits)>,
        workers: usize,
        keys: KeySet,
        directory: Directory,
        cluster: Arc<Cluster>,
    ) -> std::io::Result<Arc<MediaHandle>> {
        let media_counters = Arc::new(MediaCounters::default());
        let auto_create = cfg.auto_create;
        let signal_rate = cfg.limits.signal_requests_per_sec;
        let webhook_counters = cfg.webhooks.as_ref().map(|w| w.counters.clone());
        let started = transport::start(udp, tcp, workers, media_counters.clone())?;
        let mut threads = started.threads;
        let mut senders = Vec::with_capacity(started.workers.len());
        let single = started.workers.len() == 1;
        for (index, io) in started.workers.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            let (c2, d2, cfg) = (media_counters.clone(), directory.clone(), cfg.clone());
            let name = if single {
                "moselle-media".to_string()
            } else {
                format!("moselle-media-{index}")
            };
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || engine::run(cfg, io, rx, c2, d2))?,
            );
            senders.push(tx);
        }
        Ok(Arc::new(MediaHandle {
            workers: senders,
            keys,
            auto_create,
            directory,
            cluster,
            signal_counters: Arc::new(SignalCounters::default()),
            media_counters,
            webhook_counters,
            threads,
            transport_stop: started.stop,
            signal_rate,
        }))
    }

    /// The worker a room lives on: a stable hash of its name.
    fn worker_for(&self, room: &str) -> &mpsc::UnboundedSender<Command> {
        let mut h = std::hash::DefaultHasher::new();
        room.hash(&mut h);
        &self.workers[(h.finish() % self.workers.len() as u64) as usize]
    }

    /// (room name, identity) of every connected participant.
    pub async fn members(&self) -> Vec<(String, String)> {
        let mut all = Vec::new();
        for w in &self.workers {
            let (reply, wait) = oneshot::channel();
            if w.send(Command::Members { reply }).is_ok() {
                all.extend(wait.await.unwrap_or_default());
            }
        }
        all
    }

    /// Remove `identity` from `room`, telling its client why.
    pub fn evict(&self, room: &str, identity: &str, reason: lk::DisconnectReason) {
        let _ = self.worker_for(room).send(Command::Evict {
            room: room.to_string(),
            identity: identity.to_string(),
            reason,
        });
    }

    /// Open `room` on this node ahead of its first join; closed again after
    /// the room's empty timeout if nobody joins. Returns false if the
    /// engine is not running.
    pub async fn open_room(&self, room: &str) -> bool {
        let (reply, wait) = oneshot::channel();
        let sent = self.worker_for(room).send(Command::OpenRoom {
            room: room.to_string(),
            reply,
        });
        sent.is_ok() && wait.await.is_ok()
    }

    /// Carry out a server API call on the worker holding its room; a
    /// room-less call (ListRooms) goes to every worker, merged.
    pub async fn admin(&self, op: AdminOp) -> Result<AdminReply, AdminCallError> {
        let Some(room) = op.room() else {
            let AdminOp::ListRooms(req) = op else {
                return Err(AdminCallError::Unavailable);
            };
            let mut rooms = Vec::new();
            for w in &self.workers {
                let (reply, wait) = oneshot::channel();
                let op = Box::new(AdminOp::ListRooms(req.clone()));
                w.send(Command::Admin { op, reply })
                    .map_err(|_| AdminCallError::Unavailable)?;
                if let Ok(Ok(AdminReply::Rooms(r))) = wait.await {
                    rooms.extend(r);
                }
            }
            rooms.sort_by(|a, b| a.name.cmp(&b.name));
            return Ok(AdminReply::Rooms(rooms));
        };
        let (reply, wait) = oneshot::channel();
        let worker = self.worker_for(room);
        let op = Box::new(op);
        worker
            .send(Command::Admin { op, reply })
            .map_err(|_| AdminCallError::Unavailable)?;
        wait.await
            .map_err(|_| AdminCallError::Unavailable)?
            .map_err(AdminCallError::Refused)
    }

    /// Whether this join may open a room that is not open yet.
    fn may_open(&self, ticket: &JoinTicket) -> bool {
        self.auto_create || ticket.claims.video().room_create
    }

    pub fn room_exists(&self, room: &str) -> bool {
        self.directory
            .read()
            .map(|d| d.contains(room))
            .unwrap_or(false)
    }

    /// Whether every engine thread is still running.
    pub fn is_running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }
}

impl Drop for MediaHandle {
    fn drop(&mut self) {
        self.transport_stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminCallError {
    #[error("the media engine is not running")]
    Unavailable,
    #[error(transparent)]
    Refused(#[from] AdminError),
}

fn room_not_found() -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        "room_not_found",
        "requested room does not exist",
    )
}

/// A signaling session's hold on its participant: messages go through it,
/// and dropping it (the socket ended, or the join was abandoned before the
/// socket came up) tells the engine the session is gone.
pub struct Link {
    commands: mpsc::UnboundedSender<Command>,
    key: usize,
    gen: u64,
}

impl Link {
    pub(super) fn new(commands: mpsc::UnboundedSender<Command>, key: usize, gen: u64) -> Link {
        Link { commands, key, gen }
    }
}

impl SessionLink for Link {
    fn signal(&mut self, msg: lk::signal_request::Message) {
        let _ = self.commands.send(Command::Signal {
            key: self.key,
            gen: self.gen,
            msg: Box::new(msg),
        });
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Closed {
            key: self.key,
            gen: self.gen,
        });
    }
}

impl Backend for MediaHandle {
    fn keys(&self) -> &KeySet {
        &self.keys
    }

    fn counters(&self) -> &SignalCounters {
        &self.signal_counters
    }

    fn signal_rate(&self) -> (u32, u32) {
        (self.signal_rate, self.signal_rate.saturating_mul(2))
    }

    fn precheck(&self, ticket: &JoinTicket) -> Result<(), Refusal> {
        // Alone, a room no join may open is refused before the upgrade;
        // with Redis it may be placed here already, which join() asks.
        if !self.may_open(ticket)
            && self.cluster.redis.is_none()
            && !self.room_exists(&ticket.claims.video().room)
        {
            return Err(room_not_found());
        }
        Ok(())
    }

    fn join(&self, ticket: JoinTicket, out: OutboundTx) -> JoinFuture<'_> {
        Box::pin(async move {
            // A room lives where placement puts it, or nowhere.
            let room = ticket.claims.video().room.clone();
            let mut placed_here = false;
            if !self.room_exists(&room) && !ticket.options.reconnect {
                let c = &self.cluster;
                let found = if self.may_open(&ticket) {
                    c.place(&room, c.allowed_for(None)).await.map(Some)
                } else {
                    // Opened only where it was placed ahead of this join
                    // (or again, if the node that held it died).
                    c.locate_or_revive(&room).await
                };
                match found {
                    Ok(Some(node)) if node.id == c.me.id => placed_here = true,
                    Ok(Some(node)) => {
                        c.counters
                            .wrong_node
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(Refusal::new(
                            StatusCode::CONFLICT,
                            "wrong_node",
                            format!(
                                "this room is hosted on node {} ({}): connect to {}",
                                node.id, node.jurisdiction, node.url
                            ),
                        ));
                    }
                    Ok(None) => return Err(room_not_found()),
                    Err(e) => {
                        return Err(Refusal::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            e.reason(),
                            e.to_string(),
                        ));
                    }
                }
            }
            let (reply, wait) = oneshot::channel();
            let unavailable = || {
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "media_unavailable",
                    "the media engine is not running",
                )
            };
            let worker = self.worker_for(&room);
            worker
                .send(Command::Join {
                    ticket: Box::new(ticket),
                    out,
                    placed_here,
                    commands: worker.clone(),
                    reply,
                })
                .map_err(|_| unavailable())?;
            // Cancel-safe: if this future is dropped while waiting (the
            // client closed its connection), the engine's link is dropped
            // with the reply and the participant it made is removed.
            let link = wait.await.map_err(|_| unavailable())??;
            Ok(Box::new(link) as Box<dyn SessionLink>)
        })
    }
}
