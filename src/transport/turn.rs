//! TURN relays handed to clients (coturn beside each node, not inside
//! Moselle). Only configured entries are ever handed out, never a public
//! STUN or TURN server, and each must be in a jurisdiction rooms may use:
//! an entry outside them stops the node from starting. Credentials follow
//! coturn's REST-API scheme (`use-auth-secret`): username
//! `<expiry unix time>:<participant sid>`, password
//! base64(HMAC-SHA1(shared secret, username)).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};

/// One `[[turn]]` entry of the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TurnConfig {
    /// e.g. `turns:turn.example.lu:443?transport=tcp`
    pub urls: Vec<String>,
    /// A file holding the shared secret (coturn's `static-auth-secret`).
    pub secret_file: PathBuf,
    /// Lifetime of handed-out credentials; a relayed call must end, or
    /// rejoin, within it (coturn refuses refreshes after it).
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
    /// ISO 3166-1 code of the country the TURN server is in.
    pub jurisdiction: String,
}

/// LiveKit's default for external TURN servers.
fn default_ttl() -> u64 {
    14_400
}

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(
        "[[turn]] {url}: the TURN server is in {jurisdiction}, outside cluster.allowed_jurisdictions \
         {allowed:?}; media relayed there would leave the allowed jurisdictions, so this node will \
         not start"
    )]
    Jurisdiction {
        url: String,
        jurisdiction: String,
        allowed: Vec<String>,
    },
    #[error(
        "[[turn]] {0:?}: only turn: and turns: URLs are handed out (host:port, optional \
         ?transport=udp|tcp); Moselle gives clients no STUN server"
    )]
    Url(String),
    #[error("[[turn]] entry without urls")]
    NoUrls,
    #[error("[[turn]] ttl_secs must be 60..=604800, got {0}")]
    Ttl(u64),
    #[error("[[turn]] cannot read the shared secret from {path}: {source}")]
    Secret {
        path: String,
        source: std::io::Error,
    },
    #[error("[[turn]] the shared secret in {0} is empty")]
    EmptySecret(String),
}

/// A TURN server, ready to hand out.
#[derive(Clone)]
pub struct TurnServer {
    pub urls: Vec<String>,
    secret: String,
    pub ttl: Duration,
    pub jurisdiction: String,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("TurnServer")
            .field("urls", &self.urls)
            .field("ttl", &self.ttl)
            .field("jurisdiction", &self.jurisdiction)
            .finish()
    }
}

/// What a client is given for one TURN server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

impl TurnServer {
    /// Credentials for `sid`, valid until `now` + ttl.
    pub fn credentials(&self, sid: &str, now: SystemTime) -> Credentials {
        let expiry = (now + self.ttl)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let username = format!("{expiry}:{sid}");
        Credentials {
            urls: self.urls.clone(),
            credential: rest_api_password(&self.secret, &username),
            username,
        }
    }
}

/// base64(HMAC-SHA1(secret, username)), as coturn checks it.
pub fn rest_api_password(secret: &str, username: &str) -> String {
    let mut mac = <Hmac<sha1::Sha1>>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A TURN URL we hand out: `turn:` or `turns:`, a host, an optional port
/// and `?transport=udp|tcp`.
fn valid_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("turns:")
        .or_else(|| url.strip_prefix("turn:"))
    else {
        return false;
    };
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let query_ok = query.is_empty() || query == "transport=udp" || query == "transport=tcp";
    let host = match hostport.rsplit_once(':') {
        Some((h, port)) if !h.starts_with('[') || h.ends_with(']') => {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return false;
            }
            h
        }
        _ => hostport,
    };
    query_ok
        && !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c))
}

/// Check entries against the allowed jurisdictions (no file is read).
pub fn check(entries: &[TurnConfig], allowed: &[String]) -> Result<(), TurnError> {
    for e in entries {
        let first = e.urls.first().ok_or(TurnError::NoUrls)?;
        if let Some(bad) = e.urls.iter().find(|u| !valid_url(u)) {
            return Err(TurnError::Url(bad.clone()));
        }
        if !allowed.contains(&e.jurisdiction) {
            return Err(TurnError::Jurisdiction {
                url: first.clone(),
                jurisdiction: e.jurisdiction.clone(),
                allowed: allowed.to_vec(),
            });
        }
        if !(60..=604_800).contains(&e.ttl_secs) {
            return Err(TurnError::Ttl(e.ttl_secs));
        }
    }
    Ok(())
}

/// Check the entries and read their secrets.
pub fn load(entries: &[TurnConfig], allowed: &[String]) -> Result<Vec<TurnServer>, TurnError> {
    check(entries, allowed)?;
    entries
        .iter()
        .map(|e| {
            Ok(TurnServer {
                urls: e.urls.clone(),
                secret: read_secret(&e.secret_file)?,
                ttl: Duration::from_secs(e.ttl_secs),
                jurisdiction: e.jurisdiction.clone(),
            })
        })
        .collect()
}

fn read_secret(path: &Path) -> Result<String, TurnError> {
    let text = std::fs::read_to_string(path).map_err(|source| TurnError::Secret {
        path: path.display().to_string(),
        source,
    })?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(TurnError::EmptySecret(path.display().to_string()));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, jurisdiction: &str) -> TurnConfig {
        TurnConfig {
            urls: vec![url.into()],
            secret_file: "/nonexistent".into(),
            ttl_secs: 3600,
            jurisdiction: jurisdiction.into(),
        }
    }

    #[test]
    fn password_is_coturns_hmac_sha1() {
        // Computed independently: python3 -c 'import hmac,hashlib,base64;
        // print(base64.b64encode(hmac.new(b"s3cret", b"1700000000:PA_abc",
        // hashlib.sha1).digest()).decode())'
        assert_eq!(
            rest_api_password("s3cret", "1700000000:PA_abc"),
            "D8uJWR3PfW58wkN2Bz8j8kD+riM="
        );
        let t = TurnServer {
            urls: vec!["turn:turn.example.lu:3478".into()],
            secret: "s3cret".into(),
            ttl: Duration::from_secs(600),
            jurisdiction: "LU".into(),
        };
        let c = t.credentials("PA_abc", UNIX_EPOCH + Duration::from_secs(1_699_999_400));
        assert_eq!(c.username, "1700000000:PA_abc");
        assert_eq!(c.credential, "D8uJWR3PfW58wkN2Bz8j8kD+riM=");
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn entries_outside_the_jurisdictions_or_not_turn_are_refused() {
        let lu = vec!["LU".to_string()];
        assert!(check(
            &[entry("turns:turn.example.lu:443?transport=tcp", "LU")],
            &lu
        )
        .is_ok());
        assert!(check(&[entry("turn:198.18.0.1:3478", "LU")], &lu).is_ok());
        let e = check(
            &[entry("turns:turn.example.de:443?transport=tcp", "DE")],
            &lu,
        )
        .expect_err("DE is not allowed");
        assert!(
            e.to_string()
                .contains("outside cluster.allowed_jurisdictions"),
            "{e}"
        );
        for bad in [
            "stun:stun.l.google.com:19302",
            "turn:",
            "turns:host:0",
            "turn:host?transport=sctp",
            "http://x",
        ] {
            assert!(
                matches!(check(&[entry(bad, "LU")], &lu), Err(TurnError::Url(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn secrets_are_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("moselle-turn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("secret");
        std::fs::write(&f, "  abc\n").expect("write");
        let mut e = entry("turn:turn.example.lu", "LU");
        e.secret_file = f.clone();
        let got = load(&[e.clone()], &["LU".into()]).expect("loads");
        assert_eq!(got[0].secret, "abc");
        std::fs::write(&f, "\n").expect("write");
        assert!(matches!(
            load(&[e], &["LU".into()]),
            Err(TurnError::EmptySecret(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
