//! The limit, measured in the same run: a minimal UDP relay that does only
//! the per-packet work no SFU can avoid. Each packet is SRTP-decrypted once
//! (AEAD AES-GCM, the profile str0m picks) and re-encrypted for each
//! subscriber under that subscriber's SSRC and sequence number, with the
//! server's own batched socket code (`moselle::transport::udp`: recvmmsg /
//! sendmmsg, 64 per call, and UDP GSO for each subscriber's run of packets
//! where the kernel has it, as the server sends). No ICE, DTLS, RTCP, layer selection or
//! bookkeeping: the SFU's cost divided by this one is its overhead factor.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use moselle::transport::udp::{UdpIo, BATCH};
use serde::Serialize;

use crate::scenario::Measurement;
use crate::stats::thread_cpu_seconds;

const TAG: usize = 16;
const HEADER: usize = 12;
const SALT: [u8; 12] = [7; 12];

#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub received_pps: f64,
    pub fanout: f64,
    pub forwarded_pps: f64,
    pub payload_bytes: usize,
    pub us_per_forwarded: f64,
    pub forwarded_per_cpu_second: f64,
}

fn key(k: u8) -> anyhow::Result<LessSafeKey> {
    let unbound =
        UnboundKey::new(&AES_256_GCM, &[k; 32]).map_err(|_| anyhow::anyhow!("AES-256-GCM key"))?;
    Ok(LessSafeKey::new(unbound))
}

/// RFC 7714 IV: salt XOR (0^16 | SSRC | ROC | SEQ).
fn nonce(ssrc: u32, seq: u16) -> Nonce {
    let mut iv = SALT;
    for (i, b) in ssrc.to_be_bytes().iter().enumerate() {
        iv[2 + i] ^= b;
    }
    for (i, b) in seq.to_be_bytes().iter().enumerate() {
        iv[10 + i] ^= b;
    }
    Nonce::assume_unique_for_key(iv)
}

/// Relay at the rate and fan-out a scenario run had, for `window`.
pub fn measure_like(m: &Measurement, ip: IpAddr) -> anyhow::Result<Baseline> {
    let in_pps = m.server_received_pps.max(50.0);
    let fanout = if m.server_received_pps > 0.0 {
        (m.forwarded_pps / m.server_received_pps).max(1.0)
    } else {
        1.0
    };
    let payload = m.avg_payload_bytes.clamp(50.0, 1200.0) as usize;
    run(
        ip,
        in_pps,
        fanout,
        payload,
        Duration::from_secs_f64(m.window_s.clamp(2.0, 10.0)),
    )
}

pub fn run(
    ip: IpAddr,
    in_pps: f64,
    fanout: f64,
    payload: usize,
    window: Duration,
) -> anyhow::Result<Baseline> {
    let io = UdpIo::bind(ip, 0).context("bind the relay socket")?;
    let relay_addr = SocketAddr::new(ip, io.local_port());
    let stop = Arc::new(AtomicBool::new(false));
    // One receiving socket per subscriber (up to 16), each drained by a
    // thread as a client's would be, so the relay pays the same wake-ups
    // on delivery that the SFU pays toward its subscribers.
    let sinks: Vec<std::net::UdpSocket> = (0..(fanout.ceil() as usize).clamp(1, 16))
        .map(|_| std::net::UdpSocket::bind((ip, 0)))
        .collect::<Result<_, _>>()?;
    let sink_addrs: Vec<SocketAddr> = sinks
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<_, _>>()?;
    let readers: Vec<_> = sinks
        .into_iter()
        .map(|s| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                let mut buf = [0u8; 2048];
                while !stop.load(Relaxed) {
                    let _ = s.recv(&mut buf);
                }
            })
        })
        .collect();
    let forwarded = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));

    let relay = {
        let (stop, forwarded, received) = (stop.clone(), forwarded.clone(), received.clone());
        std::thread::spawn(move || {
            relay_loop(
                io, sink_addrs, relay_addr, fanout, stop, forwarded, received,
            )
        })
    };
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || send_loop(relay_addr, in_pps, payload, stop))
    };
    // Let it settle, then the relay thread measures its own CPU.
    std::thread::sleep(Duration::from_millis(300));
    let (f0, r0) = (forwarded.load(Relaxed), received.load(Relaxed));
    let t0 = Instant::now();
    std::thread::sleep(window);
    let (f1, r1) = (forwarded.load(Relaxed), received.load(Relaxed));
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    let cpu = relay
        .join()
        .map_err(|_| anyhow::anyhow!("relay thread panicked"))??;
    let _ = sender.join();
    for r in readers {
        let _ = r.join();
    }
    // The relay's CPU was read over its whole life; scale to the window by
    // its forwarded count (the rate was steady).
    let fwd = (f1 - f0) as f64;
    let total_fwd = forwarded.load(Relaxed) as f64;
    let cpu_window = if total_fwd > 0.0 {
        cpu * fwd / total_fwd
    } else {
        cpu
    };
    Ok(Baseline {
        received_pps: (r1 - r0) as f64 / dt,
        fanout,
        forwarded_pps: fwd / dt,
        payload_bytes: payload,
        us_per_forwarded: if fwd > 0.0 {
            cpu_window * 1e6 / fwd
        } else {
            f64::NAN
        },
        forwarded_per_cpu_second: if cpu_window > 0.0 {
            fwd / cpu_window
        } else {
            0.0
        },
    })
}

fn relay_loop(
    mut io: UdpIo,
    sinks: Vec<SocketAddr>,
    local: SocketAddr,
    fanout: f64,
    stop: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
) -> anyhow::Result<f64> {
    let cpu0 = thread_cpu_seconds();
    let in_key = key(1)?;
    let out_key = key(2)?;
    // A batch's packets, decrypted once: (header, clear payload) and copies.
    let mut plain = vec![[0u8; 2048]; BATCH];
    let mut clear_lens = [0usize; BATCH];
    let mut copies = [0usize; BATCH];
    let mut out = vec![0u8; 2048];
    // Fractional fan-out: carry the remainder so the average matches.
    let mut carry = 0.0f64;
    let mut out_seq: Vec<u16> = vec![0; fanout.ceil() as usize + 1];
    let fd = io.raw_fd();
    while !stop.load(Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        loop {
            let n = io.rx.recv_batch()?;
            if n == 0 {
                break;
            }
            let mut most = 0;
            for i in 0..n {
                copies[i] = 0;
                let d = io.rx.datagram(i);
                let len = d.data.len();
                if len < HEADER + TAG {
                    continue;
                }
                let p = &mut plain[i];
                p[..len].copy_from_slice(d.data);
                let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
                let seq = u16::from_be_bytes([p[2], p[3]]);
                let (hdr, body) = p[..len].split_at_mut(HEADER);
                let Ok(clear) = in_key.open_in_place(nonce(ssrc, seq), Aad::from(&*hdr), body)
                else {
                    continue;
                };
                clear_lens[i] = clear.len();
                carry += fanout;
                copies[i] = carry as usize;
                carry -= copies[i] as f64;
                most = most.max(copies[i]);
            }
            // Subscriber by subscriber, as the SFU drains each peer's queue:
            // one subscriber's packets leave back to back (GSO can join them).
            let mut fwd = 0u64;
            for (k, s) in out_seq.iter_mut().enumerate().take(most) {
                let to = sinks[k % sinks.len()];
                for i in (0..n).filter(|&i| copies[i] > k) {
                    let (hdr, body) = plain[i].split_at(HEADER);
                    let clear_len = clear_lens[i];
                    let ssrc = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
                    let out_ssrc = ssrc ^ (k as u32 + 1);
                    *s = s.wrapping_add(1);
                    out[..HEADER].copy_from_slice(hdr);
                    out[2..4].copy_from_slice(&s.to_be_bytes());
                    out[8..12].copy_from_slice(&out_ssrc.to_be_bytes());
                    out[HEADER..HEADER + clear_len].copy_from_slice(&body[..clear_len]);
                    let (oh, ob) = out.split_at_mut(HEADER);
                    let tag = out_key
                        .seal_in_place_separate_tag(
                            nonce(out_ssrc, *s),
                            Aad::from(&*oh),
                            &mut ob[..clear_len],
                        )
                        .map_err(|_| anyhow::anyhow!("seal"))?;
                    ob[clear_len..clear_len + TAG].copy_from_slice(tag.as_ref());
                    io.tx.send(local, to, &out[..HEADER + clear_len + TAG]);
                    fwd += 1;
                }
            }
            io.tx.flush();
            received.fetch_add(n as u64, Relaxed);
            forwarded.fetch_add(fwd, Relaxed);
        }
    }
    Ok(thread_cpu_seconds() - cpu0)
}

/// Send pre-encrypted SRTP packets at `pps`, paced every millisecond.
fn send_loop(to: SocketAddr, pps: f64, payload: usize, stop: Arc<AtomicBool>) {
    let Ok(k) = key(1) else { return };
    let Ok(sock) = std::net::UdpSocket::bind(SocketAddr::new(to.ip(), 0)) else {
        return;
    };
    let packets: Vec<Vec<u8>> = (0..1024u16)
        .filter_map(|seq| {
            let mut p = vec![0u8; HEADER + payload + TAG];
            p[0] = 0x80;
            p[1] = 96;
            p[2..4].copy_from_slice(&seq.to_be_bytes());
            p[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            let (h, b) = p.split_at_mut(HEADER);
            let tag = k
                .seal_in_place_separate_tag(
                    nonce(0x1234_5678, seq),
                    Aad::from(&*h),
                    &mut b[..payload],
                )
                .ok()?;
            b[payload..].copy_from_slice(tag.as_ref());
            Some(p)
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    let mut i = 0usize;
    while !stop.load(Relaxed) {
        let due = (start.elapsed().as_secs_f64() * pps) as u64;
        while sent < due {
            let _ = sock.send_to(&packets[i % packets.len()], to);
            i += 1;
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_with_fanout() {
        let b = run(
            "127.0.0.1".parse().expect("ip"),
            2000.0,
            2.5,
            300,
            Duration::from_millis(500),
        )
        .expect("baseline");
        assert!(b.received_pps > 1000.0, "{b:?}");
        let ratio = b.forwarded_pps / b.received_pps;
        assert!((ratio - 2.5).abs() < 0.1, "{b:?}");
        assert!(
            b.us_per_forwarded > 0.0 && b.us_per_forwarded.is_finite(),
            "{b:?}"
        );
    }
}
