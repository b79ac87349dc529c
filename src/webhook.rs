//! Webhooks as LiveKit sends them: room, participant and track events
//! POSTed to each configured URL as protobuf JSON (`WebhookEvent`,
//! `application/webhook+json`), with an `Authorization` JWT whose `sha256`
//! claim is the base64 SHA-256 of the body, signed by an API key's secret
//! (what `livekit-api`'s `WebhookReceiver` checks).
//!
//! The media workers only `try_send` into a bounded queue per URL: a slow
//! or dead receiver never slows media. What does not fit is dropped, what
//! cannot be delivered after the retries is given up; both are counted.
//! Payloads carry no addresses (ParticipantInfo has none).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use livekit_protocol as lk;
use moselle_signaling::ids::new_id;
use moselle_signaling::token::{now_secs, Claims, KeySet};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::WebhookConfig;

/// Lifetime of the token on one delivery attempt.
const TOKEN_TTL: Duration = Duration::from_secs(300);
/// Wait before the first retry; doubles on each.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook.api_key {0:?} is not one of the configured API keys")]
    UnknownKey(String),
    #[error(
        "webhook.api_key is empty and there are several API keys: name the one that signs webhooks"
    )]
    WhichKey,
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

#[derive(Debug, Default)]
pub struct WebhookCounters {
    pub queued: AtomicU64,
    pub sent: AtomicU64,
    pub retries: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

impl WebhookCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "webhooks_queued_total",
                "Webhook deliveries queued (one per event and URL)",
                g(&self.queued),
            ),
            (
                "webhooks_sent_total",
                "Webhooks a receiver accepted (2xx)",
                g(&self.sent),
            ),
            (
                "webhooks_retries_total",
                "Webhook delivery attempts repeated after a failure",
                g(&self.retries),
            ),
            (
                "webhooks_failed_total",
                "Webhooks given up after every attempt failed",
                g(&self.failed),
            ),
            (
                "webhooks_dropped_total",
                "Webhooks dropped because a URL's queue was full",
                g(&self.dropped),
            ),
        ]
    }
}

/// Where the engine hands events; cheap to clone.
#[derive(Clone, Debug)]
pub struct Sink {
    queues: Arc<Vec<mpsc::Sender<Arc<lk::WebhookEvent>>>>,
    pub counters: Arc<WebhookCounters>,
}

impl Sink {
    /// Queue one event for every URL; never waits.
    pub fn emit(
        &self,
        event: &str,
        room: Option<lk::Room>,
        participant: Option<lk::ParticipantInfo>,
        track: Option<lk::TrackInfo>,
    ) {
        let ev = Arc::new(lk::WebhookEvent {
            event: event.to_string(),
            room,
            participant,
            track,
            id: new_id("EV_"),
            created_at: now_secs() as i64,
            ..Default::default()
        });
        for q in self.queues.iter() {
            match q.try_send(ev.clone()) {
                Ok(()) => self.counters.queued.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.counters.dropped.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// Start one sender task per URL; `None` when no URL is configured.
/// Must run inside the Tokio runtime.
pub fn start(cfg: &WebhookConfig, keys: &KeySet) -> Result<Option<Sink>, WebhookError> {
    if cfg.urls.is_empty() {
        return Ok(None);
    }
    let key = signing_key(cfg, keys)?;
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("moselle/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let counters = Arc::new(WebhookCounters::default());
    let mut queues = Vec::new();
    for url in &cfg.urls {
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
        queues.push(tx);
        tokio::spawn(deliver_all(
            rx,
            Target {
                url: url.clone(),
                key: key.clone(),
                keys: keys.clone(),
                http: http.clone(),
                attempts: cfg.attempts.max(1),
            },
            counters.clone(),
        ));
    }
    Ok(Some(Sink {
        queues: Arc::new(queues),
        counters,
    }))
}

fn signing_key(cfg: &WebhookConfig, keys: &KeySet) -> Result<String, WebhookError> {
    if !cfg.api_key.is_empty() {
        return match keys.key_names().any(|k| k == cfg.api_key) {
            true => Ok(cfg.api_key.clone()),
            false => Err(WebhookError::UnknownKey(cfg.api_key.clone())),
        };
    }
    let names: Vec<&str> = keys.key_names().collect();
    match names.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(WebhookError::WhichKey),
    }
}

struct Target {
    url: String,
    key: String,
    keys: KeySet,
    http: reqwest::Client,
    attempts: u32,
}

/// One URL's events, in order; each retried with backoff before the next.
async fn deliver_all(
    mut rx: mpsc::Receiver<Arc<lk::WebhookEvent>>,
    t: Target,
    counters: Arc<WebhookCounters>,
) {
    while let Some(ev) = rx.recv().await {
        let body = match serde_json::to_string(&*ev) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "webhook not serialisable");
                counters.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let mut backoff = FIRST_BACKOFF;
        let mut delivered = false;
        for attempt in 0..t.attempts {
            if attempt > 0 {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            match post(&t, &body).await {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                // The URL is the operator's own; the event names no one.
                Err(why) => {
                    tracing::debug!(event = %ev.event, attempt, %why, "webhook attempt failed")
                }
            }
        }
        if delivered {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event = %ev.event, attempts = t.attempts, "webhook given up");
        }
    }
}

async fn post(t: &Target, body: &str) -> Result<(), String> {
    let now = now_secs();
    let claims = Claims {
        nbf: Some(now),
        exp: now + TOKEN_TTL.as_secs(),
        sha256: base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes())),
        ..Claims::default()
    };
    let token = t.keys.mint(&t.key, &claims).map_err(|e| e.to_string())?;
    let resp = t
        .http
        .post(&t.url)
        .header("Content-Type", "application/webhook+json")
        .header("Authorization", token)
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status().as_u16()))
    }
}
