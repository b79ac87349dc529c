//! Leaving ends access: participants admitted by the token service are
//! checked against the Matrix room again and again, and removed from the
//! call once they have left, been kicked or banned.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livekit_protocol as lk;

use super::service::TokenService;

struct Grantee {
    room_id: String,
    user_id: String,
    /// Until when an unused token could still be used to join.
    valid_until: Instant,
}

/// (SFU room, identity) -> whom the token was issued to.
#[derive(Default)]
pub struct Issued {
    map: Mutex<HashMap<(String, String), Grantee>>,
}

impl Issued {
    pub fn record(
        &self,
        sfu_room: &str,
        identity: &str,
        room_id: &str,
        user_id: &str,
        ttl: Duration,
    ) {
        if let Ok(mut m) = self.map.lock() {
            m.insert(
                (sfu_room.to_string(), identity.to_string()),
                Grantee {
                    room_id: room_id.to_string(),
                    user_id: user_id.to_string(),
                    valid_until: Instant::now() + ttl,
                },
            );
        }
    }

    fn lookup(&self, key: &(String, String)) -> Option<(String, String)> {
        let m = self.map.lock().ok()?;
        m.get(key).map(|g| (g.room_id.clone(), g.user_id.clone()))
    }

    /// Forget grants whose token expired and whose holder is not in a call.
    fn prune(&self, connected: &[(String, String)]) {
        let now = Instant::now();
        if let Ok(mut m) = self.map.lock() {
            m.retain(|k, g| g.valid_until > now || connected.contains(k));
        }
    }
}

/// Re-check every connected participant the service admitted.
pub async fn run(svc: Arc<TokenService>) {
    let every = Duration::from_secs(svc.cfg.membership_recheck_secs.max(1));
    loop {
        tokio::time::sleep(every).await;
        let connected = svc.media.members().await;
        for key in &connected {
            let Some((room_id, user_id)) = svc.issued.lookup(key) else {
                continue;
            };
            match svc.membership.is_joined(&room_id, &user_id).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!("participant removed: Matrix room membership ended");
                    svc.counters.evicted.fetch_add(1, Ordering::Relaxed);
                    svc.media
                        .evict(&key.0, &key.1, lk::DisconnectReason::ParticipantRemoved);
                }
                // An unreachable homeserver does not cut running calls.
                Err(_) => {}
            }
        }
        svc.issued.prune(&connected);
    }
}
