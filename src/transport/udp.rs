//! The media UDP socket: batched receive (`recvmmsg`) and send (`sendmmsg`)
//! with `IP_PKTINFO`, so one socket bound to 0.0.0.0 still knows which local
//! address each packet came in on and answers from that address.
//!
//! Buffers are allocated once; a batch costs two syscalls and no allocation.
//!
//! Sending uses UDP GSO where the kernel has it: consecutive queued datagrams
//! to one address, all of one size but a shorter last one (the packets of a
//! video frame to one subscriber), leave as one message with `UDP_SEGMENT`,
//! and the kernel cuts it into datagrams after one trip through the stack.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

use super::{Datagram, Proto};

/// Datagrams per syscall.
pub const BATCH: usize = 64;
/// Largest datagram we take; WebRTC keeps well under this.
pub const MAX_DATAGRAM: usize = 2048;
const CMSG_SPACE: usize = 64;
/// Datagrams in one GSO message (the kernel's `UDP_MAX_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes in one GSO message: an IPv4 datagram's payload limit, less headroom.
const GSO_MAX_BYTES: usize = 65_000;

/// The socket and its two halves; the halves borrow independently so the
/// receive batch can be read while answers are queued.
pub struct UdpIo {
    pub socket: std::net::UdpSocket,
    pub rx: UdpRx,
    pub tx: UdpTx,
}

pub struct UdpRx {
    fd: RawFd,
    port: u16,
    bound_ip: Ipv4Addr,
    rx_bufs: Box<[[u8; MAX_DATAGRAM]]>,
    rx_names: Box<[libc::sockaddr_in]>,
    rx_ctrl: Box<[[u8; CMSG_SPACE]]>,
    rx_lens: [usize; BATCH],
    rx_dst: [Ipv4Addr; BATCH],
    rx_count: usize,
}

pub struct UdpTx {
    fd: RawFd,
    bound_ip: Ipv4Addr,
    tx_bufs: Box<[[u8; MAX_DATAGRAM]]>,
    tx_lens: [usize; BATCH],
    tx_to: Box<[libc::sockaddr_in]>,
    tx_from: [Ipv4Addr; BATCH],
    tx_ctrl: Box<[[u8; CMSG_SPACE]]>,
    tx_count: usize,
    /// Coalesce runs of datagrams with `UDP_SEGMENT`; off when the kernel
    /// lacks it, refused it, or the operator turned it off.
    gso: bool,
    /// Datagrams the kernel would not take (full buffer) or that were too big.
    pub send_drops: u64,
    /// Datagrams sent inside GSO messages, and GSO messages sent.
    pub gso_segments: u64,
    pub gso_messages: u64,
    /// The kernel refused a GSO message: from then on, one by one.
    pub gso_refused: bool,
}

fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut s: libc::sockaddr_in = unsafe { zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    ))
}

/// Whether this socket's kernel has UDP GSO (Linux 4.18 and later).
fn gso_supported(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers to an int and its length.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        ) == 0
    }
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passing a valid pointer to an int of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl UdpIo {
    /// Bind an IPv4 UDP socket (non-blocking, `IP_PKTINFO` on).
    pub fn bind(ip: IpAddr, port: u16) -> io::Result<UdpIo> {
        let IpAddr::V4(v4) = ip else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the media socket binds IPv4 addresses only",
            ));
        };
        let socket = std::net::UdpSocket::bind(SocketAddrV4::new(v4, port))?;
        socket.set_nonblocking(true)?;
        let fd = socket.as_raw_fd();
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        // Bigger kernel buffers absorb bursts between batches; best effort.
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
        let port = socket.local_addr()?.port();
        // SAFETY: sockaddr_in is plain old data.
        let zero_sa: libc::sockaddr_in = unsafe { zeroed() };
        let rx = UdpRx {
            fd,
            port,
            bound_ip: v4,
            rx_bufs: vec![[0u8; MAX_DATAGRAM]; BATCH].into_boxed_slice(),
            rx_names: vec![zero_sa; BATCH].into_boxed_slice(),
            rx_ctrl: vec![[0u8; CMSG_SPACE]; BATCH].into_boxed_slice(),
            rx_lens: [0; BATCH],
            rx_dst: [Ipv4Addr::UNSPECIFIED; BATCH],
            rx_count: 0,
        };
        let tx = UdpTx::new(fd, v4, gso_supported(fd));
        Ok(UdpIo { socket, rx, tx })
    }

    /// Another sender on the same socket, with buffers of its own: each
    /// forwarding worker sends its batches itself (sendmmsg on one socket
    /// from several threads is safe; each call is atomic).
    pub fn extra_tx(&self) -> UdpTx {
        UdpTx::new(self.rx.fd, self.rx.bound_ip, self.tx.gso)
    }

    /// Turn GSO off (or back on, where the kernel has it), for this sender
    /// and every [`Self::extra_tx`] made after.
    pub fn set_gso(&mut self, on: bool) {
        self.tx.gso = on && gso_supported(self.rx.fd);
    }

    /// Whether sends coalesce with GSO.
    pub fn gso(&self) -> bool {
        self.tx.gso
    }

    pub fn local_port(&self) -> u16 {
        self.rx.port
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl UdpRx {
    /// Receive up to [`BATCH`] datagrams; `Ok(0)` when none are waiting.
    pub fn recv_batch(&mut self) -> io::Result<usize> {
        // SAFETY: every pointer below points into buffers owned by self that
        // outlive the syscall; lengths match the buffers.
        unsafe {
            let mut iovs: [libc::iovec; BATCH] = zeroed();
            let mut msgs: [libc::mmsghdr; BATCH] = zeroed();
            for i in 0..BATCH {
                iovs[i].iov_base = self.rx_bufs[i].as_mut_ptr() as *mut libc::c_void;
                iovs[i].iov_len = MAX_DATAGRAM;
                let h = &mut msgs[i].msg_hdr;
                h.msg_name = &mut self.rx_names[i] as *mut _ as *mut libc::c_void;
                h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
                h.msg_control = self.rx_ctrl[i].as_mut_ptr() as *mut libc::c_void;
                h.msg_controllen = CMSG_SPACE as _;
            }
            let n = libc::recvmmsg(
                self.fd,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            );
            if n < 0 {
                let e = io::Error::last_os_error();
                self.rx_count = 0;
                return if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(0)
                } else {
                    Err(e)
                };
            }
            let n = n as usize;
            for (i, msg) in msgs.iter().enumerate().take(n) {
                self.rx_lens[i] = msg.msg_len as usize;
                self.rx_dst[i] = self.bound_ip;
                let h = &msg.msg_hdr;
                let mut c = libc::CMSG_FIRSTHDR(h);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                        let info = libc::CMSG_DATA(c) as *const libc::in_pktinfo;
                        let info = std::ptr::read_unaligned(info);
                        self.rx_dst[i] = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                    }
                    c = libc::CMSG_NXTHDR(h, c);
                }
            }
            self.rx_count = n;
            Ok(n)
        }
    }

    /// As [`Self::recv_batch`], an error logged and read as "nothing
    /// waiting" (the socket stays; the next readiness tries again).
    pub fn recv_batch_or_log(&mut self) -> usize {
        self.recv_batch().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "media socket receive failed");
            0
        })
    }

    /// The `i`th datagram of the last batch.
    pub fn datagram(&self, i: usize) -> Datagram<'_> {
        Datagram {
            proto: Proto::Udp,
            source: from_sockaddr(&self.rx_names[i]),
            destination: SocketAddr::new(IpAddr::V4(self.rx_dst[i]), self.port),
            data: &self.rx_bufs[i][..self.rx_lens[i].min(MAX_DATAGRAM)],
        }
    }
}

impl UdpTx {
    fn new(fd: RawFd, bound_ip: Ipv4Addr, gso: bool) -> UdpTx {
        // SAFETY: sockaddr_in is plain old data.
        let zero_sa: libc::sockaddr_in = unsafe { zeroed() };
        UdpTx {
            fd,
            bound_ip,
            tx_bufs: vec![[0u8; MAX_DATAGRAM]; BATCH].into_boxed_slice(),
            tx_lens: [0; BATCH],
            tx_to: vec![zero_sa; BATCH].into_boxed_slice(),
            tx_from: [Ipv4Addr::UNSPECIFIED; BATCH],
            tx_ctrl: vec![[0u8; CMSG_SPACE]; BATCH].into_boxed_slice(),
            tx_count: 0,
            gso,
            send_drops: 0,
            gso_segments: 0,
            gso_messages: 0,
            gso_refused: false,
        }
    }

    /// Queue a datagram; flushes by itself when the batch is full.
    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let (SocketAddr::V4(to), IpAddr::V4(from_ip)) = (to, from.ip()) else {
            self.send_drops += 1;
            return;
        };
        if data.len() > MAX_DATAGRAM {
            self.send_drops += 1;
            return;
        }
        if self.tx_count == BATCH {
            self.flush();
        }
        let i = self.tx_count;
        self.tx_bufs[i][..data.len()].copy_from_slice(data);
        self.tx_lens[i] = data.len();
        self.tx_to[i] = to_sockaddr(to);
        self.tx_from[i] = from_ip;
        self.tx_count += 1;
    }

    /// Where the message starting at datagram `i` ends: past the run of
    /// datagrams GSO can carry with it (just `i + 1` without GSO).
    fn run_end(&self, i: usize) -> usize {
        let mut j = i + 1;
        let size = self.tx_lens[i];
        if !self.gso || size == 0 {
            return j;
        }
        let (to, from) = (&self.tx_to[i], self.tx_from[i]);
        let mut bytes = size;
        while j < self.tx_count && j - i < GSO_MAX_SEGMENTS {
            let len = self.tx_lens[j];
            let t = &self.tx_to[j];
            if len > size
                || bytes + len > GSO_MAX_BYTES
                || t.sin_addr.s_addr != to.sin_addr.s_addr
                || t.sin_port != to.sin_port
                || self.tx_from[j] != from
            {
                break;
            }
            bytes += len;
            j += 1;
            if len < size {
                // Only the last segment may be shorter.
                break;
            }
        }
        j
    }

    /// Send everything queued. Datagrams the kernel refuses are dropped
    /// (and counted): UDP gives no delivery promise and we never block.
    pub fn flush(&mut self) {
        let mut start = 0;
        // Per message: the datagrams it carries, [first, end).
        let mut spans = [(0usize, 0usize); BATCH];
        while start < self.tx_count {
            let mut count = 0;
            // SAFETY: as in recv_batch, pointers target buffers owned by self;
            // each message's iovecs are its datagrams' slots in `iovs`.
            let sent = unsafe {
                let mut iovs: [libc::iovec; BATCH] = zeroed();
                let mut msgs: [libc::mmsghdr; BATCH] = zeroed();
                let mut i = start;
                while i < self.tx_count {
                    let end = self.run_end(i);
                    for (d, iov) in iovs.iter_mut().enumerate().take(end).skip(i) {
                        iov.iov_base = self.tx_bufs[d].as_mut_ptr() as *mut libc::c_void;
                        iov.iov_len = self.tx_lens[d];
                    }
                    let h = &mut msgs[count].msg_hdr;
                    h.msg_name = &mut self.tx_to[i] as *mut _ as *mut libc::c_void;
                    h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                    h.msg_iov = &mut iovs[i];
                    h.msg_iovlen = (end - i) as _;
                    let pktinfo =
                        self.bound_ip.is_unspecified() && !self.tx_from[i].is_unspecified();
                    let segment = end - i > 1;
                    if pktinfo || segment {
                        let ctrl = &mut self.tx_ctrl[i];
                        ctrl.fill(0);
                        h.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
                        let mut space = 0;
                        if pktinfo {
                            space += libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32);
                        }
                        if segment {
                            space += libc::CMSG_SPACE(size_of::<u16>() as u32);
                        }
                        h.msg_controllen = space as _;
                        let mut c = libc::CMSG_FIRSTHDR(h);
                        if pktinfo {
                            // Answer from the address the peer talks to.
                            (*c).cmsg_level = libc::IPPROTO_IP;
                            (*c).cmsg_type = libc::IP_PKTINFO;
                            (*c).cmsg_len =
                                libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                            let mut info: libc::in_pktinfo = zeroed();
                            info.ipi_spec_dst.s_addr = u32::from(self.tx_from[i]).to_be();
                            std::ptr::write_unaligned(
                                libc::CMSG_DATA(c) as *mut libc::in_pktinfo,
                                info,
                            );
                            c = libc::CMSG_NXTHDR(h, c);
                        }
                        if segment {
                            (*c).cmsg_level = libc::SOL_UDP;
                            (*c).cmsg_type = libc::UDP_SEGMENT;
                            (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                            std::ptr::write_unaligned(
                                libc::CMSG_DATA(c) as *mut u16,
                                self.tx_lens[i] as u16,
                            );
                        }
                    }
                    spans[count] = (i, end);
                    count += 1;
                    i = end;
                }
                libc::sendmmsg(self.fd, msgs.as_mut_ptr(), count as u32, libc::MSG_DONTWAIT)
            };
            if sent > 0 {
                for &(a, b) in &spans[..sent as usize] {
                    if b - a > 1 {
                        self.gso_messages += 1;
                        self.gso_segments += (b - a) as u64;
                    }
                }
                start = spans[sent as usize - 1].1;
                continue;
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                // Kernel buffer full: drop the rest rather than block.
                self.send_drops += (self.tx_count - start) as u64;
                break;
            }
            let (a, b) = spans[0];
            if b - a > 1 && matches!(err.raw_os_error(), Some(libc::EIO | libc::EINVAL)) {
                // The kernel or the device cannot segment (no checksum
                // offload on the route, a segment over the path MTU): send
                // one by one from now on, this run included.
                self.gso = false;
                self.gso_refused = true;
                continue;
            }
            // This message was refused (unreachable, filtered, ...): skip
            // its datagrams and send the others.
            self.send_drops += (b - a) as u64;
            start = b;
        }
        self.tx_count = 0;
    }

    pub fn pending(&self) -> usize {
        self.tx_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip_reports_destination() {
        let mut a = UdpIo::bind(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let a_addr: SocketAddr = format!("127.0.0.1:{}", a.local_port()).parse().unwrap();
        for i in 0..3u8 {
            b.send_to(&[i; 10], a_addr).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let n = a.rx.recv_batch().unwrap();
        assert_eq!(n, 3);
        let d = a.rx.datagram(2);
        assert_eq!(d.data, &[2u8; 10]);
        assert_eq!(d.destination, a_addr);
        assert_eq!(d.source, b.local_addr().unwrap());
        a.tx.send(a_addr, b.local_addr().unwrap(), b"pong");
        a.tx.flush();
        let mut buf = [0u8; 16];
        b.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from, a_addr);
        assert_eq!(a.rx.recv_batch().unwrap(), 0);
    }

    /// Sends `plan` (receiver index, size, fill byte) and returns what each
    /// receiver got, in order, and the sender's GSO counts.
    fn send_plan(gso: bool, plan: &[(usize, usize, u8)]) -> (Vec<Vec<Vec<u8>>>, u64, u64) {
        let mut a = UdpIo::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), 0).unwrap();
        a.set_gso(gso);
        assert_eq!(a.gso(), gso, "this kernel must have UDP GSO (Linux 4.18+)");
        let from: SocketAddr = format!("127.0.0.1:{}", a.local_port()).parse().unwrap();
        let rx: Vec<_> = (0..2)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for &(r, size, fill) in plan {
            a.tx.send(from, rx[r].local_addr().unwrap(), &vec![fill; size]);
        }
        a.tx.flush();
        assert_eq!(a.tx.send_drops, 0);
        let got = rx
            .iter()
            .enumerate()
            .map(|(r, sock)| {
                sock.set_read_timeout(Some(std::time::Duration::from_secs(1)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                (0..plan.iter().filter(|p| p.0 == r).count())
                    .map(|_| {
                        let n = sock.recv(&mut buf).unwrap();
                        buf[..n].to_vec()
                    })
                    .collect()
            })
            .collect();
        (got, a.tx.gso_messages, a.tx.gso_segments)
    }

    #[test]
    fn gso_sends_runs_of_one_size_to_one_address_as_single_messages() {
        // A frame of five full packets and a short one to receiver 0, three
        // to receiver 1, one more to receiver 0: two GSO messages and one
        // plain datagram, and every datagram arrives whole and in order.
        let mut plan: Vec<(usize, usize, u8)> = (0..5).map(|i| (0, 1000, i)).collect();
        plan.push((0, 300, 5));
        plan.extend((0..3).map(|i| (1, 500, 10 + i)));
        plan.push((0, 1000, 20));
        for gso in [true, false] {
            let (got, messages, segments) = send_plan(gso, &plan);
            for (r, got) in got.iter().enumerate() {
                let want: Vec<Vec<u8>> = plan
                    .iter()
                    .filter(|p| p.0 == r)
                    .map(|&(_, size, fill)| vec![fill; size])
                    .collect();
                assert_eq!(*got, want, "receiver {r}, gso {gso}");
            }
            assert_eq!((messages, segments), if gso { (2, 9) } else { (0, 0) });
        }
    }

    #[test]
    fn gso_runs_stop_at_a_larger_datagram_and_at_64_segments() {
        // 70 of one size: 64 in one message, the other 6 in a second. Then
        // a larger one starts a message of its own.
        let mut plan: Vec<(usize, usize, u8)> = (0..70).map(|i| (0, 200, i as u8)).collect();
        plan.push((0, 201, 99));
        plan.push((0, 201, 100));
        let (got, messages, segments) = send_plan(true, &plan);
        assert_eq!(got[0].len(), 72);
        assert!(got[0]
            .iter()
            .zip(&plan)
            .all(|(g, p)| g.len() == p.1 && g[0] == p.2));
        assert_eq!((messages, segments), (3, 72));
    }
}
