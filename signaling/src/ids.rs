//! LiveKit-style ids: a prefix and 12 random base62 characters.

use rand::Rng;

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    let mut s = String::with_capacity(prefix.len() + 12);
    s.push_str(prefix);
    for _ in 0..12 {
        s.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    s
}

pub fn room_sid() -> String {
    new_id("RM_")
}
pub fn participant_sid() -> String {
    new_id("PA_")
}
pub fn track_sid() -> String {
    new_id("TR_")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_have_prefix_and_length() {
        let a = super::participant_sid();
        assert!(a.starts_with("PA_") && a.len() == 15);
        assert_ne!(a, super::participant_sid());
    }
}
