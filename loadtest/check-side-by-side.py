#!/usr/bin/env python3
"""Check a side-by-side report (loadtest/janus.sh): every scenario ran against Moselle
and Janus, everyone joined, media flowed with little loss, and each server's packets
received per CPU-second were measured.  Usage: check-side-by-side.py report.json"""
import json
import sys

report = json.load(open(sys.argv[1]))
runs = {}
problems = []
for e in report["entries"]:
    m = e.get("held") or (e["steps"][-1] if e["steps"] else None)
    if m is None:
        problems.append(f"{e['scenario']}: no run")
        continue
    who = f"{m['scenario']}@{m['target']}"
    runs.setdefault(m["scenario"], set()).add(m["target"])
    if m["join_failures"]:
        problems.append(f"{who}: {m['join_failures']} joins failed")
    if not m["received_pps"] > 0:
        problems.append(f"{who}: nothing received")
    if m["loss"] >= 0.05:
        problems.append(f"{who}: loss {m['loss']:.3f}")
    if m["scenario"] != "audio" and not m["keyframes_received"] > 0:
        problems.append(f"{who}: no keyframe received")
    if m.get("received_per_cpu_second") is None and m["bottleneck"] != "generator":
        problems.append(f"{who}: no packets per CPU-second")
for scenario, targets in runs.items():
    if targets != {"moselle", "janus"}:
        problems.append(f"{scenario}: ran against {sorted(targets)}, not both")
if problems:
    print("side by side:\n  " + "\n  ".join(problems))
    sys.exit(1)
print("side by side: " + ", ".join(sorted(runs)) + " against Moselle and Janus, media flowed")
