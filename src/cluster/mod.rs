//! Where rooms may live. Every node declares its jurisdiction; a room is
//! placed only on a node in a jurisdiction the policy allows, or refused:
//! placement is a hard filter that fails closed, never a preference.
//!
//! Alone (no `cluster.redis_url`) a node places rooms on itself if its own
//! jurisdiction is allowed. With Redis, nodes register with heartbeats and
//! the first placement of a room wins atomically (see [`redis`]).

pub mod redis;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use crate::media::engine::Directory;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub jurisdiction: String,
    /// Signaling URL clients use for this node.
    pub url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoomPlacement {
    pub room: String,
    pub node: String,
    pub jurisdiction: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("no node in an allowed jurisdiction ({0}) can host this room")]
    NoEligibleNode(String),
    #[error("room placement is unavailable ({0}); running calls are not affected")]
    Unavailable(String),
}

impl PlacementError {
    pub fn reason(&self) -> &'static str {
        match self {
            PlacementError::NoEligibleNode(_) => "no_eligible_node",
            PlacementError::Unavailable(_) => "unavailable",
        }
    }
}

#[derive(Default)]
pub struct PlacementCounters {
    pub no_eligible_node: AtomicU64,
    pub unavailable: AtomicU64,
    pub wrong_node: AtomicU64,
}

impl PlacementCounters {
    pub fn count(&self, e: &PlacementError) {
        let c = match e {
            PlacementError::NoEligibleNode(_) => &self.no_eligible_node,
            PlacementError::Unavailable(_) => &self.unavailable,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP moselle_placements_refused_total Room placements refused, by reason"
        );
        let _ = writeln!(out, "# TYPE moselle_placements_refused_total counter");
        for (reason, c) in [
            ("no_eligible_node", &self.no_eligible_node),
            ("unavailable", &self.unavailable),
            ("wrong_node", &self.wrong_node),
        ] {
            let _ = writeln!(
                out,
                "moselle_placements_refused_total{{reason=\"{reason}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
    }
}

pub struct Cluster {
    pub me: NodeInfo,
    /// Jurisdictions rooms may be placed in, and per-homeserver overrides.
    pub allowed: Vec<String>,
    pub per_homeserver: HashMap<String, Vec<String>>,
    pub counters: PlacementCounters,
    pub draining: AtomicBool,
    /// Rooms open on this node.
    pub local_rooms: Directory,
    pub redis: Option<redis::RedisRegistry>,
}

impl Cluster {
    /// The jurisdictions allowed for rooms asked for by users of
    /// `homeserver` (or by direct tokens, with `None`).
    pub fn allowed_for(&self, homeserver: Option<&str>) -> &[String] {
        homeserver
            .and_then(|h| self.per_homeserver.get(h))
            .unwrap_or(&self.allowed)
    }

    fn is_local(&self, room: &str) -> bool {
        self.local_rooms
            .read()
            .map(|d| d.contains(room))
            .unwrap_or(false)
    }

    /// The node that holds `room`, placing it if nobody does yet.
    pub async fn place(&self, room: &str, allowed: &[String]) -> Result<NodeInfo, PlacementError> {
        let r = self.place_inner(room, allowed).await;
        if let Err(e) = &r {
            self.counters.count(e);
            tracing::info!(reason = e.reason(), "room placement refused");
        }
        r
    }

    async fn place_inner(
        &self,
        room: &str,
        allowed: &[String],
    ) -> Result<NodeInfo, PlacementError> {
        let refuse = || PlacementError::NoEligibleNode(allowed.join(", "));
        match &self.redis {
            Some(r) => r.place(room, allowed).await,
            None => {
                let here_ok = allowed.contains(&self.me.jurisdiction);
                if !here_ok {
                    return Err(refuse());
                }
                if self.is_local(room) || !self.draining.load(Ordering::Relaxed) {
                    Ok(self.me.clone())
                } else {
                    Err(refuse())
                }
            }
        }
    }

    /// The node holding `room`, if it is held anywhere (placing nothing).
    pub async fn locate(&self, room: &str) -> Result<Option<NodeInfo>, PlacementError> {
        match &self.redis {
            Some(r) => r.locate(room).await,
            None => Ok(self.is_local(room).then(|| self.me.clone())),
        }
    }

    /// The node holding `room`, for a join that may not open rooms itself.
    /// A call whose node died is placed again (a running call goes on on a
    /// survivor), but only in the jurisdiction it was placed in, and only if
    /// policy still allows that jurisdiction.
    pub async fn locate_or_revive(&self, room: &str) -> Result<Option<NodeInfo>, PlacementError> {
        let Some(r) = &self.redis else {
            return self.locate(room).await;
        };
        let Some(p) = r.placement(room).await? else {
            return Ok(None);
        };
        if let Some(live) = p.live {
            return Ok(Some(live));
        }
        let still_allowed = self.allowed.contains(&p.jurisdiction)
            || self
                .per_homeserver
                .values()
                .any(|l| l.contains(&p.jurisdiction));
        if p.jurisdiction.is_empty() || !still_allowed {
            return Ok(None);
        }
        tracing::info!(jurisdiction = %p.jurisdiction, "the node holding a call is gone: placing the call again");
        self.place(room, &[p.jurisdiction]).await.map(Some)
    }

    /// Every room with the node and jurisdiction serving it.
    pub async fn rooms(&self) -> Result<Vec<RoomPlacement>, PlacementError> {
        match &self.redis {
            Some(r) => r.rooms().await,
            None => Ok(self
                .local_rooms
                .read()
                .map(|d| {
                    let mut v: Vec<RoomPlacement> = d
                        .iter()
                        .map(|room| RoomPlacement {
                            room: room.clone(),
                            node: self.me.id.clone(),
                            jurisdiction: self.me.jurisdiction.clone(),
                        })
                        .collect();
                    v.sort_by(|a, b| a.room.cmp(&b.room));
                    v
                })
                .unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, RwLock};

    fn node(j: &str) -> Cluster {
        Cluster {
            me: NodeInfo {
                id: "n1".into(),
                jurisdiction: j.into(),
                url: "ws://n1".into(),
            },
            allowed: vec!["LU".into()],
            per_homeserver: HashMap::from([("de.example".to_string(), vec!["DE".to_string()])]),
            counters: Default::default(),
            draining: AtomicBool::new(false),
            local_rooms: Arc::new(RwLock::new(Default::default())),
            redis: None,
        }
    }

    #[tokio::test]
    async fn a_lone_node_hosts_only_where_the_policy_allows() {
        let lu = node("LU");
        assert_eq!(lu.place("r", lu.allowed_for(None)).await.unwrap().id, "n1");
        let de = node("DE");
        assert_eq!(
            de.place("r", de.allowed_for(None)).await,
            Err(PlacementError::NoEligibleNode("LU".into()))
        );
        assert_eq!(de.allowed_for(Some("de.example")), ["DE".to_string()]);
        assert_eq!(de.counters.no_eligible_node.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_draining_node_takes_no_new_rooms_but_keeps_its_own() {
        let lu = node("LU");
        lu.local_rooms.write().unwrap().insert("old".into());
        lu.draining.store(true, Ordering::Relaxed);
        assert!(lu.place("old", &lu.allowed).await.is_ok());
        assert!(lu.place("new", &lu.allowed).await.is_err());
    }
}
