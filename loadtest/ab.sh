#!/bin/bash
# One change measured by itself: the server run two ways (A and B), alternating within each
# round, on the same scenarios, with the same-run relay baseline. One line per run: server µs
# per forwarded packet, the relay's, their ratio, packets per CPU-second, delay, loss; then
# the medians per way. Needs `cargo build --release --workspace`.
#   loadtest/ab.sh [-r ROUNDS] [-s "meeting:24 audio:150"] A "ARGS A" B "ARGS B"
# ARGS are loadtest arguments, e.g. "--server-arg=--no-udp-gso" or
# "--server-bin=/tmp/moselle-before". Output under /tmp/ab (report.json per run).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
scenarios="meeting:24 audio:150"
while getopts "r:s:" o; do
  case $o in
    r) rounds=$OPTARG ;;
    s) scenarios=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# == 4)) || { echo "usage: $0 [-r ROUNDS] [-s SCENARIOS] A 'ARGS A' B 'ARGS B'" >&2; exit 2; }
names=("$1" "$3")
declare -A argv=([$1]="$2" [$3]="$4")
rm -rf /tmp/ab && mkdir -p /tmp/ab
for round in $(seq 1 "$rounds"); do
  for name in "${names[@]}"; do
    for sc in $scenarios; do
      kind=${sc%%:*} size=${sc##*:}
      out=/tmp/ab/$kind-$name-$round
      mkdir -p "$out"
      # shellcheck disable=SC2086
      target/release/loadtest --scenario "$kind" --sizes "$size" --warmup 3 --window 10 --quiet \
        --out "$out" ${argv[$name]} > "$out/stdout" 2>&1 || { echo "$out failed:"; tail -5 "$out/stdout"; }
    done
  done
done
python3 - "$rounds" "$scenarios" "${names[@]}" <<'PY'
import json, statistics, sys
rounds, scenarios, names = int(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
def row(kind, name, r):
    try:
        e = json.load(open(f"/tmp/ab/{kind}-{name}-{r}/report.json"))["entries"][0]
    except (OSError, ValueError, IndexError):
        return None
    m = e.get("held") or e["steps"][-1]
    return m, e.get("baseline") or {}, e.get("ratio_to_baseline")
for sc in scenarios:
    kind = sc.split(":")[0]
    med = {}
    for name in names:
        us, ratios = [], []
        for r in range(1, rounds + 1):
            got = row(kind, name, r)
            if not got:
                print(f"{sc:12s} {name:8s} r{r}: no report")
                continue
            m, b, ratio = got
            nan = float("nan")
            if m["server_us_per_forwarded"] is not None:
                us.append(m["server_us_per_forwarded"])
            if ratio:
                ratios.append(ratio)
            print(f"{sc:12s} {name:8s} r{r}: {m['server_us_per_forwarded'] or nan:.2f} µs/pkt, relay "
                  f"{b.get('us_per_forwarded') or nan:.2f}, ×relay {ratio or nan:.2f}, "
                  f"{m['forwarded_per_cpu_second'] or 0:.0f} pkt/CPU-s, p50/p99 {m['delay_p50_ms']}/{m['delay_p99_ms']} ms, "
                  f"loss {m['loss']:.4f}, join p50 {m['join_p50_ms']} ms, limit {m.get('bottleneck')}")
        med[name] = (statistics.median(us) if us else float("nan"),
                     statistics.median(ratios) if ratios else float("nan"))
    a, b = names
    print(f"{sc:12s} medians: {a} {med[a][0]:.2f} µs/pkt (×relay {med[a][1]:.2f}), "
          f"{b} {med[b][0]:.2f} µs/pkt (×relay {med[b][1]:.2f}); {a}/{b} = {med[a][0] / med[b][0]:.3f}")
PY
