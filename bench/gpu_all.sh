#!/usr/bin/env bash
# Every GPU measurement of issue 4 in one run: ≈ 270 s on an H200; the steps' limits add up to 600 s,
# inside the device runner's 600 s per command (STEPS names a subset, e.g. STEPS="tests l4 forms"):
#   0. the engine's search tests and builds on the device (VFS_TEST_DEVICE, tests/conftest.py), and
#      the Triton products compiled there (tests/test_triton_products.py); the search tests again
#      with torch's products (VFS_KERNEL=off)
#   1. search, N=50,000 at 7×7×2048 (ResNet-50 layer4), masks square3/blob/full:
#      vfs vs the paper's CachedSearchTool (fp32 NCHW cache on the GPU, batch 5000) vs fp16 read floor
#   2. search, N=20,000 at 14×14×1024 (layer3), same three masks
#   3. issue 11's shape grid (bench/grid.sh, synthetic shapes at N=N_SYN=2,000, ReLU and signed)
#   4. the fast pass's products alone, each way cuBLAS and Triton run them, on one resident slice
#   5. every exact form forced, at N=20,000 (r50l4, r50l3), with a profile of the planned search
#   6. cache builds on cuda: build_cache images/s vs forward-only, Lite0 and a ResNet-50's layer4
#      (500 Imagenette images BUILD_COPIES = 20 times over)
# JSON files and logs go to DEST (default bench/results/gpu); a summary of every target is printed
# at the end and written to summary.json. Where OUT is set (the device runner's output folder, which
# brings back at most 8 files), DEST defaults to /tmp/gpu and the results come back as
# $OUT/gpu.tgz beside $OUT/summary.json, packed again after every step (a run the runner cuts short
# still returns what it measured).
#
# BUILD_DATA names the build's images where ../shared/data does not travel (a manifest.csv).
# Check it without a GPU (tiny sizes, CPU):
#   DEVICE=cpu N_L4=300 N_L3=100 N_SYN=200 N_FORMS=100 BUILD_LIMIT=64 BUILD_COPIES=2 WORKERS=0 bench/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
N_L4=${N_L4:-50000}
N_L3=${N_L3:-20000}
N_FORMS=${N_FORMS:-20000}
N_SYN=${N_SYN:-2000}  # the grid's synthetic shapes
REPEATS=${REPEATS:-10}
PAPER_REPEATS=${PAPER_REPEATS:-5}
PAPER_BATCH=${PAPER_BATCH:-5000}
BUILD_BATCH=${BUILD_BATCH:-128}
WORKERS=${WORKERS:-4,8}
BUILD_LIMIT=${BUILD_LIMIT:-}
BUILD_DATA=${BUILD_DATA:-}
BUILD_COPIES=${BUILD_COPIES:-20}
STEPS=" ${STEPS:-tests l4 l3 grid products forms build} "
# The steps' limits are a GPU's; the check on a CPU (the paper's code and the builds run there)
# gets SLOW times them
SLOW=${SLOW:-$( [ "$DEVICE" = cpu ] && echo 5 || echo 1 )}
DEST=${DEST:-$( [ -n "${OUT:-}" ] && echo /tmp/gpu || echo bench/results/gpu )}
mkdir -p "$DEST"
start=$(date +%s)

echo "== $(date -u +%FT%TZ) device=$DEVICE python=$PY dest=$DEST" >&2
{ nvidia-smi || true; lscpu | grep -E 'Model name|^CPU\(s\)' || true; } > "$DEST/machine.txt" 2>&1
"$PY" - <<'EOF' >&2 || { echo "torch not importable with $PY" >&2; exit 2; }
import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
                    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

rc=0
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
pack() {  # with OUT set, the results so far: a run cut short by the runner's limit still returns them
  [ -n "${OUT:-}" ] && [ "$DEST" != "$OUT" ] && tar czf "$OUT/gpu.tgz" -C "$(dirname "$DEST")" "$(basename "$DEST")"
  return 0
}
step() {  # step NAME TIMEOUT_S ARGS...
  local name=$1 limit=$(( $2 * SLOW )); shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - start ))s elapsed)" >&2
  timeout "$limit" "$PY" "$@" --out "$DEST/$name.json" > /dev/null 2> "$DEST/$name.log"
  local r=$?
  tail -n 4 "$DEST/$name.log" >&2
  [ $r -eq 0 ] || { echo "!! $name failed (exit $r), see $DEST/$name.log" >&2; rc=1; }
  pack
}

if wanted tests; then
  echo "== tests on $DEVICE ($(( $(date +%s) - start ))s elapsed)" >&2
  VFS_TEST_DEVICE="$DEVICE" timeout $(( 120 * SLOW )) "$PY" -m pytest -q -p no:cacheprovider tests/test_search.py \
    tests/test_search_bound.py tests/test_properties.py tests/test_array_features.py tests/test_build.py \
    tests/test_triton_products.py \
    > "$DEST/tests.log" 2>&1 || { echo "!! tests on $DEVICE failed, see $DEST/tests.log" >&2; rc=1; }
  tail -n 3 "$DEST/tests.log" >&2
  # torch's products, where Triton's do not build (VFS_KERNEL=off turns them off)
  VFS_KERNEL=off VFS_TEST_DEVICE="$DEVICE" timeout $(( 60 * SLOW )) "$PY" -m pytest -q -p no:cacheprovider tests/test_search.py \
    tests/test_search_bound.py > "$DEST/tests_torch_products.log" 2>&1 \
    || { echo "!! tests on $DEVICE without Triton failed, see $DEST/tests_torch_products.log" >&2; rc=1; }
  tail -n 1 "$DEST/tests_torch_products.log" >&2
  pack
fi

wanted l4 && step search_r50l4_n${N_L4} 80 bench/search_bench.py --device "$DEVICE" --n "$N_L4" --shape r50l4 \
  --mask all --repeats "$REPEATS" --paper-repeats "$PAPER_REPEATS" --paper-batch "$PAPER_BATCH"
wanted l3 && step search_r50l3_n${N_L3} 70 bench/search_bench.py --device "$DEVICE" --n "$N_L3" --shape r50l3 \
  --mask all --repeats "$REPEATS" --paper-repeats "$PAPER_REPEATS" --paper-batch "$PAPER_BATCH"
# Issue 11's shape grid (synthetic ViT-B/16, R50 layer3/layer4 at N=2,000, ReLU and signed features)
if wanted grid; then
  echo "== grid ($(( $(date +%s) - start ))s elapsed)" >&2
  DEVICE="$DEVICE" N_SYN="$N_SYN" REAL=0 WAIT=0 REPEATS="$REPEATS" PAPER_REPEATS=2 PY="$PY" \
    timeout $(( 90 * SLOW )) bench/grid.sh "$DEST/grid" >&2 || { echo "!! grid failed, see $DEST/grid/*.log" >&2; rc=1; }
  pack
fi
# The products alone on one 4 GiB slice: cuBLAS's and Triton's, against the read floor
[ "$DEVICE" = cuda ] && wanted products && step products 35 bench/gpu_products.py --repeats 5
# Each exact form forced in turn (the data to fit _PRODUCT_COST["cuda"]), and a profile of the planned search
wanted forms && step forms_n${N_FORMS} 70 bench/forms_bench.py --device "$DEVICE" --shape r50l4,r50l3 \
  --n "$N_FORMS" --profile
# The builds: the embedded Lite0 (decoding bounds it) and a ResNet-50 (random weights: no download),
# each from the 500 images BUILD_COPIES times over (past the DataLoader's start-up)
wanted build && step build_${DEVICE} 40 bench/build_bench.py --device "$DEVICE" --batch-size "$BUILD_BATCH" \
  --workers "$WORKERS" --forward-repeats 3 --copies "$BUILD_COPIES" ${BUILD_LIMIT:+--limit "$BUILD_LIMIT"} \
  ${BUILD_DATA:+--data "$BUILD_DATA"}
wanted build && step build_r50_${DEVICE} 35 bench/build_bench.py --device "$DEVICE" --batch-size "$BUILD_BATCH" \
  --model 'timm:resnet50?pretrained=false' --layer layer4 --workers "$WORKERS" --forward-repeats 3 \
  --copies "$BUILD_COPIES" ${BUILD_LIMIT:+--limit "$BUILD_LIMIT"} ${BUILD_DATA:+--data "$BUILD_DATA"}

"$PY" - "$DEST" <<'EOF'
import json, sys
from pathlib import Path
dest = Path(sys.argv[1]); rows = []
for f in sorted(dest.glob("search_*.json")):
    d = json.loads(f.read_text())
    for c in d["cases"]:
        rows.append({"file": f.name, "shape": c["shape"], "n": c["n"], "mask": c["mask"],
                     "vfs_ms_min": c["vfs"]["min_ms"], "vfs_ms_median": c["vfs"]["median_ms"],
                     "paper_ms_min": c.get("paper", {}).get("min_ms"), "floor_ms_min": c["floor"]["min_ms"],
                     "speedup": (c.get("speedup_vs_paper") or {}).get("min"), "vs_floor": c["vfs_over_floor"]["min"],
                     "same_top10": c.get("same_top10"), "targets": c["targets"]})
for f in sorted(dest.glob("products.json")):
    for c in json.loads(f.read_text())["cases"]:
        rows.append({"file": f.name, "shape": c["shape"], "n": c["n"], "tb_per_s": c["tb_per_s"]})
for f in sorted(dest.glob("build_*.json")):
    d = json.loads(f.read_text())
    rows.append({"file": f.name, "forward_images_per_s": d["forward_only"]["images_per_s"],
                 "build_images_per_s": d["best_build_images_per_s"], "best_workers": d["best_workers"],
                 "ratio": d["ratio"], "targets": d["targets"]})
(dest / "summary.json").write_text(json.dumps(rows, indent=1))
for r in rows:
    print(json.dumps(r))
EOF
[ -n "${OUT:-}" ] && cp "$DEST/summary.json" "$OUT/" 2>/dev/null
pack
echo "== done in $(( $(date +%s) - start ))s, rc=$rc" >&2
exit $rc
