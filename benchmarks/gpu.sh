#!/usr/bin/env bash
# One command that turns a short GPU window into committed evidence:
#
#   bash benchmarks/gpu.sh OUT_DIR [--dry-run]
#
# On a machine with a CUDA build of torch and nvcc it builds the extension
# (pip install --no-build-isolation -e .), runs the test suite's CUDA cases (IWAE_EXT_TESTS=cuda:
# every case with a "cuda" device parameter or the cuda marker; CI runs the CPU ones; a failure
# does not stop the benchmarks), every benchmark with --device cuda and the training-step
# benchmark, and writes into OUT_DIR: one log per part, the benchmarks' JSON, pytest.xml,
# parts.jsonl (each part's exit status and seconds) and summary.md (device, torch, each goal
# with its measured figure and pass/fail).
#
# Time limits per part on one H100 or H200 (each part gets SIGTERM at its limit, which pytest
# takes as an interrupt and still writes its report, and the next part runs; the whole finishes
# within 8 minutes): build 110 s, tests 100 s (8 pytest-xdist workers where xdist is
# installed), logmeanexp 40 s, bayes_linear 40 s, decoder (bernoulli_log_prob) 35 s, ais 65 s
# (float32 and bf16 interior gradients), train step (k=50, batch 20: compiled and eager, and
# eager bf16) 60 s, train step in tf32 25 s, environment and summary a few seconds: 475 s of
# limits.
#
# --dry-run: the same parts on the CPU at toy sizes (a CPU build, tests/test_build.py only, tiny
# benchmark shapes), in well under 3 minutes; CI runs it so that this script cannot rot.
#
# On the device tool, whose $OUT brings back at most 8 files, write elsewhere and pack:
#   bash benchmarks/gpu.sh /tmp/gpu; tar czf $OUT/gpu.tar.gz -C /tmp gpu; cp /tmp/gpu/summary.md $OUT/
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu.sh OUT_DIR [--dry-run]" >&2; exit 2; }
OUT_DIR="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    -*) echo "gpu.sh: unknown option $arg" >&2; usage ;;
    *) [ -z "$OUT_DIR" ] || usage; OUT_DIR="$arg" ;;
  esac
done
[ -n "$OUT_DIR" ] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export CI="${CI:-true}"            # the derandomised hypothesis profile
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
: > "$OUT_DIR/parts.jsonl"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  export CUDA_VISIBLE_DEVICES=""   # the CPU even where a GPU is visible
  T_BUILD=300 T_TESTS=120 T_LME=150 T_BL=60 T_DEC=60 T_AIS=60 T_TRAIN=150 T_TF32=60  # caps, not budgets: a loaded CPU
  BUILD_CUDA=auto                  # whatever this torch can build
  TESTS=(tests/test_build.py)
  LME_ARGS=(--shapes 20x50 100x50 --no-compile)
  BL_ARGS=(--rows 64 --rounds 3 --no-memory)
  DEC_ARGS=(--toy --rounds 2)
  AIS_ARGS=(--chains 32 --temps 3 --leapfrog 2 --rounds 3)
  TRAIN_ARGS=(--rounds 2 --steps 3 --k 50 --batch-size 20 --only twin plain bf16)
  TF32_ARGS=(--rounds 2 --steps 3 --k 50 --batch-size 20 --only bf16)   # on the CPU: bf16 again
else
  DEVICE=cuda
  T_BUILD=110 T_TESTS=100 T_LME=40 T_BL=40 T_DEC=35 T_AIS=65 T_TRAIN=60 T_TF32=25
  BUILD_CUDA=1                     # the CUDA kernels, or fail
  export IWAE_EXT_TESTS=cuda       # the CUDA cases only
  TESTS=(tests)
  if "$PY" -c "import xdist" 2>/dev/null; then TESTS+=(-n 8); fi
  LME_ARGS=(--no-compile)          # torch.compile of the twin costs a minute of compiles
  BL_ARGS=()
  DEC_ARGS=(--rounds 11 --e2e-rounds 1 --skip-train)
  AIS_ARGS=(--rounds 7)
  TRAIN_ARGS=(--k 50 --batch-size 20 --steps 200 --rounds 3 --only twin plain bf16)
  TF32_ARGS=(--k 50 --batch-size 20 --steps 100 --rounds 3 --only bf16 --tf32)
fi

# part NAME LIMIT_SECONDS COMMAND...: runs COMMAND under a time limit, output to NAME.log,
# its exit status and seconds appended to parts.jsonl; never stops the script.
part() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit} s)"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  printf '{"part": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" \
    $((SECONDS - t0)) "$limit" >> "$OUT_DIR/parts.jsonl"
  echo "    rc $rc, $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')"
  tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/    | /'
  return 0
}

start=$SECONDS
"$PY" - "$OUT_DIR/environment.json" "$DEVICE" "$DRY" <<'PY'
import datetime, json, platform, subprocess, sys
import torch
env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "device_kind": sys.argv[2], "dry_run": sys.argv[3] == "1", "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "python": platform.python_version(),
       "cuda_available": torch.cuda.is_available(), "host": platform.node()}
if torch.cuda.is_available() and sys.argv[2] == "cuda":
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
               multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"not available ({e})"
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=1)
print(json.dumps(env))
PY

part build "$T_BUILD" env IWAE_EXT_CUDA="$BUILD_CUDA" bash -c '
  "$1" -m pip install --no-build-isolation --no-deps -e . ||
    { echo "gpu.sh: pip failed; building in place instead"; "$1" setup.py build_ext --inplace; }
  "$1" -c "import iwae_ext, json; print(json.dumps(iwae_ext.build_info()))"' _ "$PY"
# pytest through a wrapper that turns SIGTERM (and SIGINT, which a background job may inherit
# ignored) into KeyboardInterrupt, after which pytest still writes pytest.xml
part tests "$T_TESTS" "$PY" -c '
import signal, sys
def interrupt(signum, frame):
    raise KeyboardInterrupt
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, interrupt)
import pytest
sys.exit(pytest.main(sys.argv[1:]))' -q -p no:cacheprovider "${TESTS[@]}" \
  --junitxml "$OUT_DIR/pytest.xml" -o junit_family=xunit2
part logmeanexp "$T_LME" "$PY" benchmarks/bench_logmeanexp.py --device "$DEVICE" \
  --out "$OUT_DIR/logmeanexp.json" "${LME_ARGS[@]}"
part bayes_linear "$T_BL" "$PY" benchmarks/bench_bayes_linear.py --device "$DEVICE" \
  --out "$OUT_DIR/bayes-linear.json" "${BL_ARGS[@]}"
part decoder "$T_DEC" "$PY" benchmarks/bench_decoder.py --device "$DEVICE" \
  --out "$OUT_DIR/decoder.json" "${DEC_ARGS[@]}"
part ais "$T_AIS" "$PY" benchmarks/bench_ais.py --device "$DEVICE" \
  --out "$OUT_DIR/ais.json" "${AIS_ARGS[@]}"
part train "$T_TRAIN" "$PY" benchmarks/bench_train.py --device "$DEVICE" \
  --out "$OUT_DIR/train.json" "${TRAIN_ARGS[@]}"
part train_tf32 "$T_TF32" "$PY" benchmarks/bench_train.py --device "$DEVICE" \
  --out "$OUT_DIR/train-tf32.json" "${TF32_ARGS[@]}"
"$PY" benchmarks/gpu_summary.py "$OUT_DIR" --total-seconds $((SECONDS - start))
echo "gpu.sh: $((SECONDS - start)) s; $OUT_DIR/summary.md"
