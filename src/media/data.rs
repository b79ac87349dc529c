//! Data packets between participants: what arrives on a client's
//! `_reliable` / `_lossy` data channel is stamped with the sender and
//! forwarded, unread, to the room (or the named identities) on the same kind
//! of channel. Runs on the engine thread.

// livekit-client 2.23 still fills and reads the deprecated UserPacket fields.
#![allow(deprecated)]

use livekit_protocol as lk;
use lk::data_packet::Value;
use prost::Message;

use super::participant::Participant;

pub const RELIABLE: &str = "_reliable";
pub const LOSSY: &str = "_lossy";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataError {
    #[error("data packet is not a valid DataPacket")]
    Malformed,
    #[error("the token does not grant canPublishData")]
    NotAllowed,
}

/// A packet ready to fan out.
pub struct Outbound {
    pub label: &'static str,
    pub bytes: Vec<u8>,
    /// Empty: everyone but the sender.
    pub destinations: Vec<String>,
}

/// Check, stamp and re-encode one packet from `sender` received on the
/// channel labelled `label`. `Ok(None)`: a duplicate or a channel we do not
/// forward.
pub fn prepare(
    sender: &mut Participant,
    label: &str,
    data: &[u8],
) -> Result<Option<Outbound>, DataError> {
    let label = match label {
        RELIABLE => RELIABLE,
        LOSSY => LOSSY,
        _ => return Ok(None),
    };
    let mut pkt = lk::DataPacket::decode(data).map_err(|_| DataError::Malformed)?;
    if !sender.permission.can_publish_data {
        return Err(DataError::NotAllowed);
    }
    if label == RELIABLE && pkt.sequence > 0 {
        // Resent after a resume: drop what was already forwarded.
        if pkt.sequence <= sender.last_data_seq {
            return Ok(None);
        }
        sender.last_data_seq = pkt.sequence;
    }
    pkt.kind = if label == RELIABLE {
        lk::data_packet::Kind::Reliable as i32
    } else {
        lk::data_packet::Kind::Lossy as i32
    };
    // Receivers learn who sent it from us, never from the sender's claim.
    pkt.participant_identity = sender.identity.clone();
    pkt.participant_sid = sender.sid.clone();
    let mut destinations = pkt.destination_identities.clone();
    if let Some(Value::User(user)) = pkt.value.as_mut() {
        user.participant_identity = sender.identity.clone();
        user.participant_sid = sender.sid.clone();
        if destinations.is_empty() {
            destinations = user.destination_identities.clone();
        }
        user.destination_identities = destinations.clone();
    }
    pkt.destination_identities = destinations.clone();
    Ok(Some(Outbound {
        label,
        bytes: pkt.encode_to_vec(),
        destinations,
    }))
}

/// Whether `receiver` should get a packet for `destinations`.
pub fn wanted_by(receiver: &Participant, destinations: &[String]) -> bool {
    destinations.is_empty() || destinations.contains(&receiver.identity)
}
