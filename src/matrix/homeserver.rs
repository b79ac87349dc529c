//! Talking to Matrix homeservers: find a server's base URL, check an
//! OpenID token (who is this?), and check room membership (are they in the
//! room?). Every call is bounded in time; failures are typed so the token
//! service can answer 401 / 403 / 503 without guessing.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HsError {
    #[error("the homeserver did not accept the OpenID token")]
    InvalidToken,
    #[error("homeserver {0} could not be reached")]
    Unreachable(String),
    #[error("homeserver {0} answered unexpectedly")]
    BadResponse(String),
    #[error("{0:?} is not a valid Matrix server name")]
    BadServerName(String),
}

/// Path segment encoding (room and user ids carry `!`, `:`, `@`, `#`).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Split a server name into host and optional port; `None` if it is not a
/// valid server name (hostname, IPv4 or [IPv6], optional port). Nothing
/// else (no path, no scheme) may reach a URL we build.
pub fn split_server_name(name: &str) -> Option<(&str, Option<u16>)> {
    if name.is_empty() || name.len() > 255 {
        return None;
    }
    let (host, port) = if name.starts_with('[') {
        let end = name.find(']')?;
        let (h, after) = name.split_at(end + 1);
        h[1..h.len() - 1].parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match name.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (name, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse().ok()?)
        }
        Some(_) => return None,
    };
    let host_ok = host.starts_with('[')
        || (!host.is_empty()
            && !host.starts_with('-')
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    host_ok.then_some((host, port))
}

pub fn valid_server_name(name: &str) -> bool {
    split_server_name(name).is_some()
}

#[derive(Clone)]
pub struct Homeservers {
    http: reqwest::Client,
    /// Server name -> base URL, ahead of discovery.
    overrides: HashMap<String, String>,
}

#[derive(Deserialize)]
struct WellKnown {
    #[serde(rename = "m.server")]
    server: String,
}

#[derive(Deserialize)]
struct ClientWellKnown {
    #[serde(rename = "m.homeserver")]
    homeserver: ClientWellKnownHs,
}

#[derive(Deserialize)]
struct ClientWellKnownHs {
    base_url: String,
}

#[derive(Deserialize)]
struct UserInfo {
    sub: String,
}

impl Homeservers {
    pub fn new(
        timeout: Duration,
        overrides: HashMap<String, String>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("moselle/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let overrides = overrides
            .into_iter()
            .map(|(k, v)| (k, v.trim_end_matches('/').to_string()))
            .collect();
        Ok(Homeservers { http, overrides })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Federation base URL of `server_name`: the configured override, else
    /// `.well-known/matrix/server` delegation, else port 8448. (SRV records
    /// are not consulted.)
    pub async fn federation_url(&self, server_name: &str) -> Result<String, HsError> {
        if let Some(u) = self.overrides.get(server_name) {
            return Ok(u.clone());
        }
        let Some((host, port)) = split_server_name(server_name) else {
            return Err(HsError::BadServerName(server_name.into()));
        };
        let is_ip = host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
        if port.is_some() || is_ip {
            return Ok(format!("https://{host}:{}", port.unwrap_or(8448)));
        }
        let wk = self
            .http
            .get(format!("https://{server_name}/.well-known/matrix/server"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success());
        if let Some(resp) = wk {
            if let Ok(w) = resp.json::<WellKnown>().await {
                if let Some((h, p)) = split_server_name(&w.server) {
                    return Ok(format!("https://{h}:{}", p.unwrap_or(8448)));
                }
            }
        }
        Ok(format!("https://{server_name}:8448"))
    }

    /// Client-server API base URL of `server_name`: the configured
    /// override, else `.well-known/matrix/client` (an https URL only), else
    /// `https://{server_name}`. Never a URL a client supplied.
    pub async fn client_url(&self, server_name: &str) -> Result<String, HsError> {
        if let Some(u) = self.overrides.get(server_name) {
            return Ok(u.clone());
        }
        if !valid_server_name(server_name) {
            return Err(HsError::BadServerName(server_name.into()));
        }
        let wk = self
            .http
            .get(format!("https://{server_name}/.well-known/matrix/client"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success());
        if let Some(resp) = wk {
            if let Ok(w) = resp.json::<ClientWellKnown>().await {
                let url = w.homeserver.base_url.trim_end_matches('/');
                if url.starts_with("https://") {
                    return Ok(url.to_string());
                }
            }
        }
        Ok(format!("https://{server_name}"))
    }

    /// The user an OpenID token belongs to, as its homeserver says.
    pub async fn openid_user(
        &self,
        server_name: &str,
        access_token: &str,
    ) -> Result<String, HsError> {
        let base = self.federation_url(server_name).await?;
        let resp = self
            .http
            .get(format!("{base}/_matrix/federation/v1/openid/userinfo"))
            .query(&[("access_token", access_token)])
            .send()
            .await
            .map_err(|_| HsError::Unreachable(server_name.into()))?;
        match resp.status().as_u16() {
            200 => resp
                .json::<UserInfo>()
                .await
                .map(|u| u.sub)
                .map_err(|_| HsError::BadResponse(server_name.into())),
            401 | 403 | 404 => Err(HsError::InvalidToken),
            _ => Err(HsError::BadResponse(server_name.into())),
        }
    }
}

/// How room membership is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipMethod {
    /// Synapse admin API with an admin's access token.
    AdminApi,
    /// Client-server API with a service account that is in the room.
    ClientApi,
}

#[derive(Clone)]
pub struct Membership {
    pub http: reqwest::Client,
    pub method: MembershipMethod,
    pub base_url: String,
    pub access_token: String,
}

#[derive(Deserialize)]
struct AdminMembers {
    members: Vec<String>,
}

#[derive(Deserialize)]
struct JoinedMembers {
    joined: HashMap<String, serde_json::Value>,
}

impl Membership {
    /// Whether `user_id` is joined to `room_id`. A room the checker cannot
    /// see counts as "not joined": nobody gets a token we could not check.
    pub async fn is_joined(&self, room_id: &str, user_id: &str) -> Result<bool, HsError> {
        let room = encode_segment(room_id);
        let url = match self.method {
            MembershipMethod::AdminApi => {
                format!("{}/_synapse/admin/v1/rooms/{room}/members", self.base_url)
            }
            MembershipMethod::ClientApi => format!(
                "{}/_matrix/client/v3/rooms/{room}/joined_members",
                self.base_url
            ),
        };
        let resp = self
            .http
            .get(url)
            .bearer_auth(&self.access_token)
            .send()
            .await
            .map_err(|_| HsError::Unreachable(self.base_url.clone()))?;
        let status = resp.status().as_u16();
        if matches!(status, 403 | 404) {
            return Ok(false);
        }
        if status != 200 {
            return Err(HsError::BadResponse(self.base_url.clone()));
        }
        let bad = |_| HsError::BadResponse(self.base_url.clone());
        Ok(match self.method {
            MembershipMethod::AdminApi => resp
                .json::<AdminMembers>()
                .await
                .map_err(bad)?
                .members
                .iter()
                .any(|m| m == user_id),
            MembershipMethod::ClientApi => resp
                .json::<JoinedMembers>()
                .await
                .map_err(bad)?
                .joined
                .contains_key(user_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for ok in [
            "example.org",
            "matrix.example.org:8448",
            "1.2.3.4",
            "1.2.3.4:80",
            "[::1]",
            "[::1]:8448",
            "localhost",
        ] {
            assert!(valid_server_name(ok), "{ok}");
        }
        for bad in [
            "",
            "exa mple.org",
            "example.org/path",
            "example.org:",
            "example.org:99999x",
            "::1",
            "-x.org",
            "a@b",
        ] {
            assert!(!valid_server_name(bad), "{bad}");
        }
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("!abc:example.org"), "%21abc%3Aexample.org");
        assert_eq!(encode_segment("@u:x/y"), "%40u%3Ax%2Fy");
    }

    #[tokio::test]
    async fn discovery_without_network_uses_overrides_and_literals() {
        let hs = Homeservers::new(
            Duration::from_millis(200),
            HashMap::from([(
                "localhost".to_string(),
                "http://127.0.0.1:8008/".to_string(),
            )]),
        )
        .unwrap();
        assert_eq!(
            hs.federation_url("localhost").await.unwrap(),
            "http://127.0.0.1:8008"
        );
        assert_eq!(
            hs.federation_url("10.0.0.1").await.unwrap(),
            "https://10.0.0.1:8448"
        );
        assert_eq!(
            hs.federation_url("h.example:1234").await.unwrap(),
            "https://h.example:1234"
        );
        assert!(matches!(
            hs.federation_url("bad/name").await,
            Err(HsError::BadServerName(_))
        ));
    }
}
