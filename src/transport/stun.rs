//! The little of STUN the transport reads: which local ICE ufrag a binding
//! request is addressed to (to route a new path to its peer). Everything
//! else, integrity included, is str0m's.

/// STUN messages start with two zero bits; RTP/RTCP (10) and DTLS
/// (20..=63) do not.
#[inline]
pub fn looks_like_stun(data: &[u8]) -> bool {
    data.first().is_some_and(|b| b & 0xc0 == 0)
}

/// The local ICE ufrag of a STUN binding request (the part of USERNAME
/// before the colon).
pub fn local_ufrag(data: &[u8]) -> Option<&str> {
    // Header: type(2) length(2) cookie(4) transaction(12).
    if data.len() < 20 || !looks_like_stun(data) || data[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    // Binding request only: the one message that opens a path.
    if data[0..2] != [0x00, 0x01] {
        return None;
    }
    let mut i = 20;
    while i + 4 <= data.len() {
        let typ = u16::from_be_bytes([data[i], data[i + 1]]);
        let len = u16::from_be_bytes([data[i + 2], data[i + 3]]) as usize;
        let val = data.get(i + 4..i + 4 + len)?;
        if typ == 0x0006 {
            let user = std::str::from_utf8(val).ok()?;
            return user.split(':').next().filter(|u| !u.is_empty());
        }
        i += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// A binding request naming `username` (no integrity): for tests and the
/// fuzz harness, which open a peer's path with it as ICE would.
pub(crate) fn binding_request(username: &str) -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&[7u8; 12]);
    let padded = username.len().div_ceil(4) * 4;
    m.extend_from_slice(&[0x00, 0x06]);
    m.extend_from_slice(&(username.len() as u16).to_be_bytes());
    m.extend_from_slice(username.as_bytes());
    m.resize(m.len() + padded - username.len(), 0);
    let body = (m.len() - 20) as u16;
    m[2..4].copy_from_slice(&body.to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_is_found_and_garbage_is_not() {
        let m = binding_request("abc:xyz");
        assert_eq!(local_ufrag(&m), Some("abc"));
        assert_eq!(local_ufrag(&m[..22]), None);
        assert_eq!(local_ufrag(b"garbage that is long enough to parse"), None);
        assert_eq!(local_ufrag(&[]), None);
        // A binding response names no path of ours.
        let mut resp = m.clone();
        resp[0..2].copy_from_slice(&[0x01, 0x01]);
        assert_eq!(local_ufrag(&resp), None);
        // An attribute length running past the end.
        let mut cut = m.clone();
        cut[22..24].copy_from_slice(&[0x00, 0xff]);
        assert_eq!(local_ufrag(&cut), None);
    }
}
