#!/bin/bash
# Forwarding cost with downlink BWE on against off, in the same run: a meeting of 16 and a
# livestream of 50, alternating, 3 rounds; one line per run (µs per forwarded packet,
# packets per CPU-second, delay). Needs `cargo build --release --workspace`. Output: /tmp/lt.
cd "$(dirname "$0")/.."
for round in 1 2 3; do
  for mode in on off; do
    for sc in meeting livestream; do
      size=16; [ $sc = livestream ] && size=50
      extra=(--server-arg=--no-downlink-bwe); [ $mode = on ] && extra=(--server-arg=--downlink-bwe)
      out=/tmp/lt/$sc-$mode-$round
      mkdir -p $out
      target/release/loadtest --scenario $sc --sizes $size --warmup 3 --window 10 --no-baseline --quiet --out $out "${extra[@]}" > $out/stdout 2>&1
      python3 - "$out" "$sc" "$mode" "$round" <<'PY'
import json,sys
out,sc,mode,rnd=sys.argv[1:]
r=json.load(open(out+"/report.json"))
e=r["entries"][0]
m=e.get("best") or e["steps"][-1]
print(f"{sc:10s} {mode:3s} r{rnd}: us/pkt {m.get('server_us_per_forwarded')}, pkt/CPU-s {m.get('forwarded_per_cpu_second')}, fwd pps {m.get('forwarded_pps')}, p50/p99 {m.get('delay_p50_ms')}/{m.get('delay_p99_ms')} ms, loss {m.get('loss')}")
PY
    done
  done
done
