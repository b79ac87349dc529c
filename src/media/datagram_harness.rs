//! A forwarding worker with one participant, fed datagrams synchronously:
//! the engine's datagram entry as the fuzz target `datagram` reaches it
//! (`crate::fuzzing`). The participant joined with a browser's offer, so a
//! "known peer" is a path its ICE ufrag opened, as on the wire. Real
//! sockets, no threads: what the engine sends goes to the discard port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livekit_protocol as lk;
use moselle_signaling::backend::{JoinTicket, OutboundRx, OUTBOUND_CAPACITY};
use moselle_signaling::join::{Flavor, JoinOptions};
use moselle_signaling::token::{Claims, VideoGrant};
use tokio::sync::mpsc;

use super::engine::{Core, EngineConfig};
use crate::metrics::MediaCounters;
use crate::transport::{self, stun, udp::UdpIo, Datagram, InletParts, Proto};

/// A browser's publisher offer (audio and simulcast video), as livekit-client
/// sends it in a v1 join.
const OFFER: &str = include_str!("../../fuzz/seeds/sdp/offer");

pub struct DatagramHarness {
    core: Core,
    /// Keeps the socket the engine sends from open.
    _inlet: InletParts,
    out: Option<OutboundRx>,
    local: SocketAddr,
    /// The participant's path, opened by a STUN request naming its ufrag.
    peer: SocketAddr,
    /// An address the engine has never heard of.
    stranger: SocketAddr,
    joins: u64,
}

impl DatagramHarness {
    pub fn new() -> std::io::Result<Self> {
        let udp = UdpIo::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)?;
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), udp.local_port());
        let counters = Arc::new(MediaCounters::default());
        let mut started = transport::start(udp, None, 1, counters.clone())?;
        let (inlet, io) = started
            .workers
            .pop()
            .ok_or_else(|| std::io::Error::other("no transport worker"))?;
        let cfg = EngineConfig {
            node_id: "fuzz".into(),
            jurisdiction: "LU".into(),
            candidates: vec![local],
            tcp_candidates: Vec::new(),
            auto_create: true,
            empty_timeout_secs: 300,
            departure_timeout_secs: 20,
            max_participants: 0,
            pli_throttle: Duration::from_millis(500),
            resume_window: Duration::from_secs(15),
            turn: Arc::new(Vec::new()),
            fallback_memory: Duration::from_secs(300),
            bwe_initial: Some(str0m::bwe::Bitrate::kbps(2500)),
            webhooks: None,
            limits: crate::config::Config::embedded()
                .map_err(std::io::Error::other)?
                .limits,
        };
        let core = Core::new(cfg, io, counters, Default::default());
        let mut h = DatagramHarness {
            core,
            _inlet: inlet,
            out: None,
            local,
            // The discard port: nobody reads what the engine answers.
            peer: "127.0.0.1:9".parse().expect("address"),
            stranger: "127.0.0.2:9".parse().expect("address"),
            joins: 0,
        };
        h.join();
        Ok(h)
    }

    /// (Re)join the participant and open its path; a datagram may have
    /// ended the last one (a failed DTLS handshake closes the connection).
    fn join(&mut self) {
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        self.joins += 1;
        let claims = Claims {
            iss: "devkey".into(),
            sub: "alice".into(),
            nbf: None,
            exp: u64::MAX,
            name: String::new(),
            metadata: String::new(),
            attributes: Default::default(),
            video: Some(VideoGrant {
                room: "fuzz".into(),
                room_join: true,
                ..Default::default()
            }),
            sha256: String::new(),
        };
        let options = JoinOptions {
            flavor: Flavor::SinglePc,
            protocol: 16,
            auto_subscribe: true,
            adaptive_stream: false,
            client_info: None,
            publisher_offer: Some(lk::SessionDescription {
                r#type: "offer".into(),
                sdp: OFFER.into(),
                id: 1,
                ..Default::default()
            }),
            reconnect: false,
            participant_sid: None,
            metadata: None,
            attributes: Default::default(),
        };
        let Ok((key, _gen)) = self.core.join(JoinTicket { claims, options }, tx, true) else {
            return;
        };
        self.out = Some(rx);
        let Some(ufrag) = self.core.parts.get(key).map(|p| p.peer.ufrag.clone()) else {
            return;
        };
        let open = stun::binding_request(&format!("{ufrag}:abcd"));
        self.feed_as(Proto::Udp, self.peer, &open);
    }

    /// One datagram: the first byte picks the source (bit 0: the known
    /// peer, else a stranger) and protocol (bit 1: TCP); the rest is sent.
    pub fn feed(&mut self, data: &[u8]) {
        let Some((&pick, bytes)) = data.split_first() else {
            return;
        };
        let proto = if pick & 2 != 0 {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        let source = if pick & 1 != 0 {
            if self.core.parts.is_empty() {
                self.join();
            }
            self.peer
        } else {
            self.stranger
        };
        self.feed_as(proto, source, bytes);
    }

    fn feed_as(&mut self, proto: Proto, source: SocketAddr, data: &[u8]) {
        let d = Datagram {
            proto,
            source,
            destination: self.local,
            data,
        };
        self.core.datagram(d, Instant::now());
        self.core.turn();
        // What a client would read; a full queue would end the session.
        if let Some(rx) = self.out.as_mut() {
            while rx.try_recv().is_ok() {}
        }
    }

    /// How many times the participant had to join (the first included).
    pub fn joins(&self) -> u64 {
        self.joins
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(h: &DatagramHarness, c: fn(&MediaCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
        MediaCounters::get(c(&h.core.counters))
    }

    #[test]
    fn strangers_are_unroutable_and_the_peers_bytes_reach_its_connection() {
        let mut h = DatagramHarness::new().expect("harness");
        assert_eq!(h.core.parts.len(), 1, "the participant joined");
        let rtp = [0x80u8, 0x60, 0, 1, 0, 0, 0, 1, 0, 0, 0x12, 0x34, 9, 9];
        let mut from_stranger = vec![0u8];
        from_stranger.extend_from_slice(&rtp);
        h.feed(&from_stranger);
        assert_eq!(count(&h, |c| &c.udp_unroutable), 1);
        // The same bytes on the participant's path reach str0m, which
        // drops RTP before DTLS: routed, not unroutable.
        let mut from_peer = vec![1u8];
        from_peer.extend_from_slice(&rtp);
        h.feed(&from_peer);
        assert_eq!(count(&h, |c| &c.udp_unroutable), 1);
        assert_eq!(
            h.core.parts.len(),
            1,
            "one bad packet does not end a session"
        );
        assert_eq!(h.joins(), 1);
    }
}
