//! Which peer a datagram belongs to: by its path (protocol and remote
//! address) in O(1), or, for a path not seen yet, by the local ICE ufrag
//! its STUN binding request names (ICE checks open every path, UDP or TCP,
//! so a new path is learned exactly when the peer could start using it).
//!
//! Ufrags are also published to the node's shared route map (ufrag ->
//! worker), which the UDP dispatcher and the TCP acceptor read to find the
//! worker a new path belongs to.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{stun, Datagram, Path};

/// ufrag -> worker index, written by workers, read by the dispatcher and
/// the TCP acceptor.
pub type UfragRoutes = Arc<RwLock<HashMap<String, usize>>>;

pub enum Route<T> {
    /// A known path.
    Known(T),
    /// A new path, learned now from the STUN request's ufrag.
    New(T),
    /// Neither path nor ufrag is known.
    Unknown,
}

pub struct Demux<T: Copy> {
    by_path: HashMap<Path, T>,
    by_ufrag: HashMap<String, T>,
    worker: usize,
    shared: UfragRoutes,
}

impl<T: Copy> Demux<T> {
    pub fn new(worker: usize, shared: UfragRoutes) -> Self {
        Self {
            by_path: HashMap::new(),
            by_ufrag: HashMap::new(),
            worker,
            shared,
        }
    }

    #[inline]
    pub fn route(&mut self, d: &Datagram<'_>) -> Route<T> {
        let path = (d.proto, d.source);
        if let Some(t) = self.by_path.get(&path) {
            return Route::Known(*t);
        }
        match stun::local_ufrag(d.data).and_then(|u| self.by_ufrag.get(u)) {
            Some(t) => {
                let t = *t;
                self.by_path.insert(path, t);
                Route::New(t)
            }
            None => Route::Unknown,
        }
    }

    pub fn set_ufrag(&mut self, ufrag: String, to: T) {
        if let Ok(mut r) = self.shared.write() {
            r.insert(ufrag.clone(), self.worker);
        }
        self.by_ufrag.insert(ufrag, to);
    }

    pub fn remove_ufrag(&mut self, ufrag: &str) {
        if let Ok(mut r) = self.shared.write() {
            r.remove(ufrag);
        }
        self.by_ufrag.remove(ufrag);
    }

    /// Forget `path` if it leads where `owned` says; true if it did.
    pub fn forget_path(&mut self, path: &Path, owned: impl Fn(&T) -> bool) -> bool {
        if self.by_path.get(path).is_some_and(owned) {
            self.by_path.remove(path);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Proto;

    fn dgram(proto: Proto, data: &[u8]) -> Datagram<'_> {
        Datagram {
            proto,
            source: "10.0.0.1:5000".parse().expect("addr"),
            destination: "10.0.0.2:7882".parse().expect("addr"),
            data,
        }
    }

    #[test]
    fn paths_are_learned_by_ufrag_per_protocol() {
        let shared = UfragRoutes::default();
        let mut d: Demux<u32> = Demux::new(3, shared.clone());
        d.set_ufrag("abcd".into(), 7);
        assert_eq!(shared.read().expect("lock").get("abcd"), Some(&3));
        let stun = stun::binding_request("abcd:remote");
        assert!(matches!(
            d.route(&dgram(Proto::Udp, b"\x80rtp")),
            Route::Unknown
        ));
        assert!(matches!(d.route(&dgram(Proto::Udp, &stun)), Route::New(7)));
        assert!(matches!(
            d.route(&dgram(Proto::Udp, b"\x80rtp")),
            Route::Known(7)
        ));
        // The same address over TCP is another path.
        assert!(matches!(
            d.route(&dgram(Proto::Tcp, b"\x80rtp")),
            Route::Unknown
        ));
        assert!(matches!(d.route(&dgram(Proto::Tcp, &stun)), Route::New(7)));
        let path = (Proto::Udp, "10.0.0.1:5000".parse().expect("addr"));
        assert!(!d.forget_path(&path, |t| *t == 8));
        assert!(d.forget_path(&path, |t| *t == 7));
        assert!(matches!(
            d.route(&dgram(Proto::Udp, b"\x80rtp")),
            Route::Unknown
        ));
        d.remove_ufrag("abcd");
        assert!(shared.read().expect("lock").is_empty());
    }
}
