//! A worker's input: its UDP datagrams (read from the socket itself when it
//! is the only worker, else handed over by the dispatcher), its TCP
//! connections' frames, and connections the acceptor hands it. All of it
//! reaches the engine as datagrams, a batch at a time.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Registry};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc::UnboundedReceiver;

use super::batch::RxBatch;
use super::dispatch::Inbox;
use super::tcp::Handoff;
use super::udp::{UdpRx, BATCH};
use super::Sink;
use crate::metrics::MediaCounters;

/// UDP batches read before the worker's other work gets a turn.
const BATCHES_PER_TURN: usize = 16;

enum Udp {
    Socket {
        socket: std::net::UdpSocket,
        rx: Box<UdpRx>,
    },
    Inbox {
        inbox: Arc<Inbox>,
        /// Keeps the shared socket open for this worker's sends.
        socket: Arc<std::net::UdpSocket>,
    },
}

const READABLE: Interest = Interest::READABLE;

/// A worker's input before it is attached to the worker's runtime.
pub struct InletParts {
    udp: Udp,
    poll: Poll,
    handoffs: UnboundedReceiver<Handoff>,
    counters: Arc<MediaCounters>,
}

impl InletParts {
    pub(super) fn direct(
        socket: std::net::UdpSocket,
        rx: UdpRx,
        handoffs: UnboundedReceiver<Handoff>,
        counters: Arc<MediaCounters>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            udp: Udp::Socket {
                socket,
                rx: Box::new(rx),
            },
            poll: Poll::new()?,
            handoffs,
            counters,
        })
    }

    pub(super) fn inbox(
        inbox: Arc<Inbox>,
        socket: Arc<std::net::UdpSocket>,
        handoffs: UnboundedReceiver<Handoff>,
        counters: Arc<MediaCounters>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            udp: Udp::Inbox { inbox, socket },
            poll: Poll::new()?,
            handoffs,
            counters,
        })
    }

    /// Where the worker's TCP connections are registered.
    pub(super) fn tcp_registry(&self) -> std::io::Result<Registry> {
        self.poll.registry().try_clone()
    }

    /// Register with the calling thread's tokio runtime.
    pub fn attach(self) -> std::io::Result<Inlet> {
        let udp = match self.udp {
            Udp::Socket { socket, rx } => UdpIn::Socket {
                // SAFETY: the AsyncFd owns the socket, so its descriptor
                // stays open for the registration's life.
                afd: unsafe { AsyncFd::register_with_interest(socket, READABLE)? },
                rx,
                more: false,
            },
            Udp::Inbox { inbox, socket } => UdpIn::Inbox {
                inbox,
                _socket: socket,
            },
        };
        let fd = PollFd(self.poll.as_raw_fd());
        Ok(Inlet {
            udp,
            // SAFETY: the Poll owning the descriptor is dropped after this
            // registration (field order in `Inlet`).
            tcp_ready: unsafe { AsyncFd::register_with_interest(fd, READABLE)? },
            poll: self.poll,
            events: Events::with_capacity(256),
            handoffs: Some(self.handoffs),
            batch: RxBatch::default(),
            counters: self.counters,
        })
    }
}

/// The mio poll's descriptor, watched by tokio; the `Poll` owns it.
struct PollFd(RawFd);

impl AsRawFd for PollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

enum UdpIn {
    Socket {
        afd: AsyncFd<std::net::UdpSocket>,
        rx: Box<UdpRx>,
        /// The last turn stopped with datagrams still waiting.
        more: bool,
    },
    Inbox {
        inbox: Arc<Inbox>,
        _socket: Arc<std::net::UdpSocket>,
    },
}

impl UdpIn {
    async fn wait(&mut self) -> std::io::Result<()> {
        match self {
            UdpIn::Socket { afd, more, .. } => {
                if !*more {
                    // Cleared before reading: a datagram arriving after the
                    // last read makes a new edge, so none is left unseen.
                    afd.readable().await?.clear_ready();
                }
            }
            UdpIn::Inbox { inbox, .. } => inbox.notify.notified().await,
        }
        Ok(())
    }
}

/// A worker's input, attached to its runtime.
pub struct Inlet {
    udp: UdpIn,
    /// Declared before `poll`: deregistered before the descriptor closes.
    tcp_ready: AsyncFd<PollFd>,
    poll: Poll,
    events: Events,
    /// None once the acceptor is gone (ICE-TCP off, or shutting down).
    handoffs: Option<UnboundedReceiver<Handoff>>,
    batch: RxBatch,
    counters: Arc<MediaCounters>,
}

enum Woke {
    Udp,
    Tcp,
    Handoff(Option<Handoff>),
}

impl Inlet {
    /// Wait for input, then feed it to `sink`. Cancelled only while
    /// waiting: everything after is synchronous.
    pub async fn read<T: Copy>(&mut self, sink: &mut impl Sink<T>) -> std::io::Result<()> {
        let woke = {
            let (udp, tcp_ready, handoffs) = (&mut self.udp, &self.tcp_ready, &mut self.handoffs);
            // Not biased: under a steady UDP load the UDP branch is always
            // ready, and TCP connections must still get their turns.
            tokio::select! {
                r = udp.wait() => { r?; Woke::Udp }
                r = tcp_ready.readable() => { r?.clear_ready(); Woke::Tcp }
                h = async {
                    match handoffs {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => Woke::Handoff(h),
            }
        };
        match woke {
            Woke::Udp => self.read_udp(sink),
            Woke::Tcp => self.read_tcp(sink)?,
            Woke::Handoff(Some(h)) => {
                sink.transport()
                    .tcp
                    .adopt(h, &mut self.batch, Instant::now());
                self.feed(sink);
            }
            Woke::Handoff(None) => self.handoffs = None,
        }
        Ok(())
    }

    fn read_udp<T: Copy>(&mut self, sink: &mut impl Sink<T>) {
        match &mut self.udp {
            UdpIn::Socket { rx, more, .. } => {
                *more = false;
                for turn in 0..BATCHES_PER_TURN {
                    let n = rx.recv_batch_or_log();
                    if n == 0 {
                        break;
                    }
                    let now = Instant::now();
                    for i in 0..n {
                        sink.datagram(rx.datagram(i), now);
                    }
                    MediaCounters::add(&self.counters.udp_datagrams_in, n as u64);
                    sink.flush();
                    *more = turn == BATCHES_PER_TURN - 1;
                }
            }
            UdpIn::Inbox { inbox, .. } => {
                inbox.take(&mut self.batch);
                self.feed(sink);
            }
        }
    }

    fn read_tcp<T: Copy>(&mut self, sink: &mut impl Sink<T>) -> std::io::Result<()> {
        // Tokio sees only the inner poll's edges: drain it.
        loop {
            if let Err(e) = self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if self.events.is_empty() {
                break;
            }
            let now = Instant::now();
            let tcp = &mut sink.transport().tcp;
            for ev in self.events.iter() {
                let key = ev.token().0;
                if ev.is_writable() {
                    tcp.writable(key);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    tcp.readable(key, &mut self.batch, now);
                }
            }
        }
        self.feed(sink);
        Ok(())
    }

    /// Hand the batch to the engine, flushing as often as a socket read would.
    fn feed<T: Copy>(&mut self, sink: &mut impl Sink<T>) {
        for i in 0..self.batch.len() {
            let (d, at) = self.batch.get(i);
            sink.datagram(d, at);
            if i % BATCH == BATCH - 1 {
                sink.flush();
            }
        }
        self.batch.clear();
        sink.transport().reap();
        sink.flush();
    }
}
