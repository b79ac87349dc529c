//! The server-driven connectivity fallback, after LiveKit's
//! (`pkg/rtc/transportmanager.go`): when a participant's ICE fails while its
//! signaling lives, it is asked to rejoin, and its next join in that room
//! gets the next rung of the ladder, remembered per room and identity for a
//! while:
//!
//! 1. `Any`: UDP and TCP candidates (UDP preferred by priority);
//! 2. `TcpOnly`: no UDP candidates in answers, after ICE failed on UDP;
//! 3. `RelayOnly`: `ClientConfiguration.force_relay`, so the client uses
//!    only the TURN servers it was given, after ICE failed on TCP. Only
//!    with TURN configured.
//!
//! As in LiveKit, only a connection that worked and then failed moves a
//! participant (its last path says which rung is next). Unlike LiveKit,
//! which resumes the session and restarts ICE with the new settings, the
//! client is asked for a full rejoin (LeaveRequest RECONNECT, reason
//! MEDIA_FAILURE): the new session is built on its rung from the start.
//!
//! A room lives on one worker, so each worker keeps its own memory.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::transport::Proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rung {
    Any,
    TcpOnly,
    RelayOnly,
}

impl Rung {
    pub fn name(self) -> &'static str {
        match self {
            Rung::Any => "udp+tcp",
            Rung::TcpOnly => "tcp",
            Rung::RelayOnly => "relay",
        }
    }
}

/// What a node can offer, which decides the rungs there are.
#[derive(Debug, Clone, Copy)]
pub struct Offers {
    pub ice_tcp: bool,
    pub turn: bool,
}

pub struct Fallbacks {
    rungs: HashMap<(String, String), (Rung, Instant)>,
    memory: Duration,
}

impl Fallbacks {
    pub fn new(memory: Duration) -> Self {
        Self {
            rungs: HashMap::new(),
            memory,
        }
    }

    /// The rung a join of `identity` in `room` starts on.
    pub fn rung(&self, room: &str, identity: &str, now: Instant) -> Rung {
        self.rungs
            .get(&(room.to_string(), identity.to_string()))
            .filter(|(_, until)| *until > now)
            .map(|(r, _)| *r)
            .unwrap_or(Rung::Any)
    }

    /// ICE failed for a participant on rung `on`, last carried by `path`
    /// (None: it never connected). Records and returns the next rung, or
    /// None when there is none to go to.
    pub fn step(
        &mut self,
        room: &str,
        identity: &str,
        on: Rung,
        path: Option<Proto>,
        offers: Offers,
        now: Instant,
    ) -> Option<Rung> {
        let next = next_rung(on, path, offers)?;
        self.rungs.insert(
            (room.to_string(), identity.to_string()),
            (next, now + self.memory),
        );
        Some(next)
    }

    /// Forget what has expired.
    pub fn sweep(&mut self, now: Instant) {
        self.rungs.retain(|_, (_, until)| *until > now);
    }
}

/// The ladder: after UDP failed, TCP; after TCP failed (or no path ever
/// worked), the relay; after the relay, nothing more the server can do.
pub fn next_rung(on: Rung, path: Option<Proto>, offers: Offers) -> Option<Rung> {
    let want = match (on, path) {
        (Rung::RelayOnly, _) => return None,
        (_, Some(Proto::Tcp)) | (Rung::TcpOnly, _) | (_, None) => Rung::RelayOnly,
        (Rung::Any, Some(Proto::Udp)) => Rung::TcpOnly,
    };
    match want {
        Rung::TcpOnly if offers.ice_tcp => Some(Rung::TcpOnly),
        Rung::TcpOnly | Rung::RelayOnly if offers.turn => Some(Rung::RelayOnly),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Offers = Offers {
        ice_tcp: true,
        turn: true,
    };

    #[test]
    fn the_ladder_goes_udp_tcp_relay() {
        use Proto::*;
        assert_eq!(next_rung(Rung::Any, Some(Udp), ALL), Some(Rung::TcpOnly));
        assert_eq!(next_rung(Rung::Any, Some(Tcp), ALL), Some(Rung::RelayOnly));
        assert_eq!(
            next_rung(Rung::TcpOnly, Some(Tcp), ALL),
            Some(Rung::RelayOnly)
        );
        assert_eq!(next_rung(Rung::Any, None, ALL), Some(Rung::RelayOnly));
        assert_eq!(next_rung(Rung::RelayOnly, Some(Udp), ALL), None);
        // What is not offered is skipped, or there is nowhere to go.
        let no_turn = Offers {
            ice_tcp: true,
            turn: false,
        };
        assert_eq!(next_rung(Rung::TcpOnly, Some(Tcp), no_turn), None);
        let no_tcp = Offers {
            ice_tcp: false,
            turn: true,
        };
        assert_eq!(
            next_rung(Rung::Any, Some(Udp), no_tcp),
            Some(Rung::RelayOnly)
        );
    }

    #[test]
    fn rungs_are_remembered_per_room_and_identity_for_a_while() {
        let t0 = Instant::now();
        let mut f = Fallbacks::new(Duration::from_secs(600));
        assert_eq!(f.rung("r", "alice", t0), Rung::Any);
        let next = f.step("r", "alice", Rung::Any, Some(Proto::Udp), ALL, t0);
        assert_eq!(next, Some(Rung::TcpOnly));
        assert_eq!(f.rung("r", "alice", t0), Rung::TcpOnly);
        assert_eq!(f.rung("r", "bob", t0), Rung::Any);
        assert_eq!(f.rung("other", "alice", t0), Rung::Any);
        let later = t0 + Duration::from_secs(601);
        assert_eq!(f.rung("r", "alice", later), Rung::Any);
        f.sweep(later);
        assert!(f.rungs.is_empty());
    }
}
