//! The node registry and room placement in Redis.
//!
//! Keys (prefix `moselle:`):
//! - `node:{id}`: hash {jurisdiction, url, capacity, draining}, expiring
//!   unless the node's heartbeat renews it: a node that stops is dropped
//!   within `node_ttl`.
//! - `nodes`: set of node ids ever seen (dead ones are pruned on sight).
//! - `room:{name}`: `{node id}\t{jurisdiction}` of the node holding the
//!   room, set with NX (the first placement wins, concurrent ones agree) and
//!   renewed by the hosting node while the room is open. The jurisdiction
//!   outlives the node: a call whose node died is re-placed only there.
//! - `noderooms:{id}`: rooms placed on a node; its size is the node's load.
//! - `leavejobs:{id}`: delayed-leave delegations handed to the node that
//!   holds their room (a list, expiring if that node never takes them).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::{Cluster, NodeInfo, PlacementError, RoomPlacement};

const PREFIX: &str = "moselle:";

/// First placement wins: set the room's node if unset, and count the room
/// on that node. Returns the room's node either way.
const PLACE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('SADD', KEYS[2], ARGV[3])
return ARGV[1]
"#;

/// Forget a room's placement only if it still names `ARGV[1]`.
const RELEASE_IF: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Renew a room held here; reclaim it if its key expired meanwhile.
const RENEW: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  redis.call('SADD', KEYS[2], ARGV[3])
  return 1
end
return 0
"#;

pub struct RedisRegistry {
    conn: ConnectionManager,
    me: NodeInfo,
    capacity: u32,
    node_ttl: Duration,
    room_ttl: Duration,
}

/// A room key's value for `node`.
fn tag(node: &NodeInfo) -> String {
    format!("{}\t{}", node.id, node.jurisdiction)
}

/// (node id, jurisdiction) of a room key's value.
fn untag(v: &str) -> (&str, &str) {
    v.split_once('\t').unwrap_or((v, ""))
}

/// Where a room was placed: the node's id and jurisdiction, and the node if
/// it still runs.
pub struct Placement {
    pub node_id: String,
    pub jurisdiction: String,
    pub live: Option<NodeInfo>,
}

fn unavailable(e: redis::RedisError) -> PlacementError {
    PlacementError::Unavailable(format!("Redis: {}", e.kind_str()))
}

trait KindStr {
    fn kind_str(&self) -> &'static str;
}

impl KindStr for redis::RedisError {
    fn kind_str(&self) -> &'static str {
        if self.is_timeout() {
            "timed out"
        } else if self.is_connection_refusal() || self.is_connection_dropped() || self.is_io_error()
        {
            "unreachable"
        } else {
            "error"
        }
    }
}

impl RedisRegistry {
    pub async fn connect(
        url: &str,
        me: NodeInfo,
        capacity: u32,
        node_ttl: Duration,
        room_ttl: Duration,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let conn = client.get_connection_manager_with_config(cfg).await?;
        Ok(RedisRegistry {
            conn,
            me,
            capacity,
            node_ttl,
            room_ttl,
        })
    }

    async fn node(&self, id: &str) -> Result<Option<(NodeInfo, u32, bool)>, PlacementError> {
        let mut c = self.conn.clone();
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{PREFIX}node:{id}"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        if h.is_empty() {
            return Ok(None);
        }
        let info = NodeInfo {
            id: id.to_string(),
            jurisdiction: h.get("jurisdiction").cloned().unwrap_or_default(),
            url: h.get("url").cloned().unwrap_or_default(),
        };
        let capacity = h.get("capacity").and_then(|c| c.parse().ok()).unwrap_or(0);
        let draining = h.get("draining").is_some_and(|d| d == "1");
        Ok(Some((info, capacity, draining)))
    }

    async fn load(&self, id: &str) -> Result<u64, PlacementError> {
        let mut c = self.conn.clone();
        redis::cmd("SCARD")
            .arg(format!("{PREFIX}noderooms:{id}"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }

    pub async fn place(&self, room: &str, allowed: &[String]) -> Result<NodeInfo, PlacementError> {
        let room_key = format!("{PREFIX}room:{room}");
        let refuse = || PlacementError::NoEligibleNode(allowed.join(", "));
        for _ in 0..3 {
            let mut c = self.conn.clone();
            let current: Option<String> = redis::cmd("GET")
                .arg(&room_key)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            if let Some(value) = current {
                let (id, _) = untag(&value);
                match self.node(id).await? {
                    Some((info, _, _)) if allowed.contains(&info.jurisdiction) => return Ok(info),
                    // Held in a jurisdiction this request may not use.
                    Some(_) => return Err(refuse()),
                    None => {
                        // Its node stopped heartbeating: place it again.
                        let _: i64 = redis::Script::new(RELEASE_IF)
                            .key(&room_key)
                            .arg(&value)
                            .invoke_async(&mut c)
                            .await
                            .map_err(unavailable)?;
                        continue;
                    }
                }
            }
            // Least-loaded live node in an allowed jurisdiction.
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(format!("{PREFIX}nodes"))
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            let mut best: Option<(u64, NodeInfo)> = None;
            for id in ids {
                let Some((info, capacity, draining)) = self.node(&id).await? else {
                    let _: i64 = redis::cmd("SREM")
                        .arg(format!("{PREFIX}nodes"))
                        .arg(&id)
                        .query_async(&mut c)
                        .await
                        .map_err(unavailable)?;
                    continue;
                };
                if draining || !allowed.contains(&info.jurisdiction) {
                    continue;
                }
                let load = self.load(&id).await?;
                if capacity > 0 && load >= capacity as u64 {
                    continue;
                }
                let better = match &best {
                    None => true,
                    Some((l, b)) => load < *l || (load == *l && info.id < b.id),
                };
                if better {
                    best = Some((load, info));
                }
            }
            let Some((_, chosen)) = best else {
                return Err(refuse());
            };
            let winner: String = redis::Script::new(PLACE)
                .key(&room_key)
                .key(format!("{PREFIX}noderooms:{}", chosen.id))
                .arg(tag(&chosen))
                .arg(self.room_ttl.as_secs().max(1))
                .arg(room)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            if untag(&winner).0 == chosen.id {
                tracing::info!(node = %chosen.id, jurisdiction = %chosen.jurisdiction, "room placed");
                return Ok(chosen);
            }
            // Someone placed it first: loop to read and check their choice.
        }
        Err(PlacementError::Unavailable(
            "placement did not settle".into(),
        ))
    }

    /// Hand a delayed-leave delegation to the node holding its room.
    pub async fn hand_leave_job(&self, node: &str, job: &str) -> Result<(), PlacementError> {
        let key = format!("{PREFIX}leavejobs:{node}");
        let mut c = self.conn.clone();
        redis::pipe()
            .cmd("RPUSH")
            .arg(&key)
            .arg(job)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.node_ttl.as_secs().max(1) * 4)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(unavailable)
    }

    /// Delegations handed to this node since the last call (at most `max`).
    pub async fn take_leave_jobs(&self, max: usize) -> Result<Vec<String>, PlacementError> {
        let mut c = self.conn.clone();
        let jobs: Option<Vec<String>> = redis::cmd("LPOP")
            .arg(format!("{PREFIX}leavejobs:{}", self.me.id))
            .arg(max)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(jobs.unwrap_or_default())
    }

    /// The live node holding `room`, if any.
    pub async fn locate(&self, room: &str) -> Result<Option<NodeInfo>, PlacementError> {
        Ok(self.placement(room).await?.and_then(|p| p.live))
    }

    /// Every node heartbeating now.
    pub async fn live_nodes(&self) -> Result<Vec<NodeInfo>, PlacementError> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{PREFIX}nodes"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((info, _, _)) = self.node(&id).await? {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Where `room` was placed, whether or not its node still runs.
    pub async fn placement(&self, room: &str) -> Result<Option<Placement>, PlacementError> {
        let mut c = self.conn.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("{PREFIX}room:{room}"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let Some(v) = v else { return Ok(None) };
        let (id, jurisdiction) = untag(&v);
        Ok(Some(Placement {
            node_id: id.to_string(),
            jurisdiction: jurisdiction.to_string(),
            live: self.node(id).await?.map(|n| n.0),
        }))
    }

    pub async fn rooms(&self) -> Result<Vec<RoomPlacement>, PlacementError> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        let mut nodes: HashMap<String, Option<NodeInfo>> = HashMap::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{PREFIX}room:*"))
                .arg("COUNT")
                .arg(500)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            for k in keys {
                let id: Option<String> = redis::cmd("GET")
                    .arg(&k)
                    .query_async(&mut c)
                    .await
                    .map_err(unavailable)?;
                let Some(v) = id else { continue };
                let (id, placed_in) = untag(&v);
                if !nodes.contains_key(id) {
                    let info = self.node(id).await?.map(|n| n.0);
                    nodes.insert(id.to_string(), info);
                }
                // The jurisdiction it was placed in, even if its node died.
                let jurisdiction = nodes[id]
                    .as_ref()
                    .map(|n| n.jurisdiction.clone())
                    .unwrap_or_else(|| placed_in.to_string());
                if jurisdiction.is_empty() {
                    // A dead node's room whose value names no jurisdiction
                    // (written before it was kept): unknown, so not listed;
                    // it is placed again at its next join.
                    continue;
                }
                out.push(RoomPlacement {
                    room: k.trim_start_matches(&format!("{PREFIX}room:")).to_string(),
                    node: id.to_string(),
                    jurisdiction,
                });
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(out)
    }

    /// One heartbeat: announce this node, renew its rooms, forget rooms
    /// placed here that never opened or have closed.
    async fn beat(&self, local: &[String], draining: bool) -> Result<(), redis::RedisError> {
        let mut c = self.conn.clone();
        let key = format!("{PREFIX}node:{}", self.me.id);
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(&key)
            .arg("jurisdiction")
            .arg(&self.me.jurisdiction)
            .arg("url")
            .arg(&self.me.url)
            .arg("capacity")
            .arg(self.capacity)
            .arg("draining")
            .arg(if draining { "1" } else { "0" })
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.node_ttl.as_secs().max(1))
            .ignore()
            .cmd("SADD")
            .arg(format!("{PREFIX}nodes"))
            .arg(&self.me.id)
            .ignore()
            .query_async(&mut c)
            .await?;
        let set = format!("{PREFIX}noderooms:{}", self.me.id);
        for room in local {
            let _: i64 = redis::Script::new(RENEW)
                .key(format!("{PREFIX}room:{room}"))
                .key(&set)
                .arg(tag(&self.me))
                .arg(self.room_ttl.as_secs().max(1))
                .arg(room)
                .invoke_async(&mut c)
                .await?;
        }
        let placed: Vec<String> = redis::cmd("SMEMBERS").arg(&set).query_async(&mut c).await?;
        for room in placed {
            if local.contains(&room) {
                continue;
            }
            let holder: Option<String> = redis::cmd("GET")
                .arg(format!("{PREFIX}room:{room}"))
                .query_async(&mut c)
                .await?;
            if holder.as_deref().map(|h| untag(h).0) != Some(self.me.id.as_str()) {
                let _: i64 = redis::cmd("SREM")
                    .arg(&set)
                    .arg(&room)
                    .query_async(&mut c)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Heartbeat until the process ends. Redis being away only delays the
/// next beat; calls in progress do not depend on it.
pub async fn heartbeat(cluster: Arc<Cluster>, every: Duration) {
    let mut was_down = false;
    loop {
        if let Some(r) = &cluster.redis {
            let local: Vec<String> = cluster
                .local_rooms
                .read()
                .map(|d| d.iter().cloned().collect())
                .unwrap_or_default();
            match r
                .beat(&local, cluster.draining.load(Ordering::Relaxed))
                .await
            {
                Ok(()) => {
                    if was_down {
                        tracing::info!("Redis reachable again; placements resume");
                    }
                    was_down = false;
                }
                Err(e) => {
                    if !was_down {
                        tracing::warn!(error = e.kind_str(), "Redis heartbeat failed; running calls go on, new placements are refused");
                    }
                    was_down = true;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
