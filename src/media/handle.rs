//! The engine seen from other threads: start it, and implement the
//! signaling [`Backend`] by sending it commands.

use std::sync::Arc;

use axum::http::StatusCode;
use livekit_protocol as lk;
use moselle_signaling::backend::{
    Backend, JoinFuture, JoinTicket, OutboundTx, Refusal, SessionLink, SignalCounters,
};
use moselle_signaling::token::KeySet;
use tokio::sync::{mpsc, oneshot};

use super::engine::{self, Command, Directory, EngineConfig};
use super::udp::UdpIo;
use crate::cluster::Cluster;
use crate::metrics::MediaCounters;

pub struct MediaHandle {
    commands: mpsc::UnboundedSender<Command>,
    keys: KeySet,
    auto_create: bool,
    directory: Directory,
    pub cluster: Arc<Cluster>,
    pub signal_counters: Arc<SignalCounters>,
    pub media_counters: Arc<MediaCounters>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl MediaHandle {
    /// Start the engine thread on an already bound socket.
    pub fn start(
        cfg: EngineConfig,
        udp: UdpIo,
        keys: KeySet,
        directory: Directory,
        cluster: Arc<Cluster>,
    ) -> std::io::Result<Arc<MediaHandle>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let media_counters = Arc::new(MediaCounters::default());
        let auto_create = cfg.auto_create;
        let (c2, d2) = (media_counters.clone(), directory.clone());
        let thread = std::thread::Builder::new()
            .name("moselle-media".into())
            .spawn(move || engine::run(cfg, udp, rx, c2, d2))?;
        Ok(Arc::new(MediaHandle {
            commands: tx,
            keys,
            auto_create,
            directory,
            cluster,
            signal_counters: Arc::new(SignalCounters::default()),
            media_counters,
            thread: Some(thread),
        }))
    }

    /// (room name, identity) of every connected participant.
    pub async fn members(&self) -> Vec<(String, String)> {
        let (reply, wait) = oneshot::channel();
        if self.commands.send(Command::Members { reply }).is_err() {
            return Vec::new();
        }
        wait.await.unwrap_or_default()
    }

    /// Remove `identity` from `room`, telling its client why.
    pub fn evict(&self, room: &str, identity: &str, reason: lk::DisconnectReason) {
        let _ = self.commands.send(Command::Evict {
            room: room.to_string(),
            identity: identity.to_string(),
            reason,
        });
    }

    pub fn room_exists(&self, room: &str) -> bool {
        self.directory
            .read()
            .map(|d| d.contains(room))
            .unwrap_or(false)
    }

    /// Whether the engine thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

struct Link {
    commands: mpsc::UnboundedSender<Command>,
    key: usize,
    gen: u64,
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

    fn precheck(&self, ticket: &JoinTicket) -> Result<(), Refusal> {
        if !self.auto_create && !ticket.claims.video().room_create {
            let exists = self
                .directory
                .read()
                .map(|d| d.contains(&ticket.claims.video().room))
                .unwrap_or(false);
            if !exists {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    "room_not_found",
                    "requested room does not exist",
                ));
            }
        }
        Ok(())
    }

    fn join(&self, ticket: JoinTicket, out: OutboundTx) -> JoinFuture<'_> {
        Box::pin(async move {
            // A room lives where placement puts it, or nowhere.
            let room = ticket.claims.video().room.clone();
            if !self.room_exists(&room) && !ticket.options.reconnect {
                let c = &self.cluster;
                match c.place(&room, c.allowed_for(None)).await {
                    Ok(node) if node.id == c.me.id => {}
                    Ok(node) => {
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
            self.commands
                .send(Command::Join {
                    ticket: Box::new(ticket),
                    out,
                    reply,
                })
                .map_err(|_| unavailable())?;
            let (key, gen) = wait.await.map_err(|_| unavailable())??;
            Ok(Box::new(Link {
                commands: self.commands.clone(),
                key,
                gen,
            }) as Box<dyn SessionLink>)
        })
    }
}
