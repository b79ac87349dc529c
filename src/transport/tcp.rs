//! ICE over TCP (RFC 6544), passive side, with RFC 4571 framing: every
//! packet preceded by its length in two bytes.
//!
//! The acceptor thread takes new connections and holds each until its first
//! frame, which must be a STUN binding request naming a local ufrag the node
//! knows; it then hands the connection to the worker owning that peer, the
//! same routing a new UDP path gets. From then on the worker owns it: its
//! frames are datagrams like any other, and what str0m sends is framed onto
//! it without ever blocking the worker. A frame that does not fit the
//! connection's output buffer is dropped and counted, as a full UDP socket
//! drops: queueing more behind a stalled stream only adds delay.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;
use tokio::sync::mpsc::UnboundedSender;

use super::batch::RxBatch;
use super::demux::UfragRoutes;
use super::{stun, Datagram, Proto};
use crate::metrics::MediaCounters;

/// Largest frame taken: what a UDP datagram may be (WebRTC stays well
/// under it); a longer length prefix is garbage or an attack.
pub const MAX_FRAME: usize = super::udp::MAX_DATAGRAM;
/// Output held per connection before frames are dropped: about 0.4 s of a
/// 2.5 Mbit/s call.
const OUT_LIMIT: usize = 128 * 1024;
/// Bytes read per read call.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct TcpLimits {
    /// Open connections in all, handed over or not.
    pub max_connections: usize,
    /// Open connections from one source address (a big office behind one
    /// NAT address needs room).
    pub max_per_address: usize,
    /// A new connection must send a valid first STUN request within this.
    pub first_stun_timeout: Duration,
    /// A connection that carried nothing for this long is closed (ICE
    /// consent checks pass every few seconds on a live one).
    pub idle_timeout: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_per_address: 256,
            first_stun_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Open connections, in all and per source address.
struct Census {
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    counters: Arc<MediaCounters>,
}

/// One admitted connection's place in the census, given back on drop.
pub struct Admission {
    census: Arc<Census>,
    ip: IpAddr,
}

impl Census {
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &TcpLimits) -> Option<Admission> {
        let Ok(mut open) = self.open.lock() else {
            return None;
        };
        let (total, per) = &mut *open;
        let here = per.get(&ip).copied().unwrap_or(0);
        if *total >= limits.max_connections || here >= limits.max_per_address {
            return None;
        }
        *total += 1;
        per.insert(ip, here + 1);
        MediaCounters::set(&self.counters.tcp_connections, *total as u64);
        Some(Admission {
            census: self.clone(),
            ip,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Ok(mut open) = self.census.open.lock() {
            let (total, per) = &mut *open;
            *total = total.saturating_sub(1);
            if let Some(n) = per.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&self.ip);
                }
            }
            MediaCounters::set(&self.census.counters.tcp_connections, *total as u64);
        }
    }
}

/// Bytes read from a connection, cut into frames.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    head: usize,
}

#[derive(Debug)]
struct BadFrame;

impl Frames {
    /// One read of up to `chunk` bytes: the count, 0 at end of stream.
    fn read_from(&mut self, s: &mut impl Read, chunk: usize) -> io::Result<usize> {
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + chunk, 0);
        let r = s.read(&mut self.buf[len..]);
        self.buf.truncate(len + *r.as_ref().unwrap_or(&0));
        r
    }

    /// The next whole frame's byte range, consumed.
    fn next(&mut self) -> Result<Option<std::ops::Range<usize>>, BadFrame> {
        let r = self.peek()?;
        if let Some(r) = &r {
            self.head = r.end;
        }
        Ok(r)
    }

    fn peek(&self) -> Result<Option<std::ops::Range<usize>>, BadFrame> {
        let b = &self.buf[self.head..];
        if b.len() < 2 {
            return Ok(None);
        }
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        if n == 0 || n > MAX_FRAME {
            return Err(BadFrame);
        }
        if b.len() < 2 + n {
            return Ok(None);
        }
        let start = self.head + 2;
        Ok(Some(start..start + n))
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.head
    }
}

/// A connection on its way from the acceptor to the worker owning its peer.
pub struct Handoff {
    stream: std::net::TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    frames: Frames,
    admission: Admission,
}

struct Pending {
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    frames: Frames,
    deadline: Instant,
    admission: Admission,
}

const LISTENER: Token = Token(usize::MAX);

/// The thread that takes new connections (see the module comment).
pub struct Acceptor {
    listener: TcpListener,
    poll: Poll,
    limits: TcpLimits,
    census: Arc<Census>,
    routes: UfragRoutes,
    workers: Vec<UnboundedSender<Handoff>>,
    counters: Arc<MediaCounters>,
    stop: Arc<AtomicBool>,
}

impl Acceptor {
    pub fn new(
        listener: std::net::TcpListener,
        limits: TcpLimits,
        routes: UfragRoutes,
        workers: Vec<UnboundedSender<Handoff>>,
        counters: Arc<MediaCounters>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Acceptor> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Acceptor {
            listener,
            poll,
            limits,
            census: Arc::new(Census {
                open: Mutex::new((0, HashMap::new())),
                counters: counters.clone(),
            }),
            routes,
            workers,
            counters,
            stop,
        })
    }

    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        let mut pending: Slab<Pending> = Slab::new();
        let tick = Duration::from_millis(200).min(self.limits.first_stun_timeout);
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(e) = self.poll.poll(&mut events, Some(tick)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                if ev.token() != LISTENER {
                    self.first_frame(&mut pending, ev.token().0);
                }
            }
            // Every turn, not only on the listener's edge: after running out
            // of descriptors no new edge may come for what is queued.
            self.accept_all(&mut pending, now);
            let late: Vec<usize> = pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(k, _)| k)
                .collect();
            for k in late {
                let mut p = pending.remove(k);
                let _ = self.poll.registry().deregister(&mut p.stream);
                MediaCounters::add(&self.counters.tcp_timeouts, 1);
            }
        }
        Ok(())
    }

    fn accept_all(&mut self, pending: &mut Slab<Pending>, now: Instant) {
        loop {
            let (mut stream, remote) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors or the like: leave the rest queued.
                    tracing::warn!(error = %e, "ICE-TCP accept failed");
                    return;
                }
            };
            let Some(admission) = self.census.admit(remote.ip(), &self.limits) else {
                MediaCounters::add(&self.counters.tcp_refused, 1);
                continue;
            };
            MediaCounters::add(&self.counters.tcp_accepted, 1);
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            // Media: never wait to fill a segment.
            let _ = stream.set_nodelay(true);
            let entry = pending.vacant_entry();
            if self
                .poll
                .registry()
                .register(&mut stream, Token(entry.key()), Interest::READABLE)
                .is_err()
            {
                continue;
            }
            entry.insert(Pending {
                stream,
                remote,
                local,
                frames: Frames::default(),
                deadline: now + self.limits.first_stun_timeout,
                admission,
            });
        }
    }

    /// Read what a new connection sent; once a whole first frame is in,
    /// hand it over or close it.
    fn first_frame(&mut self, pending: &mut Slab<Pending>, key: usize) {
        let Some(p) = pending.get_mut(key) else {
            return;
        };
        // One frame is all a new connection may send before it is routed.
        let verdict = loop {
            let room = (2 + MAX_FRAME).saturating_sub(p.frames.buffered());
            if room == 0 {
                break p.frames.peek();
            }
            match p.frames.read_from(&mut p.stream, room) {
                Ok(0) => break Err(BadFrame),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break p.frames.peek(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(BadFrame),
            }
        };
        let bad_length = p.frames.peek().is_err();
        let worker = match verdict {
            Ok(None) => return, // wait for the rest
            Ok(Some(r)) => stun::local_ufrag(&p.frames.buf[r])
                .and_then(|u| self.routes.read().ok().and_then(|m| m.get(u).copied())),
            Err(BadFrame) => None,
        };
        let mut p = pending.remove(key);
        let _ = self.poll.registry().deregister(&mut p.stream);
        let Some(tx) = worker.and_then(|w| self.workers.get(w)) else {
            let counter = if bad_length {
                &self.counters.tcp_bad_frames
            } else {
                &self.counters.tcp_rejected
            };
            MediaCounters::add(counter, 1);
            return;
        };
        // SAFETY: the descriptor moves from one owner to the other.
        let stream = unsafe { std::net::TcpStream::from_raw_fd(p.stream.into_raw_fd()) };
        let _ = tx.send(Handoff {
            stream,
            remote: p.remote,
            local: p.local,
            frames: p.frames,
            admission: p.admission,
        });
    }
}

struct Conn {
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    frames: Frames,
    out: Vec<u8>,
    out_sent: usize,
    /// In `TcpConns::dirty`.
    queued: bool,
    last_rx: Instant,
    failed: bool,
    _admission: Admission,
}

impl Conn {
    /// Frame `data` onto the output, if it fits.
    fn queue(&mut self, data: &[u8]) -> bool {
        let waiting = self.out.len() - self.out_sent;
        if data.len() > u16::MAX as usize || waiting + 2 + data.len() > OUT_LIMIT {
            return false;
        }
        self.out
            .extend_from_slice(&(data.len() as u16).to_be_bytes());
        self.out.extend_from_slice(data);
        true
    }

    /// Write what the kernel takes now.
    fn write_out(&mut self) -> io::Result<()> {
        while self.out_sent < self.out.len() {
            match (&self.stream).write(&self.out[self.out_sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out_sent == self.out.len() {
            self.out.clear();
            self.out_sent = 0;
        } else if self.out_sent >= OUT_LIMIT / 2 {
            self.out.drain(..self.out_sent);
            self.out_sent = 0;
        }
        Ok(())
    }
}

/// A worker's TCP connections.
pub struct TcpConns {
    registry: Registry,
    conns: Slab<Conn>,
    by_remote: HashMap<SocketAddr, usize>,
    dirty: Vec<usize>,
    /// Remote addresses of connections closed since `take_closed`.
    closed: Vec<SocketAddr>,
    limits: TcpLimits,
    counters: Arc<MediaCounters>,
}

impl TcpConns {
    pub fn new(registry: Registry, limits: TcpLimits, counters: Arc<MediaCounters>) -> Self {
        Self {
            registry,
            conns: Slab::new(),
            by_remote: HashMap::new(),
            dirty: Vec::new(),
            closed: Vec::new(),
            limits,
            counters,
        }
    }

    /// Take over a connection from the acceptor; its first frames go to
    /// `batch`.
    pub fn adopt(&mut self, h: Handoff, batch: &mut RxBatch, now: Instant) {
        if h.stream.set_nonblocking(true).is_err() {
            return;
        }
        let mut stream = TcpStream::from_std(h.stream);
        if let Some(old) = self.by_remote.get(&h.remote).copied() {
            self.close(old);
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        // Edge-triggered: anything already waiting is reported at once.
        if self
            .registry
            .register(
                &mut stream,
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return;
        }
        entry.insert(Conn {
            stream,
            remote: h.remote,
            local: h.local,
            frames: h.frames,
            out: Vec::new(),
            out_sent: 0,
            queued: false,
            last_rx: now,
            failed: false,
            _admission: h.admission,
        });
        self.by_remote.insert(h.remote, key);
        self.cut_frames(key, batch, now);
    }

    /// A connection is readable: its frames go to `batch`.
    pub fn readable(&mut self, key: usize, batch: &mut RxBatch, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            match c.frames.read_from(&mut c.stream, READ_CHUNK) {
                Ok(0) => {
                    self.cut_frames(key, batch, now);
                    self.close(key);
                    return;
                }
                Ok(_) => {
                    if !self.cut_frames(key, batch, now) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key);
                    return;
                }
            }
        }
    }

    /// Move whole frames to `batch`; false if the connection was closed for
    /// a bad one.
    fn cut_frames(&mut self, key: usize, batch: &mut RxBatch, now: Instant) -> bool {
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        let mut n = 0;
        loop {
            match c.frames.next() {
                Ok(Some(r)) => {
                    batch.push(
                        &Datagram {
                            proto: Proto::Tcp,
                            source: c.remote,
                            destination: c.local,
                            data: &c.frames.buf[r],
                        },
                        now,
                    );
                    n += 1;
                }
                Ok(None) => break,
                Err(BadFrame) => {
                    MediaCounters::add(&self.counters.tcp_bad_frames, 1);
                    self.close(key);
                    return false;
                }
            }
        }
        if n > 0 {
            c.last_rx = now;
            MediaCounters::add(&self.counters.tcp_frames_in, n);
        }
        true
    }

    /// The kernel takes output again.
    pub fn writable(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if c.write_out().is_err() {
                c.failed = true;
            }
        }
    }

    /// Queue one frame for `to`; never blocks.
    pub fn send(&mut self, to: SocketAddr, data: &[u8]) {
        let Some(key) = self.by_remote.get(&to).copied() else {
            MediaCounters::add(&self.counters.tcp_send_drops, 1);
            return;
        };
        let c = &mut self.conns[key];
        if c.failed || !c.queue(data) {
            MediaCounters::add(&self.counters.tcp_send_drops, 1);
            return;
        }
        if !c.queued {
            c.queued = true;
            self.dirty.push(key);
        }
    }

    /// Write what was queued since the last flush.
    pub fn flush(&mut self) {
        for key in self.dirty.drain(..) {
            if let Some(c) = self.conns.get_mut(key) {
                c.queued = false;
                if c.write_out().is_err() {
                    c.failed = true;
                }
            }
        }
    }

    pub fn close_remote(&mut self, remote: SocketAddr) {
        if let Some(key) = self.by_remote.get(&remote).copied() {
            self.close(key);
        }
    }

    fn close(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let mut c = self.conns.remove(key);
        let _ = self.registry.deregister(&mut c.stream);
        if self.by_remote.get(&c.remote) == Some(&key) {
            self.by_remote.remove(&c.remote);
        }
        self.closed.push(c.remote);
    }

    /// Close failed connections and those idle too long.
    pub fn sweep(&mut self, now: Instant) {
        let idle = self.limits.idle_timeout;
        let stale: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.failed || now.duration_since(c.last_rx) >= idle)
            .map(|(k, c)| (k, !c.failed))
            .collect();
        for (k, timed_out) in stale {
            if timed_out {
                MediaCounters::add(&self.counters.tcp_timeouts, 1);
            }
            self.close(k);
        }
    }

    /// Remote addresses of the connections closed since the last call.
    pub fn take_closed(&mut self) -> std::vec::Drain<'_, SocketAddr> {
        self.closed.drain(..)
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// For the fuzz target (`crate::fuzzing`): `data` read in pieces of the
/// sizes its first byte picks, cut into frames as a connection's are.
#[doc(hidden)]
pub fn fuzz_frames(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut f = Frames::default();
    let mut src = rest;
    loop {
        match f.read_from(&mut src, chunk) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            match f.next() {
                Ok(Some(r)) => assert!(r.end <= f.buf.len() && r.len() <= MAX_FRAME),
                Ok(None) => break,
                Err(BadFrame) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(bytes: &[u8]) -> Frames {
        Frames {
            buf: bytes.to_vec(),
            head: 0,
        }
    }

    #[test]
    fn frames_are_cut_at_their_length() {
        let mut f = frames_of(&[0, 3, b'a', b'b', b'c', 0, 2, b'x']);
        let r = f.next().expect("valid").expect("whole");
        assert_eq!(&f.buf[r], b"abc");
        // The second is not whole yet.
        assert!(f.next().expect("valid").is_none());
        f.buf.push(b'y');
        let r = f.next().expect("valid").expect("whole");
        assert_eq!(&f.buf[r], b"xy");
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn empty_and_oversized_frames_are_refused() {
        assert!(frames_of(&[0, 0]).next().is_err());
        let big = (MAX_FRAME as u16 + 1).to_be_bytes();
        assert!(frames_of(&big).next().is_err());
        let max = (MAX_FRAME as u16).to_be_bytes();
        assert!(frames_of(&max).next().expect("a valid length").is_none());
    }

    /// A peer that stops reading: sending never blocks, what does not fit
    /// is dropped whole and counted, and what was sent still frames.
    #[test]
    fn a_full_connection_drops_whole_frames_without_blocking() {
        let counters: Arc<MediaCounters> = Arc::default();
        let census = Arc::new(Census {
            open: Mutex::new((0, HashMap::new())),
            counters: counters.clone(),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (stream, remote) = listener.accept().expect("accept");
        let poll = Poll::new().expect("poll");
        let mut conns = TcpConns::new(
            poll.registry().try_clone().expect("registry"),
            TcpLimits::default(),
            counters.clone(),
        );
        let admission = census
            .admit(remote.ip(), &TcpLimits::default())
            .expect("admitted");
        let mut batch = RxBatch::default();
        conns.adopt(
            Handoff {
                local: stream.local_addr().expect("local"),
                stream,
                remote,
                frames: Frames::default(),
                admission,
            },
            &mut batch,
            Instant::now(),
        );
        assert_eq!(conns.len(), 1);
        // 40 MB offered to a peer that reads nothing: far beyond any socket
        // buffer. The loop finishing at all shows nothing blocked.
        let frame = [0x5au8; 1000];
        let offered = 40_000;
        let started = Instant::now();
        for _ in 0..offered {
            conns.send(remote, &frame);
            conns.flush();
        }
        let dropped = MediaCounters::get(&counters.tcp_send_drops);
        assert!(dropped > 0, "a full connection must drop");
        assert!(dropped < offered, "what fit must have been sent");
        assert!(started.elapsed() < Duration::from_secs(20));
        // The peer reads while what is queued drains; then the connection
        // closes. Every frame it got is whole.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = peer.read_to_end(&mut got);
            got
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while conns.conns[0].out_sent < conns.conns[0].out.len() && Instant::now() < deadline {
            conns.writable(0);
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(conns);
        let got = reader.join().expect("reader");
        let mut frames = Frames { buf: got, head: 0 };
        let mut whole = 0u64;
        while let Ok(Some(r)) = frames.next() {
            assert!(frames.buf[r].iter().all(|b| *b == 0x5a));
            whole += 1;
        }
        assert_eq!(frames.buffered(), 0, "no partial frame was left");
        assert_eq!(
            whole + dropped,
            offered,
            "each frame was sent whole or dropped"
        );
    }

    #[test]
    fn census_limits_per_address_and_in_all() {
        let census = Arc::new(Census {
            open: Mutex::new((0, HashMap::new())),
            counters: Arc::default(),
        });
        let limits = TcpLimits {
            max_connections: 3,
            max_per_address: 2,
            ..Default::default()
        };
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = census.admit(a, &limits).expect("first");
        let _a2 = census.admit(a, &limits).expect("second");
        assert!(census.admit(a, &limits).is_none(), "per-address limit");
        let _b1 = census.admit(b, &limits).expect("other address");
        assert!(census.admit(b, &limits).is_none(), "total limit");
        drop(a1);
        let b2 = census.admit(b, &limits);
        assert!(b2.is_some(), "released on drop");
        assert_eq!(MediaCounters::get(&census.counters.tcp_connections), 3);
        drop(b2);
        assert_eq!(MediaCounters::get(&census.counters.tcp_connections), 2);
    }
}
