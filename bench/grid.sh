#!/usr/bin/env bash
# Issue 11's search grid, one JSON per case into DIR (each with the three masks square3/blob/full,
# vfs vs the paper's code vs the fp16 read floor, CPU model and ISA in `environment`):
#   real_lite0_n10000         embedded Lite0 blocks.5 7×7×192, real signed features (bench/real_cache.py)
#   vitb16_n2000_{relu,signed} r50l3_n2000_{relu,signed} r50l4_n2000_{relu,signed}   synthetic
#
#   bench/grid.sh DIR [search_bench args...]        # e.g. bench/grid.sh bench/results/grid --no-paper
#   N_REAL=50 N_SYN=50 WAIT=0 bench/grid.sh /tmp/grid-smoke --no-paper --repeats 1   # smoke test
#
# The real cache is built first when it is missing or incomplete (≈10-30 min on 2 cores), then reused;
# CACHE may name any complete cache (the real case searches its first N_REAL images).
# Environment: PY, DEVICE (cpu), N_REAL (10000), N_SYN (2000), REPEATS (10), PAPER_REPEATS (3),
# CACHE (/tmp/vfs-bench/real10k.zarr), WAIT (seconds to wait for an idle box before each case, 300),
# QW (--quiet-wait per repeat, 0), SHAPES ("vitb16 r50l3 r50l4"), FEATURES ("relu signed"),
# REAL (1: run the real-cache case; 0: skip it). An AVX2-only CPU's proxy on an AVX-512 one: torch's
# operators, oneDNN and the pairs kernel on 256-bit vectors —
#   ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 bench/grid.sh DIR
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,18p' "$0" >&2; exit 2; }
DEST=$1; shift
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cpu}
N_REAL=${N_REAL:-10000}
N_SYN=${N_SYN:-2000}
REPEATS=${REPEATS:-10}
PAPER_REPEATS=${PAPER_REPEATS:-3}
CACHE=${CACHE:-/tmp/vfs-bench/real10k.zarr}
WAIT=${WAIT:-300}
QW=${QW:-0}
SHAPES=${SHAPES:-vitb16 r50l3 r50l4}
FEATURES=${FEATURES:-relu signed}
REAL=${REAL:-1}
mkdir -p "$DEST"
rc=0
case_() {  # case_ NAME ARGS...
  local name=$1; shift
  [ "$WAIT" = 0 ] || "$PY" bench/_common.py wait-quiet "$WAIT"
  echo "== $name ($(date -u +%FT%TZ))" >&2
  if "$PY" bench/search_bench.py --device "$DEVICE" --mask all --repeats "$REPEATS" \
      --paper-repeats "$PAPER_REPEATS" --quiet-wait "$QW" "$@" --out "$DEST/$name.json" \
      > /dev/null 2> "$DEST/$name.log"; then
    tail -n 1 "$DEST/$name.log" >&2
  else
    echo "!! $name failed, see $DEST/$name.log" >&2; tail -n 3 "$DEST/$name.log" >&2; rc=1
  fi
}

if [ "$REAL" = 1 ]; then
  if ! "$PY" -c 'import sys; sys.path.insert(0, "."); import vfs
sys.exit(0 if vfs.open_cache(sys.argv[1]).complete else 1)' "$CACHE" > /dev/null 2>&1; then
    echo "== building (or resuming) the real cache $CACHE" >&2
    nice -n 19 "$PY" bench/real_cache.py --n "$(( N_REAL > 10000 ? N_REAL : 10000 ))" \
      --cache "$CACHE" --work "${CACHE%.zarr}" \
      --out "$DEST/real_cache.json" > /dev/null 2> "$DEST/real_cache.log" \
      || { echo "!! real cache build failed, see $DEST/real_cache.log" >&2; exit 1; }
  fi
  case_ "real_lite0_n${N_REAL}" --from-cache "$CACHE" --n "$N_REAL" "$@"
fi
for shape in $SHAPES; do
  for feat in $FEATURES; do
    case_ "${shape}_n${N_SYN}_${feat}" --shape "$shape" --features "$feat" --n "$N_SYN" "$@"
  done
done

"$PY" - "$DEST" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    for c in d.get("cases", []):
        print(json.dumps({"file": f.name, "shape": c["shape"], "features": c["features"], "n": c["n"],
                          "mask": c["mask"], "vfs_ms_min": c["vfs"]["min_ms"], "x_floor": c["vfs_over_floor"]["min"],
                          "x_paper": (c.get("speedup_vs_paper") or {}).get("min"), "same_top10": c.get("same_top10"),
                          "cpu": d["environment"]["cpu"], "isa": d["environment"]["torch_cpu_capability"]}))
EOF
exit $rc
