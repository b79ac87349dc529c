//! The benchmark's output: a line per run, a summary table, report.json and
//! an SVG chart of server CPU and loss against participants.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::baseline::Baseline;
use crate::scenario::{Kind, Measurement};

#[derive(Serialize)]
struct Entry {
    scenario: Kind,
    /// Forwarding workers of the local server (None: a remote server).
    workers: Option<usize>,
    steps: Vec<Measurement>,
    /// The largest run that held (loss <= 1 %, p99 delay <= 50 ms, every
    /// join succeeded, the generator kept up).
    held: Option<Measurement>,
    baseline: Option<Baseline>,
    /// Server µs per forwarded packet over the baseline's.
    ratio_to_baseline: Option<f64>,
    livekit_per_core: f64,
    /// Our forwarded packets per CPU-second over LiveKit's published figure.
    vs_livekit: Option<f64>,
}

#[derive(Serialize)]
pub struct Report {
    cores: usize,
    generated_by: &'static str,
    entries: Vec<Entry>,
    #[serde(skip)]
    out: PathBuf,
}

/// The scenario, and the server when it is not Moselle.
fn label(m: &Measurement) -> String {
    if m.target == "moselle" || m.target.is_empty() {
        m.scenario.clone()
    } else {
        format!("{}@{}", m.scenario, m.target)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

pub fn one_line(m: &Measurement, ok: bool) -> String {
    format!(
        "{} size {} x{} room(s) ({} participants): fwd {:.0} pkt/s, server {:.3} cores = {} µs/pkt ({} pkt per CPU-s), loss {:.2} %, delay p50/p99 {}/{} ms, join p50/p99 {}/{} ms (p50 of each step: {}), media in over TCP {:.0} %, generator {:.2} cores, bottleneck {}: {}",
        label(m),
        m.size,
        m.rooms,
        m.participants,
        m.forwarded_pps,
        m.server_cpu_cores,
        opt(m.server_us_per_forwarded, 1),
        opt(m.forwarded_per_cpu_second, 0),
        m.loss * 100.0,
        opt(m.delay_p50_ms, 1),
        opt(m.delay_p99_ms, 1),
        opt(m.join_p50_ms, 0),
        opt(m.join_p99_ms, 0),
        m.join_phases_p50_ms
            .iter()
            .map(|(n, v)| format!("{n} {}", opt(*v, 0)))
            .collect::<Vec<_>>()
            .join(", "),
        m.tcp_share * 100.0,
        m.generator_cpu_cores,
        m.bottleneck,
        if ok { "held" } else { "did not hold" },
    )
}

impl Report {
    pub fn new(cores: usize, out: &Path) -> Self {
        Report {
            cores,
            generated_by: "moselle loadtest",
            entries: Vec::new(),
            out: out.to_path_buf(),
        }
    }

    pub fn add(
        &mut self,
        scenario: Kind,
        workers: Option<usize>,
        steps: Vec<Measurement>,
        held: Option<Measurement>,
        baseline: Option<Baseline>,
    ) {
        let best = held.as_ref().or(steps.last());
        let ratio = match (best.and_then(|m| m.server_us_per_forwarded), &baseline) {
            (Some(s), Some(b)) if b.us_per_forwarded > 0.0 => Some(s / b.us_per_forwarded),
            _ => None,
        };
        let lk = scenario.livekit_per_core();
        let vs = best
            .and_then(|m| m.forwarded_per_cpu_second)
            .map(|v| v / lk);
        self.entries.push(Entry {
            scenario,
            workers,
            steps,
            held,
            baseline,
            ratio_to_baseline: ratio,
            livekit_per_core: lk,
            vs_livekit: vs,
        });
    }

    /// Print the table, write report.json and report.svg.
    pub fn finish(&self) -> anyhow::Result<()> {
        println!("{}", self.table());
        let json = self.out.join("report.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("write {}", json.display()))?;
        let svg = self.out.join("report.svg");
        std::fs::write(&svg, self.svg()).with_context(|| format!("write {}", svg.display()))?;
        println!("wrote {} and {}", json.display(), svg.display());
        Ok(())
    }

    fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{:<17} {:>3} {:>5} {:>10} {:>9} {:>10} {:>10} {:>9} {:>8} {:>8} {:>7} {:>13} {:>13} {:>9} {:>7}",
            "scenario", "wkr", "held", "fwd pkt/s", "µs/pkt", "pkt/CPU-s", "rx/CPU-s", "×relay", "×LiveKit",
            "KiB/part", "loss %", "delay p50/99", "join p50/99", "gen cores", "limit"
        );
        for e in &self.entries {
            let m = e.held.as_ref().or(e.steps.last());
            let Some(m) = m else { continue };
            let _ = writeln!(
                t,
                "{:<17} {:>3} {:>5} {:>10.0} {:>9} {:>10} {:>10} {:>9} {:>8} {:>8} {:>7.2} {:>13} {:>13} {:>9.2} {:>7}",
                label(m),
                e.workers.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
                e.held.as_ref().map(|h| h.size.to_string()).unwrap_or_else(|| "none".into()),
                m.forwarded_pps,
                opt(m.server_us_per_forwarded, 2),
                opt(m.forwarded_per_cpu_second, 0),
                opt(m.received_per_cpu_second, 0),
                opt(e.ratio_to_baseline, 2),
                opt(e.vs_livekit, 2),
                opt(m.server_kib_per_participant, 0),
                m.loss * 100.0,
                format!("{}/{} ms", opt(m.delay_p50_ms, 1), opt(m.delay_p99_ms, 1)),
                format!("{}/{} ms", opt(m.join_p50_ms, 0), opt(m.join_p99_ms, 0)),
                m.generator_cpu_cores,
                m.bottleneck,
            );
        }
        // Side by side: the same scenario and size against Moselle and Janus.
        for e in &self.entries {
            let Some(j) = e.held.as_ref().or(e.steps.last()) else {
                continue;
            };
            if j.target != "janus" {
                continue;
            }
            let ours = self
                .entries
                .iter()
                .filter_map(|o| o.held.as_ref().or(o.steps.last()))
                .find(|m| m.target == "moselle" && m.scenario == j.scenario && m.size == j.size);
            if let (Some(m), Some(jr)) = (ours, j.received_per_cpu_second) {
                if let Some(mr) = m.received_per_cpu_second {
                    let _ = writeln!(
                        t,
                        "{} of {}: packets received per server CPU-second, Moselle {:.0}, Janus {:.0}: Moselle {:.2}x",
                        j.scenario, j.size, mr, jr, mr / jr
                    );
                }
            }
        }
        t
    }

    /// Two panels per entry: server CPU (cores) and loss (%) against
    /// participants, one polyline per scenario and worker count.
    fn svg(&self) -> String {
        let (w, h, pad) = (760.0, 300.0, 50.0);
        let colors = [
            "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
        ];
        let max_x = self
            .entries
            .iter()
            .flat_map(|e| e.steps.iter().map(|m| m.participants))
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let max_cpu = self
            .entries
            .iter()
            .flat_map(|e| e.steps.iter().map(|m| m.server_cpu_cores))
            .fold(0.1f64, f64::max);
        let max_loss = self
            .entries
            .iter()
            .flat_map(|e| e.steps.iter().map(|m| m.loss * 100.0))
            .fold(2.0f64, f64::max);
        let mut s = String::new();
        // Two panels, then the legend below them.
        let legend_y = 2.0 * h + 50.0;
        let total_h = legend_y + 16.0 * self.entries.len() as f64 + 10.0;
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{total_h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        for (panel, (title, max_y)) in [("server CPU (cores)", max_cpu), ("loss (%)", max_loss)]
            .iter()
            .enumerate()
        {
            let y0 = panel as f64 * (h + 20.0);
            let plot = |x: f64, y: f64| {
                (
                    pad + x / max_x * (w - 2.0 * pad),
                    y0 + h - pad + 10.0 - y / max_y * (h - 2.0 * pad),
                )
            };
            let (ax0, ay0) = plot(0.0, 0.0);
            let (ax1, ay1) = plot(max_x, *max_y);
            let _ = writeln!(
                s,
                r#"<text x="{pad}" y="{}" font-weight="bold">{title} against participants</text>"#,
                y0 + 20.0
            );
            let _ = writeln!(
                s,
                r#"<path d="M{ax0:.1},{ay1:.1} L{ax0:.1},{ay0:.1} L{ax1:.1},{ay0:.1}" stroke="black" fill="none"/>"#
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{max_y:.2}</text>"#,
                4.0,
                ay1 + 4.0
            );
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">0</text>"#, 30.0, ay0 + 4.0);
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{max_x:.0}</text>"#,
                ax1 - 10.0,
                ay0 + 16.0
            );
            if panel == 1 {
                let (_, y1) = plot(0.0, 1.0);
                let _ = writeln!(
                    s,
                    r##"<path d="M{ax0:.1},{y1:.1} L{ax1:.1},{y1:.1}" stroke="#999" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#999">1 % limit</text>"##,
                    ax1 - 60.0,
                    y1 - 4.0
                );
            }
            for (i, e) in self.entries.iter().enumerate() {
                let color = colors[i % colors.len()];
                let pts: Vec<String> = e
                    .steps
                    .iter()
                    .map(|m| {
                        let y = if panel == 0 {
                            m.server_cpu_cores
                        } else {
                            m.loss * 100.0
                        };
                        let (x, y) = plot(m.participants as f64, y);
                        format!("{x:.1},{y:.1}")
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    r#"<polyline points="{}" stroke="{color}" fill="none" stroke-width="2"/>"#,
                    pts.join(" ")
                );
                for p in &pts {
                    let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                    let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
                }
                if panel == 0 {
                    let label = format!(
                        "{}{}",
                        e.scenario.name(),
                        e.workers
                            .map(|w| format!(", {w} worker(s)"))
                            .unwrap_or_default()
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" fill="{color}">{label}</text>"#,
                        pad,
                        legend_y + i as f64 * 16.0
                    );
                }
            }
        }
        let _ = writeln!(s, "</svg>");
        s
    }
}
