#!/usr/bin/env bash
# Every CPU measurement recorded in docs/performance.md, in order; JSON to bench/results/cpu/.
# This is a shared 2-core machine: each step first waits (up to WAIT s) for the box to be idle, and
# each repeat waits up to QW s more; every figure carries the share of CPU other processes used.
#   bench/cpu_all.sh            # ~25-40 min depending on how busy the box is
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-bench/results/cpu}
WAIT=${WAIT:-300}
QW=${QW:-60}
WORK=${WORK:-/tmp/vfs-bench}
mkdir -p "$DEST"
run() {  # run NAME SCRIPT ARGS...
  local name=$1; shift
  "$PY" bench/_common.py wait-quiet "$WAIT"
  echo "== $name ($(date -u +%FT%TZ))" >&2
  "$PY" "$@" --out "$DEST/$name.json" > /dev/null 2> "$DEST/$name.log" || echo "!! $name failed" >&2
  tail -n 2 "$DEST/$name.log" >&2
}
run search_r50l4_n2000  bench/search_bench.py --device cpu --n 2000 --shape r50l4 --repeats 11 --paper-repeats 3 --quiet-wait "$QW"
run search_l3_vit_n2000 bench/search_bench.py --device cpu --n 2000 --shape r50l3,vitb16 --repeats 5 --paper-repeats 1 --quiet-wait "$QW"
run profile_r50l4_n2000 bench/profile_search.py --device cpu --n 2000 --shape r50l4 --repeats 5
run ooc_1GB_400MB       bench/search_bench.py --out-of-core --cache-gb 1 --memory-budget 400MB --repeats 3 --quiet-wait 30 --workdir "$WORK" --keep
run profile_stream_1GB  bench/profile_stream.py "$WORK/ooc_r50l4_1GB.zarr" --memory-budget 400MB --repeats 3 --quiet-wait "$QW"
rm -rf "$WORK/ooc_r50l4_1GB.zarr"
run ooc_4GB_2GB         bench/search_bench.py --out-of-core --cache-gb 4 --memory-budget 2GB --repeats 3 --quiet-wait 30 --workdir "$WORK"
run build_cpu           bench/build_bench.py --device cpu --workers 0,1,2 --repeats 2 --forward-repeats 3 --quiet-wait 30
