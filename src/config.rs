//! Configuration: the embedded default, an optional TOML file, CLI overrides.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The default config, compiled in so `moselle serve` needs no file.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/moselle.toml");

/// The API key and secret `--dev` adds, as LiveKit's dev mode does.
pub const DEV_KEY: &str = "devkey";
pub const DEV_SECRET: &str = "secret";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub keys: HashMap<String, String>,
    /// More keys from a file of `key: secret` lines (LiveKit's `key_file`).
    #[serde(default)]
    pub keys_file: Option<std::path::PathBuf>,
    pub room: RoomConfig,
    pub rtc: RtcConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub call_page: CallPageConfig,
    pub matrix: MatrixConfig,
    pub cluster: ClusterConfig,
    pub webhook: WebhookConfig,
    /// TURN servers handed to clients (`[[turn]]`); none by default.
    #[serde(default)]
    pub turn: Vec<crate::transport::turn::TurnConfig>,
    /// `--dev`: short secrets allowed. Not a config key.
    #[serde(skip)]
    pub dev: bool,
}

/// LiveKit-format webhooks (see `webhook.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub urls: Vec<String>,
    /// The API key whose secret signs them; empty: the only key.
    pub api_key: String,
    /// Events waiting per URL; more are dropped (and counted).
    pub queue_size: usize,
    pub timeout_ms: u64,
    /// Tries per event and URL, with backoff from 0.5 s doubling.
    pub attempts: u32,
}

/// Many nodes, and where rooms may be placed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Empty: this node alone, no external service.
    pub redis_url: String,
    pub allowed_jurisdictions: Vec<String>,
    #[serde(default)]
    pub homeserver_jurisdictions: HashMap<String, Vec<String>>,
    pub heartbeat_secs: u64,
    pub node_ttl_secs: u64,
    pub room_ttl_secs: u64,
    pub drain_timeout_secs: u64,
}

/// The MatrixRTC token service (MSC4195).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixConfig {
    pub enabled: bool,
    pub livekit_url: String,
    pub full_access_homeservers: Vec<String>,
    pub denied_homeservers: Vec<String>,
    pub token_ttl_secs: u64,
    pub request_timeout_ms: u64,
    pub membership_recheck_secs: u64,
    pub requests_per_minute_per_address: u32,
    pub requests_per_minute_per_user: u32,
    pub allow_metadata_updates: bool,
    #[serde(default)]
    pub homeserver_urls: HashMap<String, String>,
    pub membership: MembershipConfig,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipConfig {
    pub method: crate::matrix::homeserver::MembershipMethod,
    pub homeserver_url: String,
    pub access_token: String,
    /// The access token read from a file instead.
    #[serde(default)]
    pub access_token_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for MembershipConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The access token stays out of logs.
        f.debug_struct("MembershipConfig")
            .field("method", &self.method)
            .field("homeserver_url", &self.homeserver_url)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallPageConfig {
    pub enabled: bool,
    pub assets_dir: std::path::PathBuf,
    pub token_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: IpAddr,
    pub http_port: u16,
    pub udp_port: u16,
    #[serde(default)]
    pub node_ips: Vec<IpAddr>,
    pub node_id: String,
    pub jurisdiction: String,
    /// Signaling URL clients use for this node; empty: ws://<first node
    /// address>:<http_port>.
    pub public_url: String,
    /// Most rooms this node takes (0: no limit).
    pub capacity: u32,
    /// HTTPS/WSS on `http_port`: a PEM certificate chain and its key (both,
    /// or neither for plain HTTP). Read again on SIGHUP.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl ServerConfig {
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        (!self.tls_cert_file.is_empty() && !self.tls_key_file.is_empty()).then(|| {
            crate::tls::TlsFiles {
                cert: self.tls_cert_file.clone().into(),
                key: self.tls_key_file.clone().into(),
            }
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoomConfig {
    pub auto_create: bool,
    pub empty_timeout_secs: u64,
    pub departure_timeout_secs: u64,
    pub max_participants: u32,
    pub resume_window_secs: u64,
}

/// What one participant may do (see `[limits]` in config/moselle.toml);
/// 0 turns a limit off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub tracks_per_participant: usize,
    pub metadata_bytes: usize,
    pub attributes_bytes: usize,
    pub data_packet_bytes: usize,
    pub data_packets_per_sec: u32,
    pub signal_requests_per_sec: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RtcConfig {
    pub pli_throttle_ms: u64,
    /// Forwarding worker threads; 0 = automatic (see `worker_count`).
    pub workers: usize,
    /// ICE over TCP (passive candidates) for networks that block UDP.
    pub ice_tcp: bool,
    /// Its port; 0: any free port.
    pub tcp_port: u16,
    pub tcp_max_connections: usize,
    pub tcp_max_connections_per_address: usize,
    pub tcp_first_stun_timeout_ms: u64,
    pub tcp_idle_timeout_secs: u64,
    /// How long a participant moved down the connectivity fallback ladder
    /// keeps its rung for its next joins in that room.
    pub fallback_memory_secs: u64,
    /// Coalesce each subscriber's runs of equal-size datagrams with UDP GSO.
    pub udp_gso: bool,
    /// Estimate each subscriber's downlink (TWCC, else REMB) and fit its
    /// simulcast layers into it; str0m then paces what it sends.
    pub downlink_bwe: bool,
    /// The estimate a new subscriber starts from, kbit/s.
    pub bwe_initial_kbps: u64,
}

impl RtcConfig {
    pub fn tcp_limits(&self) -> crate::transport::tcp::TcpLimits {
        crate::transport::tcp::TcpLimits {
            max_connections: self.tcp_max_connections,
            max_per_address: self.tcp_max_connections_per_address,
            first_stun_timeout: std::time::Duration::from_millis(self.tcp_first_stun_timeout_ms),
            idle_timeout: std::time::Duration::from_secs(self.tcp_idle_timeout_secs),
        }
    }

    /// The worker count to run: `workers`, or one per available core less
    /// the one the dispatcher and signaling need once there are several
    /// workers; so one worker (no hand-off) on two cores or fewer, where the
    /// hand-off measured 25 % more CPU per packet than it could gain.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        if cores <= 2 {
            1
        } else {
            cores - 1
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config {origin}: {path}: {message}")]
    Field {
        origin: String,
        path: String,
        message: String,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    pub fn embedded() -> Result<Config, ConfigError> {
        Self::parse(EMBEDDED_DEFAULT, "(embedded default)")
    }

    /// A file over the embedded default: it states only what differs.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::layered(&text, &path.display().to_string())
    }

    /// `text` over the embedded default, field by field: tables merge,
    /// anything else (numbers, strings, arrays) replaces. A key the default
    /// does not know is refused by its full path.
    pub fn layered(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut base = table(EMBEDDED_DEFAULT, "(embedded default)")?;
        overlay(&mut base, table(text, origin)?);
        Self::from_table(base, origin)
    }

    /// One whole config, nothing filled in from the default.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::from_table(table(text, origin)?, origin)
    }

    fn from_table(t: toml::Table, origin: &str) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(t).map_err(|e| ConfigError::Field {
            origin: origin.to_string(),
            path: e.path().to_string(),
            message: e.into_inner().to_string(),
        })
    }

    /// Every problem, as one error (see [`Config::problems`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().as_slice() {
            [] => Ok(()),
            ps => Err(ConfigError::Invalid(ps.join("; "))),
        }
    }

    /// Checks that need the whole config, after CLI overrides and secrets
    /// are in: each problem found, in words for the operator.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! problem {
            ($($t:tt)*) => { out.push(format!($($t)*)) };
        }
        if self.keys.is_empty() {
            problem!("no API keys: add a [keys] table (key = \"secret\") or run with --dev");
        }
        let mut keys: Vec<_> = self.keys.iter().collect();
        keys.sort();
        for (k, s) in keys {
            if k.is_empty() || s.is_empty() {
                problem!("API keys and secrets must not be empty");
            } else if s.chars().count() < MIN_SECRET_CHARS && !self.dev {
                problem!(
                    "the secret of API key {k:?} is shorter than {MIN_SECRET_CHARS} characters: \
                     anyone could guess it and mint tokens (allowed only with --dev)"
                );
            }
        }
        let j = &self.server.jurisdiction;
        if j.len() != 2 || !j.chars().all(|c| c.is_ascii_uppercase()) {
            problem!(
                "server.jurisdiction must be an ISO 3166-1 alpha-2 code like \"LU\", got {j:?}"
            );
        }
        for j in self
            .cluster
            .allowed_jurisdictions
            .iter()
            .chain(self.cluster.homeserver_jurisdictions.values().flatten())
        {
            if j.len() != 2 || !j.chars().all(|c| c.is_ascii_uppercase()) {
                problem!(
                    "cluster jurisdictions are ISO 3166-1 alpha-2 codes like \"LU\", got {j:?}"
                );
            }
        }
        if !self.cluster.redis_url.is_empty()
            && self.cluster.node_ttl_secs <= self.cluster.heartbeat_secs
        {
            problem!("cluster.node_ttl_secs must exceed cluster.heartbeat_secs");
        }
        if let Err(e) =
            crate::transport::turn::check(&self.turn, &self.cluster.allowed_jurisdictions)
        {
            problem!("{e}");
        }
        let r = &self.rtc;
        if r.ice_tcp
            && (r.tcp_max_connections == 0
                || r.tcp_max_connections_per_address == 0
                || r.tcp_first_stun_timeout_ms == 0
                || r.tcp_idle_timeout_secs == 0)
        {
            problem!(
                "rtc.tcp_max_connections, tcp_max_connections_per_address, \
                 tcp_first_stun_timeout_ms and tcp_idle_timeout_secs must be positive"
            );
        }
        if self.server.tls_cert_file.is_empty() != self.server.tls_key_file.is_empty() {
            problem!(
                "server.tls_cert_file and server.tls_key_file go together: set both, or neither"
            );
        }
        for u in &self.webhook.urls {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                problem!("webhook.urls: {u:?} is not an http:// or https:// URL");
            }
        }
        if !self.webhook.urls.is_empty() {
            let k = &self.webhook.api_key;
            if !k.is_empty() && !self.keys.contains_key(k) {
                problem!("webhook.api_key {k:?} is not one of the API keys");
            } else if k.is_empty() && self.keys.len() > 1 {
                problem!("webhook.api_key: several API keys are configured, name the one that signs webhooks");
            }
        }
        let m = &self.matrix;
        if m.enabled {
            if m.membership.homeserver_url.is_empty() || m.membership.access_token.is_empty() {
                problem!(
                    "matrix.enabled needs [matrix.membership] homeserver_url and access_token \
                     (or access_token_file): \
                     the token service never issues a token it cannot check"
                );
            }
            if m.token_ttl_secs == 0 || m.token_ttl_secs > 3600 {
                problem!("matrix.token_ttl_secs must be 1..=3600");
            }
            if m.livekit_url.is_empty() {
                problem!("matrix.livekit_url is required");
            }
        }
        out
    }

    /// The effective config as TOML, every secret masked.
    pub fn masked_toml(&self) -> Result<String, ConfigError> {
        let ser = |e: toml::ser::Error| ConfigError::Invalid(format!("cannot print: {e}"));
        let mut t = toml::Table::try_from(self).map_err(ser)?;
        let mask = |v: &mut toml::Value| {
            if v.as_str().is_some_and(|s| !s.is_empty()) {
                *v = toml::Value::String("********".into());
            }
        };
        if let Some(keys) = t.get_mut("keys").and_then(|k| k.as_table_mut()) {
            keys.iter_mut().for_each(|(_, v)| mask(v));
        }
        if let Some(v) = t
            .get_mut("matrix")
            .and_then(|m| m.get_mut("membership"))
            .and_then(|m| m.get_mut("access_token"))
        {
            mask(v);
        }
        toml::to_string(&t).map_err(ser)
    }

    /// Secrets kept out of the file: `keys_file`, the `LIVEKIT_KEYS`
    /// environment variable (`key: secret`, comma or newline separated, as
    /// LiveKit reads it), and `matrix.membership.access_token_file`.
    pub fn load_secrets(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        if let Some(p) = &self.keys_file {
            let text = read(p)?;
            let origin = format!("keys_file {}", p.display());
            self.keys.extend(parse_keys(&text, &origin)?);
        }
        if let Some(text) = env("LIVEKIT_KEYS").filter(|t| !t.trim().is_empty()) {
            self.keys.extend(parse_keys(&text, "LIVEKIT_KEYS")?);
        }
        let m = &mut self.matrix.membership;
        if let Some(p) = &m.access_token_file {
            if !m.access_token.is_empty() {
                return Err(ConfigError::Invalid(
                    "matrix.membership: access_token and access_token_file both set; keep one"
                        .into(),
                ));
            }
            m.access_token = read(p)?.trim().to_string();
        }
        Ok(())
    }
}

/// Shorter API secrets are refused outside `--dev`: the secret signs every
/// token, and LiveKit's own tools generate 43 or more characters.
pub const MIN_SECRET_CHARS: usize = 32;

/// `key: secret` pairs, one per line or comma-separated; `#` starts a comment.
fn parse_keys(text: &str, origin: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    let uncommented = text.lines().map(|l| l.split('#').next().unwrap_or(""));
    for item in uncommented.flat_map(|l| l.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((k, v)) = item.split_once(':') else {
            return Err(ConfigError::Invalid(format!(
                "{origin}: expected `key: secret` pairs, got an entry without ':'"
            )));
        };
        let (k, v) = (k.trim(), v.trim().trim_matches('"'));
        if k.is_empty() || v.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{origin}: an empty key or secret"
            )));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        source: Box::new(e),
    })
}

fn overlay(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => overlay(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_with_livekit_ports() {
        let c = Config::embedded().unwrap();
        assert_eq!(c.server.http_port, 7880);
        assert_eq!(c.server.udp_port, 7882);
        assert_eq!(c.rtc.tcp_port, 7881);
        assert!(c.rtc.ice_tcp);
        assert!(c.room.auto_create);
        assert_eq!(c.server.jurisdiction, "LU");
    }

    #[test]
    fn no_keys_is_a_clear_error() {
        let c = Config::embedded().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--dev"), "{e}");
    }

    #[test]
    fn unknown_fields_are_rejected_by_their_full_path() {
        let text = EMBEDDED_DEFAULT.replace("[rtc]", "[rtc]\nbogus = 1");
        assert!(Config::parse(&text, "t").is_err());
        let e = Config::layered("[matrix.membership]\nmethd = \"admin_api\"", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("matrix.membership.methd"), "{e}");
    }

    #[test]
    fn a_file_states_only_what_differs() {
        let c = Config::layered(
            "[server]\nnode_id = \"lu-2\"\n[cluster]\nallowed_jurisdictions = [\"LU\", \"BE\"]",
            "f",
        )
        .unwrap();
        assert_eq!(c.server.node_id, "lu-2");
        assert_eq!(c.server.http_port, 7880, "the rest from the default");
        assert_eq!(
            c.cluster.allowed_jurisdictions,
            ["LU", "BE"],
            "arrays replace"
        );
        assert!(c.matrix.denied_homeservers.is_empty());
    }
}
