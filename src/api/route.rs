//! Where a server API call is carried out. Alone, here. With Redis, on the
//! node holding the room: the call is passed on unchanged (the caller's
//! token, body and encoding) and its answer returned as it came.

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use livekit_protocol as lk;
use prost::Message;

use super::twirp::{Code, TwirpError};
use crate::cluster::{Cluster, NodeInfo, PlacementError};

/// Marks a call one node passes to another: the receiver carries it out
/// itself. A client setting it only keeps its call on the node it reached.
pub const FORWARDED: &str = "x-moselle-forwarded";

/// How long a node waits for the node holding the room.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub enum Where {
    Here,
    There(NodeInfo),
}

pub fn placement_error(e: PlacementError) -> TwirpError {
    match e {
        PlacementError::NoEligibleNode(_) => {
            TwirpError::new(Code::FailedPrecondition, e.to_string())
        }
        PlacementError::Unavailable(_) => TwirpError::new(Code::Unavailable, e.to_string()),
    }
}

/// The node a call on the existing room `room` belongs to.
pub async fn locate(cluster: &Cluster, room: &str, forwarded: bool) -> Result<Where, TwirpError> {
    if forwarded || cluster.redis.is_none() {
        return Ok(Where::Here);
    }
    match cluster.locate(room).await.map_err(placement_error)? {
        Some(n) if n.id != cluster.me.id => Ok(Where::There(n)),
        // Here, or nowhere: the engine answers not_found.
        _ => Ok(Where::Here),
    }
}

/// The node a new room `room` goes to: placed like a first join, only in
/// an allowed jurisdiction (refused otherwise).
pub async fn place(cluster: &Cluster, room: &str, forwarded: bool) -> Result<Where, TwirpError> {
    if forwarded {
        return Ok(Where::Here);
    }
    let node = cluster
        .place(room, cluster.allowed_for(None))
        .await
        .map_err(placement_error)?;
    Ok(if node.id == cluster.me.id {
        Where::Here
    } else {
        Where::There(node)
    })
}

/// The API endpoint of `method` on a node announcing `url` (its signaling
/// URL: `ws(s)://host[:port]`).
fn endpoint(url: &str, method: &str) -> Result<reqwest::Url, TwirpError> {
    let mut u = reqwest::Url::parse(url)
        .map_err(|_| TwirpError::new(Code::Internal, "a node announces an invalid URL"))?;
    let scheme = match u.scheme() {
        "ws" | "http" => "http",
        _ => "https",
    };
    let _ = u.set_scheme(scheme);
    u.set_path(&format!("/twirp/livekit.RoomService/{method}"));
    u.set_query(None);
    Ok(u)
}

/// Pass the call on to `node` and return its answer.
pub async fn forward(
    http: &reqwest::Client,
    node: &NodeInfo,
    method: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, TwirpError> {
    let unavailable = || {
        TwirpError::new(
            Code::Unavailable,
            format!("node {} holding the room did not answer", node.id),
        )
    };
    let mut req = http
        .post(endpoint(&node.url, method)?)
        .timeout(FORWARD_TIMEOUT)
        .header(FORWARDED, "1")
        .body(body);
    for h in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(v) = headers.get(&h) {
            req = req.header(h, v);
        }
    }
    let resp = req.send().await.map_err(|_| unavailable())?;
    let status = resp.status();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    let bytes = resp.bytes().await.map_err(|_| unavailable())?;
    Ok((status, [(header::CONTENT_TYPE, ct)], bytes).into_response())
}

/// ListRooms on every other live node, merged (as protobuf, whatever the
/// caller's encoding).
pub async fn list_elsewhere(
    http: &reqwest::Client,
    cluster: &Cluster,
    headers: &HeaderMap,
    req: &lk::ListRoomsRequest,
) -> Result<Vec<lk::Room>, TwirpError> {
    let Some(redis) = &cluster.redis else {
        return Ok(Vec::new());
    };
    let nodes = redis.live_nodes().await.map_err(placement_error)?;
    let mut rooms = Vec::new();
    let mut h = HeaderMap::new();
    if let Some(a) = headers.get(header::AUTHORIZATION) {
        h.insert(header::AUTHORIZATION, a.clone());
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/protobuf"),
    );
    let body = Bytes::from(req.encode_to_vec());
    for n in nodes.iter().filter(|n| n.id != cluster.me.id) {
        let resp = forward(http, n, "ListRooms", &h, body.clone()).await?;
        if !resp.status().is_success() {
            return Err(TwirpError::new(
                Code::Unavailable,
                format!("node {} did not list its rooms", n.id),
            ));
        }
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .map_err(|_| TwirpError::new(Code::Unavailable, "a node's room list did not arrive"))?;
        let list = lk::ListRoomsResponse::decode(bytes)
            .map_err(|_| TwirpError::new(Code::Internal, "a node's room list did not decode"))?;
        rooms.extend(list.rooms);
    }
    Ok(rooms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_the_announced_url() {
        let e = endpoint("ws://10.0.0.2:7880", "ListRooms").unwrap();
        assert_eq!(
            e.as_str(),
            "http://10.0.0.2:7880/twirp/livekit.RoomService/ListRooms"
        );
        let e = endpoint("wss://sfu.example.lu/", "CreateRoom").unwrap();
        assert_eq!(
            e.as_str(),
            "https://sfu.example.lu/twirp/livekit.RoomService/CreateRoom"
        );
        assert!(endpoint("not a url", "X").is_err());
    }
}
