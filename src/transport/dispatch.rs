//! Several forwarding workers behind one UDP port.
//!
//! Rooms are spread over workers (a room's forwarding stays on one thread).
//! One dispatcher thread reads the socket in `recvmmsg` batches and hands
//! each worker its datagrams a batch at a time: one lock and one wake per
//! batch per worker, never per packet, and no allocation once the buffers
//! have grown. Workers send on the same socket with their own `sendmmsg`
//! batches.
//!
//! Routing: by source address; a STUN request from an address not seen yet
//! (or any STUN request, so a reused address follows its new owner) is
//! routed by the ICE ufrag it names, which workers publish here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::batch::RxBatch;
use super::demux::UfragRoutes;
use super::stun;
use super::udp::UdpRx;
use crate::metrics::MediaCounters;

/// Datagrams a worker may have waiting before the dispatcher drops for it
/// (a worker that far behind is overloaded; dropping keeps the others
/// going).
const INBOX_LIMIT: usize = 16 * 1024;
/// Address routes not refreshed for this long are forgotten (ICE consent
/// checks refresh live ones every few seconds).
const ROUTE_IDLE: Duration = Duration::from_secs(60);

/// A worker's mailbox.
#[derive(Default)]
pub struct Inbox {
    batch: Mutex<RxBatch>,
    pub notify: tokio::sync::Notify,
}

impl Inbox {
    /// Move `from` in (swapping buffers when the inbox is empty). Returns
    /// how many datagrams were dropped because the worker is too far behind.
    fn deliver(&self, from: &mut RxBatch) -> usize {
        let Ok(mut b) = self.batch.lock() else {
            return from.len();
        };
        let mut dropped = 0;
        if b.is_empty() {
            std::mem::swap(&mut *b, from);
        } else if b.len() + from.len() > INBOX_LIMIT {
            dropped = from.len();
        } else {
            b.append(from);
        }
        drop(b);
        from.clear();
        self.notify.notify_one();
        dropped
    }

    /// Take everything waiting into `into` (which must be empty).
    pub fn take(&self, into: &mut RxBatch) {
        if let Ok(mut b) = self.batch.lock() {
            std::mem::swap(&mut *b, into);
        }
    }
}

/// The dispatcher thread's loop; returns when `stop` is set.
pub fn run(
    mut rx: UdpRx,
    fd: std::os::fd::RawFd,
    inboxes: Vec<Arc<Inbox>>,
    routes: UfragRoutes,
    counters: Arc<MediaCounters>,
    stop: Arc<AtomicBool>,
) {
    let mut by_addr: HashMap<SocketAddr, (usize, Instant)> = HashMap::new();
    let mut pending: Vec<RxBatch> = inboxes.iter().map(|_| RxBatch::default()).collect();
    let mut next_sweep = Instant::now() + ROUTE_IDLE;
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own; the fd outlives this thread.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        let mut now = Instant::now();
        loop {
            let n = rx.recv_batch_or_log();
            if n == 0 {
                break;
            }
            now = Instant::now();
            let mut unroutable = 0;
            for i in 0..n {
                let d = rx.datagram(i);
                // STUN (first two bits 0) names its ufrag: it decides.
                let by_ufrag = stun::local_ufrag(d.data)
                    .and_then(|u| routes.read().ok().and_then(|r| r.get(u).copied()));
                let worker = match by_ufrag {
                    Some(w) => {
                        by_addr.insert(d.source, (w, now));
                        Some(w)
                    }
                    None => by_addr.get_mut(&d.source).map(|e| {
                        e.1 = now;
                        e.0
                    }),
                };
                match worker.and_then(|w| pending.get_mut(w)) {
                    Some(b) => b.push(&d, now),
                    None => unroutable += 1,
                }
            }
            let mut dropped = 0;
            for (w, b) in pending.iter_mut().enumerate() {
                if !b.is_empty() {
                    dropped += inboxes[w].deliver(b);
                }
            }
            let c = &counters;
            MediaCounters::add(&c.udp_datagrams_in, n as u64);
            if unroutable > 0 {
                MediaCounters::add(&c.udp_unroutable, unroutable);
            }
            if dropped > 0 {
                MediaCounters::add(&c.udp_overload_drops, dropped as u64);
            }
        }
        if now >= next_sweep {
            next_sweep = now + ROUTE_IDLE;
            by_addr.retain(|_, (_, seen)| now.duration_since(*seen) < ROUTE_IDLE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Datagram, Proto};

    fn dgram(data: &[u8]) -> Datagram<'_> {
        Datagram {
            proto: Proto::Udp,
            source: "10.0.0.1:5000".parse().expect("addr"),
            destination: "10.0.0.2:7882".parse().expect("addr"),
            data,
        }
    }

    #[test]
    fn batches_swap_then_append() {
        let inbox = Inbox::default();
        let mut a = RxBatch::default();
        let t = Instant::now();
        a.push(&dgram(b"one"), t);
        a.push(&dgram(b"two"), t);
        assert_eq!(inbox.deliver(&mut a), 0);
        assert!(a.is_empty());
        a.push(&dgram(b"three"), t);
        inbox.deliver(&mut a);
        let mut got = RxBatch::default();
        inbox.take(&mut got);
        let all: Vec<&[u8]> = (0..got.len()).map(|i| got.get(i).0.data).collect();
        assert_eq!(all, [&b"one"[..], b"two", b"three"]);
        let mut again = RxBatch::default();
        inbox.take(&mut again);
        assert!(again.is_empty());
    }
}
