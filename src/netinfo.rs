//! Which local addresses to announce as ICE host candidates.

use std::net::{IpAddr, Ipv4Addr};

/// IPv4 addresses of this machine's interfaces that are up.
pub fn interface_ipv4() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once.
    unsafe {
        let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & (libc::IFF_UP as u32) != 0;
            if up && !ifa.ifa_addr.is_null() && (*ifa.ifa_addr).sa_family as i32 == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out.sort();
    out.dedup();
    out
}

/// Configured addresses win; else the bind address if specific; else every
/// non-loopback IPv4 address, or loopback when that is all there is.
pub fn announce_ips(configured: &[IpAddr], bind: IpAddr) -> Vec<IpAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    if !bind.is_unspecified() {
        return vec![bind];
    }
    let all = interface_ipv4();
    let public: Vec<IpAddr> = all
        .iter()
        .filter(|a| !a.is_loopback())
        .map(|a| IpAddr::V4(*a))
        .collect();
    if public.is_empty() {
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
    } else {
        public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_and_bind_win() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            announce_ips(&[ip], IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            vec![ip]
        );
        assert_eq!(
            announce_ips(&[], IpAddr::V4(Ipv4Addr::LOCALHOST)),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        );
        assert!(!announce_ips(&[], IpAddr::V4(Ipv4Addr::UNSPECIFIED)).is_empty());
    }
}
