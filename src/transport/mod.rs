//! The transport layer: every socket media arrives on or leaves by (the
//! node's one UDP port, and ICE over TCP), and the demultiplexing of what
//! arrives to the peer connection it belongs to. The media engine sees
//! datagrams, whatever path they came on, and hands back what it wants sent.
//!
//! Per forwarding worker there are two halves: the [`Transport`] (sending,
//! the worker's TCP connections, and the demux tables), which the engine
//! owns and calls, and the [`Inlet`], which waits for input and feeds it to
//! the engine through [`Sink`]. Shared threads: the UDP dispatcher (several
//! workers only, [`dispatch`]) and the TCP acceptor ([`tcp`]).

pub mod batch;
pub mod demux;
pub mod dispatch;
mod inlet;
pub mod stun;
pub mod tcp;
pub mod turn;
pub mod udp;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

pub use batch::RxBatch;
pub use demux::{Demux, Route, UfragRoutes};
pub use inlet::{Inlet, InletParts};

use crate::metrics::MediaCounters;

/// How a datagram travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Udp,
    /// ICE over TCP: one RFC 4571 frame.
    Tcp,
}

/// One datagram (UDP) or frame (TCP) as received.
pub struct Datagram<'a> {
    pub proto: Proto,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub data: &'a [u8],
}

/// A remote end of a path: the demux key.
pub type Path = (Proto, SocketAddr);

/// What the engine does with input; the [`Inlet`] calls it.
pub trait Sink<T: Copy> {
    /// One datagram, read at `at`.
    fn datagram(&mut self, d: Datagram<'_>, at: Instant);
    /// End of a batch: send what it produced.
    fn flush(&mut self);
    fn transport(&mut self) -> &mut Transport<T>;
}

/// A worker's sending side, its TCP connections, and its demux tables
/// (`T`: what a path leads to, the engine's peer reference).
pub struct Transport<T: Copy> {
    pub udp: udp::UdpTx,
    pub tcp: tcp::TcpConns,
    pub demux: Demux<T>,
}

impl<T: Copy> Transport<T> {
    /// Queue one datagram on the path `proto` names; never blocks.
    #[inline]
    pub fn send(&mut self, proto: Proto, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        match proto {
            Proto::Udp => self.udp.send(from, to, data),
            Proto::Tcp => self.tcp.send(to, data),
        }
    }

    /// Send everything queued.
    pub fn flush(&mut self, counters: &MediaCounters) {
        self.udp.flush();
        self.tcp.flush();
        let u = &mut self.udp;
        MediaCounters::add(&counters.udp_send_drops, std::mem::take(&mut u.send_drops));
        MediaCounters::add(
            &counters.udp_gso_datagrams,
            std::mem::take(&mut u.gso_segments),
        );
        MediaCounters::add(
            &counters.udp_gso_messages,
            std::mem::take(&mut u.gso_messages),
        );
        if std::mem::take(&mut u.gso_refused) {
            tracing::warn!("the kernel refused a UDP GSO send: this worker sends datagrams one by one from now on");
        }
    }

    /// A peer is gone: forget its paths and close its TCP connections.
    pub fn forget(&mut self, paths: &[Path], owned: impl Fn(&T) -> bool) {
        for p in paths {
            if self.demux.forget_path(p, &owned) && p.0 == Proto::Tcp {
                self.tcp.close_remote(p.1);
            }
        }
    }

    /// Periodic: close idle or failed TCP connections.
    pub fn sweep(&mut self, now: Instant) {
        self.tcp.sweep(now);
        self.reap();
    }

    /// Forget the paths of TCP connections that closed.
    pub fn reap(&mut self) {
        let Transport { tcp, demux, .. } = self;
        for remote in tcp.take_closed() {
            demux.forget_path(&(Proto::Tcp, remote), |_| true);
        }
    }
}

/// What [`start`] builds: per worker its two halves, and the threads
/// shared by all (stopped by `stop`).
pub struct Started<T: Copy> {
    pub workers: Vec<(InletParts, Transport<T>)>,
    pub threads: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
    pub stop: Arc<AtomicBool>,
}

/// Set up the node's transport for `workers` forwarding workers: a
/// dispatcher thread when there are several, the ICE-TCP acceptor when
/// `tcp` is given.
pub fn start<T: Copy>(
    udp: udp::UdpIo,
    tcp: Option<(std::net::TcpListener, tcp::TcpLimits)>,
    workers: usize,
    counters: Arc<MediaCounters>,
) -> std::io::Result<Started<T>> {
    let workers = workers.max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let routes: UfragRoutes = Default::default();
    let mut threads = Vec::new();
    let spawn = |name: &str, f: Box<dyn FnOnce() -> std::io::Result<()> + Send>| {
        std::thread::Builder::new().name(name.into()).spawn(f)
    };

    // TCP: the acceptor hands each connection to the worker owning its ufrag.
    let mut handoffs = Vec::with_capacity(workers);
    let mut handoff_rx = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        handoffs.push(tx);
        handoff_rx.push(rx);
    }
    let limits = tcp.as_ref().map(|(_, l)| l.clone()).unwrap_or_default();
    if let Some((listener, limits)) = tcp {
        let acceptor = tcp::Acceptor::new(
            listener,
            limits,
            routes.clone(),
            handoffs,
            counters.clone(),
            stop.clone(),
        )?;
        threads.push(spawn(
            "moselle-tcp-accept",
            Box::new(move || acceptor.run()),
        )?);
    }

    let mut out = Vec::with_capacity(workers);
    if workers == 1 {
        let udp::UdpIo { socket, rx, tx } = udp;
        let hrx = handoff_rx.pop().expect("one receiver per worker");
        let inlet = InletParts::direct(socket, rx, hrx, counters.clone())?;
        let transport = Transport {
            udp: tx,
            tcp: tcp::TcpConns::new(inlet.tcp_registry()?, limits, counters.clone()),
            demux: Demux::new(0, routes),
        };
        out.push((inlet, transport));
    } else {
        let inboxes: Vec<Arc<dispatch::Inbox>> = (0..workers).map(|_| Arc::default()).collect();
        let txs: Vec<_> = (0..workers).map(|_| udp.extra_tx()).collect();
        let fd = udp.raw_fd();
        let udp::UdpIo { socket, rx, .. } = udp;
        let socket = Arc::new(socket);
        for (index, (tx, hrx)) in txs.into_iter().zip(handoff_rx).enumerate() {
            let inlet = InletParts::inbox(
                inboxes[index].clone(),
                socket.clone(),
                hrx,
                counters.clone(),
            )?;
            let transport = Transport {
                udp: tx,
                tcp: tcp::TcpConns::new(inlet.tcp_registry()?, limits.clone(), counters.clone()),
                demux: Demux::new(index, routes.clone()),
            };
            out.push((inlet, transport));
        }
        let (s2, c2) = (stop.clone(), counters.clone());
        threads.push(spawn(
            "moselle-udp-rx",
            Box::new(move || {
                // Holds the socket open for as long as it reads.
                let _socket = socket;
                dispatch::run(rx, fd, inboxes, routes, c2, s2);
                Ok(())
            }),
        )?);
    }
    Ok(Started {
        workers: out,
        threads,
        stop,
    })
}
