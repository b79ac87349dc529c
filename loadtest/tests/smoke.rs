//! A smoke run of every scenario and of the ramp against a real Moselle
//! node: seconds and small sizes. It checks that media flows end to end
//! (packets forwarded and received, keyframes seen, no loss to speak of)
//! and that the report is complete; it is not a benchmark.

use std::path::PathBuf;
use std::process::Command;

fn server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MOSELLE_BIN") {
        return PathBuf::from(p);
    }
    // The workspace's target dir, same profile as this test.
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"));
    exe.with_file_name("moselle")
}

/// One smoke run at a time: run side by side on two cores, the generators
/// fall behind their schedules and the step no longer measures the server.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Run `loadtest --smoke --quiet` with `args` into a fresh directory under
/// the target dir; returns its stdout and report.json.
fn run_loadtest(dir: &str, args: &[&str]) -> (String, String) {
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bin = server_bin();
    assert!(
        bin.is_file(),
        "moselle binary missing at {} (cargo build --workspace, or set MOSELLE_BIN)",
        bin.display()
    );
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(dir);
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--smoke", "--quiet"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--server-bin")
        .arg(&bin)
        .output()
        .expect("run loadtest");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "loadtest failed\n{stdout}\n{stderr}");
    let json = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    (stdout, json)
}

#[test]
fn every_scenario_and_the_ramp_flow_and_report() {
    let (stdout, json) = run_loadtest("loadtest-smoke", &["--ramp"]);
    assert!(stdout.contains("scenario"), "no summary table:\n{stdout}");
    let report: serde_json::Value = serde_json::from_str(&json).expect("report.json is JSON");
    let entries = report["entries"].as_array().expect("entries");
    let names: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["scenario"].as_str())
        .collect();
    assert_eq!(names, ["audio", "meeting", "livestream"], "{json}");
    for e in entries {
        let name = e["scenario"].as_str().unwrap_or("?");
        let steps = e["steps"].as_array().expect("steps");
        assert_eq!(steps.len(), 2, "{name}: both ramp steps run: {json}");
        for m in steps {
            let f = |k: &str| {
                m[k].as_f64()
                    .unwrap_or_else(|| panic!("{name}: {k} missing: {m}"))
            };
            assert_eq!(f("join_failures"), 0.0, "{name}: {m}");
            assert!(f("forwarded_pps") > 0.0, "{name}: nothing forwarded: {m}");
            assert!(f("received_pps") > 0.0, "{name}: nothing received: {m}");
            assert!(f("loss") < 0.05, "{name}: loss: {m}");
            assert!(f("server_us_per_forwarded") > 0.0, "{name}: {m}");
            assert!(f("delay_p99_ms") > 0.0, "{name}: {m}");
            if name != "audio" {
                assert!(
                    f("keyframes_received") > 0.0,
                    "{name}: no keyframe arrived: {m}"
                );
            }
        }
        assert!(e["held"].is_object(), "{name}: a smoke size must hold: {e}");
        let b = &e["baseline"];
        assert!(
            b["us_per_forwarded"].as_f64().is_some_and(|v| v > 0.0),
            "{name}: baseline: {e}"
        );
        assert!(
            e["ratio_to_baseline"].as_f64().is_some_and(|v| v > 0.0),
            "{name}: ratio: {e}"
        );
    }
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("loadtest-smoke");
    let svg = std::fs::read_to_string(out.join("report.svg")).expect("report.svg");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    assert_eq!(
        svg.matches("<polyline").count(),
        6,
        "two panels of three lines"
    );
}

/// Clients whose UDP is blocked: media only over ICE-TCP, with two workers
/// and two rooms (the acceptor hands each connection to the worker owning
/// its peer).
#[test]
fn meeting_over_ice_tcp_flows() {
    let (_, json) = run_loadtest(
        "loadtest-smoke-tcp",
        &[
            "--scenario",
            "meeting",
            "--transport",
            "tcp",
            "--workers",
            "2",
            "--rooms",
            "2",
            "--no-baseline",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let m = &report["entries"][0]["steps"][0];
    assert_eq!(m["participants"].as_u64(), Some(6), "{json}");
    assert_eq!(m["join_failures"].as_u64(), Some(0), "{json}");
    assert!(
        m["received_pps"].as_f64().is_some_and(|v| v > 100.0),
        "{json}"
    );
    assert!(m["loss"].as_f64().is_some_and(|v| v < 0.05), "{json}");
    // The server's media input came over TCP, not UDP.
    assert!(m["tcp_share"].as_f64().is_some_and(|v| v > 0.99), "{json}");
}

/// Two forwarding workers behind one port (the dispatcher), two rooms, and
/// the two-connection signaling flavour (the other test uses one).
#[test]
fn two_workers_two_rooms_flow() {
    let (_, json) = run_loadtest(
        "loadtest-smoke-workers",
        &[
            "--scenario",
            "meeting",
            "--workers",
            "2",
            "--rooms",
            "2",
            "--signal",
            "v0",
            "--no-baseline",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let e = &report["entries"][0];
    assert_eq!(e["workers"].as_u64(), Some(2), "{json}");
    let m = &e["steps"][0];
    assert_eq!(m["participants"].as_u64(), Some(6), "{json}");
    assert_eq!(m["join_failures"].as_u64(), Some(0), "{json}");
    // Everyone in both rooms receives the two others' audio and video.
    assert!(
        m["received_pps"].as_f64().is_some_and(|v| v > 100.0),
        "{json}"
    );
    assert!(m["loss"].as_f64().is_some_and(|v| v < 0.05), "{json}");
    assert!(
        m["keyframes_received"].as_f64().is_some_and(|v| v > 0.0),
        "{json}"
    );
}
