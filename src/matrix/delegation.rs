//! Delayed-leave delegation (MSC4140 delayed events, as lk-jwt-service
//! does it). A client hands us the id of its delayed "leave" state event.
//! While its participant is on this node we keep restarting the event so it
//! never fires; once the participant is gone (crash, lost network, killed
//! browser: the SFU dropped it) we fire it, so the others see the member
//! leave without waiting out the client's long delay.
//!
//! The delayed-event endpoints take no access token: the delay id is the
//! secret. It is never logged.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::service::TokenService;

/// How often participants are looked for and actions taken.
const TICK: Duration = Duration::from_secs(1);
/// A restart is made this long before the event would fire, at least (a
/// tick, a slow homeserver and a retry must fit in it).
const RESTART_MARGIN: Duration = Duration::from_secs(3);
/// A participant that never shows up is given up on after at most this.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Delegations held by one node; more are refused.
pub const MAX_JOBS: usize = 100_000;
/// Delay timeouts accepted (milliseconds).
pub const MIN_TIMEOUT_MS: i64 = 5_000;
pub const MAX_TIMEOUT_MS: i64 = 7 * 24 * 3600 * 1000;

const DELAYED_EVENTS: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";

/// One delegation, as handed between nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaveJob {
    /// SFU room and LiveKit identity of the participant.
    pub room: String,
    pub identity: String,
    /// The user's homeserver (where the delayed event lives).
    pub server_name: String,
    pub delay_id: String,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Restart,
    Send,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Restart => "restart",
            Action::Send => "send",
        }
    }
}

/// What the homeserver answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// 404: the event was already sent or cancelled.
    Gone,
    /// Unreachable, 5xx, 429: try again.
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Token issued, participant not seen yet.
    Waiting { until: Instant },
    /// On the SFU; the event is restarted before `deadline`.
    Connected {
        restart_at: Instant,
        deadline: Instant,
    },
    /// Gone: fire the event (retried until `deadline`, when the homeserver
    /// fires it anyway).
    Leaving { deadline: Instant },
}

struct Entry {
    job: LeaveJob,
    phase: Phase,
    busy: bool,
    retry_at: Instant,
    failures: u32,
}

#[derive(Default)]
pub struct DelegationCounters {
    pub accepted: AtomicU64,
    pub restarts: AtomicU64,
    pub leaves_sent: AtomicU64,
    pub ended_by_client: AtomicU64,
    pub failures: AtomicU64,
    pub refused: AtomicU64,
}

#[derive(Default)]
pub struct Delegations {
    jobs: Mutex<HashMap<(String, String), Entry>>,
    pub counters: DelegationCounters,
}

/// An action due: the job's key, its delay id (to match the answer to the
/// job it was for), and where to send it.
pub struct Due {
    key: (String, String),
    delay_id: String,
    server_name: String,
    action: Action,
}

impl Delegations {
    /// Take over `job`, replacing any earlier delegation of the same
    /// participant. False when the node holds too many.
    pub fn add(&self, job: LeaveJob, now: Instant) -> bool {
        let Ok(mut m) = self.jobs.lock() else {
            return false;
        };
        let key = (job.room.clone(), job.identity.clone());
        if m.len() >= MAX_JOBS && !m.contains_key(&key) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let wait = Duration::from_millis(job.timeout_ms).min(MAX_WAIT);
        m.insert(
            key,
            Entry {
                job,
                phase: Phase::Waiting { until: now + wait },
                busy: false,
                retry_at: now,
                failures: 0,
            },
        );
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn len(&self) -> usize {
        self.jobs.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Advance every job given who is on the SFU now; returns the actions due.
    pub fn step(&self, now: Instant, present: &HashSet<(String, String)>) -> Vec<Due> {
        let Ok(mut m) = self.jobs.lock() else {
            return Vec::new();
        };
        let mut due = Vec::new();
        for (key, e) in m.iter_mut() {
            if e.busy || e.retry_at > now {
                continue;
            }
            let here = present.contains(key);
            let action = match e.phase {
                Phase::Waiting { until } => {
                    if here {
                        // Restarting at once fixes the deadline we keep.
                        Some(Action::Restart)
                    } else if now >= until {
                        e.phase = Phase::Leaving {
                            deadline: now + Duration::from_millis(e.job.timeout_ms),
                        };
                        Some(Action::Send)
                    } else {
                        None
                    }
                }
                Phase::Connected {
                    restart_at,
                    deadline,
                } => {
                    if !here {
                        e.phase = Phase::Leaving { deadline };
                        Some(Action::Send)
                    } else if now >= restart_at {
                        Some(Action::Restart)
                    } else {
                        None
                    }
                }
                Phase::Leaving { .. } => Some(Action::Send),
            };
            if let Some(action) = action {
                e.busy = true;
                due.push(Due {
                    key: key.clone(),
                    delay_id: e.job.delay_id.clone(),
                    server_name: e.job.server_name.clone(),
                    action,
                });
            }
        }
        due
    }

    /// Record the homeserver's answer to `due`.
    pub fn done(&self, due: &Due, outcome: Outcome, now: Instant) {
        let Ok(mut m) = self.jobs.lock() else {
            return;
        };
        let Some(e) = m.get_mut(&due.key) else {
            return;
        };
        if e.job.delay_id != due.delay_id {
            // Replaced meanwhile: the answer is about the old one.
            return;
        }
        e.busy = false;
        let c = &self.counters;
        let timeout = Duration::from_millis(e.job.timeout_ms);
        let remove = match (due.action, outcome) {
            (Action::Restart, Outcome::Done) => {
                c.restarts.fetch_add(1, Ordering::Relaxed);
                e.failures = 0;
                // As lk-jwt-service, at 80 % of the delay (short delays:
                // a fixed margin before it fires).
                let margin = (timeout / 5).max(RESTART_MARGIN);
                e.phase = Phase::Connected {
                    restart_at: now + timeout.saturating_sub(margin),
                    deadline: now + timeout,
                };
                false
            }
            (Action::Send, Outcome::Done) => {
                c.leaves_sent.fetch_add(1, Ordering::Relaxed);
                tracing::info!("delegated leave sent: the participant left the call");
                true
            }
            (_, Outcome::Gone) => {
                // The client left on its own, or replaced the event.
                c.ended_by_client.fetch_add(1, Ordering::Relaxed);
                true
            }
            (_, Outcome::Retry) => {
                c.failures.fetch_add(1, Ordering::Relaxed);
                e.failures += 1;
                let backoff = Duration::from_secs(1 << e.failures.min(6));
                e.retry_at = now + backoff;
                let deadline = match e.phase {
                    Phase::Waiting { until } => until + timeout,
                    Phase::Connected { deadline, .. } | Phase::Leaving { deadline } => deadline,
                };
                // Past it, the homeserver has fired the event itself.
                now >= deadline
            }
        };
        if remove {
            m.remove(&due.key);
        }
    }
}

/// Ask the homeserver to restart or send a delayed event.
async fn execute(svc: &TokenService, due: &Due) -> Outcome {
    let Ok(base) = svc.homeservers.client_url(&due.server_name).await else {
        return Outcome::Retry;
    };
    let id = super::homeserver::encode_segment(&due.delay_id);
    let url = format!("{base}{DELAYED_EVENTS}/{id}/{}", due.action.path());
    let resp = svc
        .homeservers
        .http()
        .post(url)
        .json(&serde_json::json!({}))
        .send()
        .await;
    match resp.map(|r| r.status().as_u16()) {
        Ok(200..=299) => Outcome::Done,
        Ok(404) => Outcome::Gone,
        Ok(status) => {
            tracing::warn!(
                status,
                action = due.action.path(),
                "homeserver refused a delayed-event action"
            );
            Outcome::Retry
        }
        Err(_) => Outcome::Retry,
    }
}

/// Run this node's delegations until the process ends.
pub async fn run(svc: Arc<TokenService>) {
    loop {
        tokio::time::sleep(TICK).await;
        if let Some(r) = &svc.media.cluster.redis {
            if let Ok(handed) = r.take_leave_jobs(1000).await {
                for text in handed {
                    match serde_json::from_str::<LeaveJob>(&text) {
                        Ok(job) => {
                            svc.delegations.add(job, Instant::now());
                        }
                        Err(_) => tracing::warn!("ignored a malformed delegation from Redis"),
                    }
                }
            }
        }
        if svc.delegations.is_empty() {
            continue;
        }
        let present: HashSet<(String, String)> = svc.media.members().await.into_iter().collect();
        let due = svc.delegations.step(Instant::now(), &present);
        let outcomes = futures_util::future::join_all(due.iter().map(|d| execute(&svc, d))).await;
        let now = Instant::now();
        for (d, o) in due.iter().zip(outcomes) {
            svc.delegations.done(d, o, now);
        }
    }
}

impl DelegationCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "matrix_delegations_accepted_total",
                "Delayed leave events delegated to this node",
                g(&self.accepted),
            ),
            (
                "matrix_delegation_restarts_total",
                "Delayed leave events restarted while their participant was connected",
                g(&self.restarts),
            ),
            (
                "matrix_delegated_leaves_sent_total",
                "Delayed leave events fired because their participant was gone",
                g(&self.leaves_sent),
            ),
            (
                "matrix_delegations_ended_by_client_total",
                "Delegations that ended because the client sent or cancelled its event",
                g(&self.ended_by_client),
            ),
            (
                "matrix_delegation_failures_total",
                "Delayed-event actions that failed and were retried",
                g(&self.failures),
            ),
            (
                "matrix_delegations_refused_total",
                "Delegations refused because the node holds too many",
                g(&self.refused),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> LeaveJob {
        LeaveJob {
            room: "r".into(),
            identity: "@a:hs:DEV".into(),
            server_name: "hs".into(),
            delay_id: id.into(),
            timeout_ms: 10_000,
        }
    }

    fn key() -> (String, String) {
        ("r".into(), "@a:hs:DEV".into())
    }

    #[test]
    fn restarts_while_connected_and_sends_once_gone() {
        let d = Delegations::default();
        let t0 = Instant::now();
        assert!(d.add(job("d1"), t0));
        let mut present = HashSet::new();
        assert!(d.step(t0, &present).is_empty(), "not yet seen, not yet due");
        present.insert(key());
        let due = d.step(t0, &present);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].action, Action::Restart);
        assert!(d.step(t0, &present).is_empty(), "one action at a time");
        d.done(&due[0], Outcome::Done, t0);
        // Next restart 3 s (the margin; 20 % would be 2 s) before it fires.
        assert!(d.step(t0 + Duration::from_secs(6), &present).is_empty());
        let due = d.step(t0 + Duration::from_secs(7), &present);
        assert_eq!(due[0].action, Action::Restart);
        d.done(&due[0], Outcome::Done, t0 + Duration::from_secs(8));
        present.clear();
        let due = d.step(t0 + Duration::from_secs(9), &present);
        assert_eq!(due[0].action, Action::Send);
        d.done(&due[0], Outcome::Done, t0 + Duration::from_secs(9));
        assert!(d.is_empty());
        assert_eq!(d.counters.leaves_sent.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_participant_that_never_comes_has_its_leave_sent() {
        let d = Delegations::default();
        let t0 = Instant::now();
        d.add(job("d1"), t0);
        let none = HashSet::new();
        assert!(d.step(t0 + Duration::from_secs(9), &none).is_empty());
        let due = d.step(t0 + Duration::from_secs(10), &none);
        assert_eq!(due[0].action, Action::Send);
    }

    #[test]
    fn failures_back_off_and_a_404_ends_the_job() {
        let d = Delegations::default();
        let t0 = Instant::now();
        d.add(job("d1"), t0);
        let present = HashSet::from([key()]);
        let due = d.step(t0, &present);
        d.done(&due[0], Outcome::Retry, t0);
        assert!(d.step(t0 + Duration::from_millis(500), &present).is_empty());
        let due = d.step(t0 + Duration::from_secs(2), &present);
        assert_eq!(due.len(), 1);
        d.done(&due[0], Outcome::Gone, t0 + Duration::from_secs(2));
        assert!(d.is_empty());
    }

    #[test]
    fn a_new_delegation_replaces_the_old_and_stale_answers_are_ignored() {
        let d = Delegations::default();
        let t0 = Instant::now();
        d.add(job("d1"), t0);
        let present = HashSet::from([key()]);
        let old = d.step(t0, &present);
        d.add(job("d2"), t0);
        d.done(&old[0], Outcome::Gone, t0);
        assert_eq!(d.len(), 1, "the answer about d1 does not end d2");
        let due = d.step(t0, &present);
        assert_eq!(due[0].delay_id, "d2");
    }
}
