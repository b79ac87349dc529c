//! The server under test: a local `moselle` process we start (and can read
//! /proc of), or a remote URL whose `/metrics` we read.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moselle::metrics::process_usage;

pub struct Server {
    /// ws:// base for signaling.
    pub ws_url: String,
    /// http:// base for /metrics.
    pub http_url: String,
    child: Option<Child>,
    pub log_path: Option<PathBuf>,
    /// Which server: Janus has no /metrics (its forwarding is counted at
    /// the receivers).
    pub janus: bool,
}

/// What we read of the server at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub forwarded: u64,
    pub rtp_in: u64,
    pub send_drops: u64,
    /// Media input by path: UDP datagrams and ICE-TCP frames.
    pub udp_in: u64,
    pub tcp_in: u64,
}

impl Server {
    /// Start `bin serve --dev` on free ports bound to `ip`.
    pub async fn start_local(
        bin: &Path,
        ip: IpAddr,
        workers: Option<usize>,
        extra_args: &[String],
        out_dir: &Path,
    ) -> anyhow::Result<Self> {
        if !bin.is_file() {
            bail!(
                "server binary {} not found: build it (cargo build --release) or pass --server-bin",
                bin.display()
            );
        }
        let http_port = free_port(ip)?;
        let udp_port = free_port(ip)?;
        let tcp_port = free_port(ip)?;
        let log_path = out_dir.join("server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--dev", "--bind", &ip.to_string()])
            .args(["--http-port", &http_port.to_string()])
            .args(["--udp-port", &udp_port.to_string()])
            .args(["--tcp-port", &tcp_port.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(w) = workers {
            cmd.args(["--workers", &w.to_string()]);
        }
        cmd.args(extra_args);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let s = Server {
            ws_url: format!("ws://{ip}:{http_port}"),
            http_url: format!("http://{ip}:{http_port}"),
            child: Some(child),
            log_path: Some(log_path),
            janus: false,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if http::get(&format!("{}/healthz", s.http_url)).await.is_ok() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "local server did not become healthy; see {}",
                    s.log_path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn remote(url: &str) -> Self {
        let http_url = url
            .replacen("ws://", "http://", 1)
            .replacen("wss://", "https://", 1)
            .trim_end_matches('/')
            .to_string();
        let ws_url = http_url
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        Server {
            ws_url,
            http_url,
            child: None,
            log_path: None,
            janus: false,
        }
    }

    /// Start Janus (Debian `janus`) with only the VideoRoom plugin and the
    /// WebSocket transport, ICE on `iface` (Janus ignores loopback: a veth
    /// inside a namespace, see `loadtest/janus.sh`).
    pub async fn start_janus(ip: IpAddr, iface: &str, out_dir: &Path) -> anyhow::Result<Self> {
        const LIBS: &str = "/usr/lib/x86_64-linux-gnu/janus";
        let dir = out_dir.join("janus");
        for sub in ["conf", "plugins", "transports", "none"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("create {}", dir.join(sub).display()))?;
        }
        for (sub, lib) in [
            ("plugins", "libjanus_videoroom.so"),
            ("transports", "libjanus_websockets.so"),
        ] {
            let from = Path::new(LIBS).join(sub).join(lib);
            if !from.is_file() {
                bail!("{} not found: install Debian's janus", from.display());
            }
            let to = dir.join(sub).join(lib);
            let _ = std::fs::remove_file(&to);
            std::os::unix::fs::symlink(&from, &to)
                .with_context(|| format!("link {}", to.display()))?;
        }
        let port = free_port(ip)?;
        let d = dir.display();
        let files = [
            (
                "janus.jcfg",
                format!(
                    "general: {{\n  configs_folder = \"{d}/conf\"\n  plugins_folder = \"{d}/plugins\"\n  \
                     transports_folder = \"{d}/transports\"\n  events_folder = \"{d}/none\"\n  \
                     loggers_folder = \"{d}/none\"\n  debug_level = 3\n}}\n\
                     nat: {{\n  ice_enforce_list = \"{iface}\"\n}}\nmedia: {{\n}}\n"
                ),
            ),
            (
                "janus.transport.websockets.jcfg",
                format!(
                    "general: {{\n  ws = true\n  ws_port = {port}\n  ws_ip = \"{ip}\"\n}}\n\
                     admin: {{\n  admin_ws = false\n}}\n"
                ),
            ),
            ("janus.plugin.videoroom.jcfg", "general: {\n}\n".to_string()),
        ];
        for (name, text) in files {
            std::fs::write(dir.join("conf").join(name), text)
                .with_context(|| format!("write {name}"))?;
        }
        let log_path = out_dir.join("janus.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let conf = dir.join("conf");
        let child = Command::new("janus")
            .arg("-F")
            .arg(&conf)
            .arg("-C")
            .arg(conf.join("janus.jcfg"))
            .args(["-o", "-i", &ip.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start janus (Debian package janus)")?;
        let s = Server {
            ws_url: format!("ws://{ip}:{port}"),
            http_url: String::new(),
            child: Some(child),
            log_path: Some(log_path),
            janus: true,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect((ip, port)).await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "Janus did not listen on {ip}:{port}; see {}",
                    out_dir.join("janus.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(s)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Read CPU, memory and counters. A local server's CPU and memory come
    /// from /proc; a remote one's from its `process_*` metrics.
    pub async fn sample(&self) -> anyhow::Result<Sample> {
        if self.janus {
            let u = self
                .pid()
                .and_then(|p| process_usage(Some(p)))
                .context("read Janus's /proc")?;
            return Ok(Sample {
                cpu_s: u.cpu_seconds,
                rss_bytes: u.rss_bytes,
                ..Default::default()
            });
        }
        let text = http::get(&format!("{}/metrics", self.http_url))
            .await
            .context("read /metrics")?;
        let m = |name: &str| metric(&text, name);
        let mut s = Sample {
            cpu_s: m("process_cpu_seconds_total").unwrap_or(0.0),
            rss_bytes: m("process_resident_memory_bytes").unwrap_or(0.0) as u64,
            forwarded: m("moselle_rtp_packets_forwarded_total").unwrap_or(0.0) as u64,
            rtp_in: m("moselle_rtp_packets_in_total").unwrap_or(0.0) as u64,
            send_drops: m("moselle_udp_send_drops_total").unwrap_or(0.0) as u64,
            udp_in: m("moselle_udp_datagrams_in_total").unwrap_or(0.0) as u64,
            tcp_in: m("moselle_tcp_frames_in_total").unwrap_or(0.0) as u64,
        };
        if let Some(u) = self.pid().and_then(|p| process_usage(Some(p))) {
            s.cpu_s = u.cpu_seconds;
            s.rss_bytes = u.rss_bytes;
        }
        Ok(s)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first: the server drains; then make sure.
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A value of a Prometheus text-format metric without labels.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    let s = std::net::UdpSocket::bind((ip, 0))?;
    let t = std::net::TcpListener::bind((ip, s.local_addr()?.port()));
    let port = s.local_addr()?.port();
    drop(s);
    match t {
        Ok(_) => Ok(port),
        Err(_) => free_port(ip),
    }
}

/// A tiny HTTP/1.1 GET client: all we need is /healthz and /metrics, and
/// it keeps hyper/reqwest out of the generator's dependencies.
mod http {
    use anyhow::{bail, Context};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub async fn get(url: &str) -> anyhow::Result<String> {
        let rest = url
            .strip_prefix("http://")
            .context("only http:// URLs are read")?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let mut s = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(host),
        )
        .await??;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").context("bad HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{url}: {}", head.lines().next().unwrap_or(""));
        }
        Ok(body.to_string())
    }
}
