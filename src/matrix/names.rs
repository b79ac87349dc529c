//! SFU room names and participant identities, derived exactly as
//! lk-jwt-service derives them so Element Call and matrix-js-sdk (which
//! computes the identity itself) find the same room and participants.

use base64::Engine;
use sha2::{Digest, Sha256};

/// Slot of the legacy `/sfu/get` endpoint: one call per room.
pub const LEGACY_SLOT: &str = "m.call#ROOM";

/// Unpadded standard base64 of SHA-256 over the compact JSON array of
/// `items` (as `JSON.stringify` and Go's `json.Marshal` write it for
/// ordinary ids).
fn hash_of(items: &[&str]) -> String {
    let json = serde_json::to_string(items).unwrap_or_default();
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(json.as_bytes()))
}

/// The SFU room for a Matrix room and call slot.
pub fn room_name(room_id: &str, slot_id: &str) -> String {
    hash_of(&[room_id, slot_id])
}

/// The SFU identity for `/get_token`: user, device and membership id.
pub fn identity(user_id: &str, device_id: &str, member_id: &str) -> String {
    hash_of(&[user_id, device_id, member_id])
}

/// The SFU identity for the legacy `/sfu/get`.
pub fn legacy_identity(user_id: &str, device_id: &str) -> String {
    format!("{user_id}:{device_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from the definition (lk-jwt-service's tests compute the same).
    #[test]
    fn room_name_vector() {
        assert_eq!(
            room_name("!roomid:example.com", "slot1234"),
            "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"
        );
        assert_eq!(
            room_name("!room:example.org", LEGACY_SLOT),
            include_str!("testdata/room_name_vector.txt").trim()
        );
    }

    #[test]
    fn identity_vectors() {
        assert_eq!(
            identity("@alice:example.com", "DEVICE123", "memberABC"),
            "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"
        );
        assert_eq!(
            legacy_identity("@user:example.com", "testDevice"),
            "@user:example.com:testDevice"
        );
    }

    #[test]
    fn names_are_43_chars_unpadded() {
        let n = room_name("!x:y", "z");
        assert_eq!(n.len(), 43);
        assert!(!n.contains('='));
    }
}
