#!/usr/bin/env bash
# One command for a lent GPU machine: ~2.5-3.5 minutes with --no-peers (135-206 s on an H200, 2026-11-27/28),
# 342 s with the peers (2026-11-28). Writes under OUTDIR:
#   head.md / head.json   the head ops against cuBLAS in one process (N = 4096, 16384; fused loss also at
#                         32768 and with 34 % padding), float64 checks on the GPU, isolated vs queued vs
#                         CUDA-graph times, per-kernel profiles
#   clocks.csv            SM clock, power, temperature, throttle reasons (nvidia-smi, every 250 ms)
#   gpu_tests.log         the kernel tests on the GPU (pytest-xdist, 16 workers, one per CPU core: 105 s with
#                         8 on an H200, 16 not yet timed) and their 20 slowest
#   tune/head.md, tune.log   with --tune: the GEMM configuration experiments (gpu_head.py --tune --gemms,
#                         the warp-specialised candidates among them:
#                         the fused loss end to end with alternative GEMM configurations, each GEMM and the
#                         dZ pass against cuBLAS / a copy; within its 200 s cap on an H200, 2026-11-28), after the tests
#   bench.log, bench_*.json, peers.jsonl, RESULTS_gpu.md   pytest benchmarks against the peers (unless --no-peers)
#   machine.txt
# and prints the head table first, then the test verdict.
#
#   benchmarks/gpu_suite.sh OUTDIR [--no-peers] [--no-tests] [--tune]
#
# It writes more files than the device tool brings back (8): write them elsewhere and pack them. The suite
# keeps to a deadline of its own (SUITE_SECONDS, default 520 s from its start): each step gets at most its
# own limit (240, 200, 150, 90 s) and never more than the time left, less 15 s for the summaries, and is
# stopped by SIGINT, on which gpu_head.py and pytest-benchmark write what they measured (SIGKILL 20 s later).
# A step with under 30 s left is skipped and says so. The outer timeout is a safety net only; it must stay
# under the call's own limit (timeout_s 600 here), or the tool kills the packing too. The last command
# prints head.md's tables without its long profiles (the tool shows only the last 12,000 characters):
#   timeout 575 bash benchmarks/gpu_suite.sh /tmp/s; tar czf $OUT/suite.tgz -C /tmp s; sed -n '/^###/,/^### Host profile/p' /tmp/s/head.md | head -c 11000
# With --tune the GEMM configuration experiments run after the tests and before the peers (which the deadline
# then cuts first); on their own: cd benchmarks && PYTHONPATH=.. python gpu_head.py --out DIR --no-tables --tune --gemms
#
# The GPU image has torch, triton, transformers, accelerate, pandas, pytest, pytest-xdist and pytest-benchmark,
# but no peer: carry them as wheels (downloaded here, .whl/ is git-ignored) and name .whl in the device tool's
# carry (TRL's chunked head imports datasets in its backward; without it that peer is skipped):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 verl==0.9.1 datasets==4.7.0 dill==0.4.0 \
#     multiprocess==0.70.18
# (verl's fused heads are loaded from its files without its dependencies: benchmarks/impls.py)
# A copy of an earlier ngrpo_kernels renamed ngrpo_base in .baseline/ (carried too) is timed beside
# this tree for before/after tables:
#   mkdir -p .baseline && git archive REV ngrpo_kernels | tar -x -C .baseline && mv .baseline/ngrpo_kernels .baseline/ngrpo_base
set -uo pipefail
DEADLINE=${SUITE_SECONDS:-520}
# limit CAP: the seconds a step may run, at most CAP and the time left less 15 s; 0 (skip) under 30 s.
limit() { local left=$((DEADLINE - SECONDS - 15)); [ "$left" -lt 30 ] && echo 0 && return; echo $((left < $1 ? left : $1)); }
step() {  # step NAME CAP COMMAND...: runs COMMAND under its limit, SIGINT first; says when it was skipped
  local name=$1 t; t=$(limit "$2"); shift 2
  if [ "$t" = 0 ]; then echo "$name: skipped, the suite's ${DEADLINE} s deadline is near" | tee -a "$OUT/machine.txt"; return 124; fi
  # SIGINT as the default action in the step: a shell that starts the suite in the background passes it on
  # ignored, and Python would then never raise KeyboardInterrupt (nor pytest write its JSON)
  timeout -s INT -k 20 "$t" python -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}
OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [--no-peers] [--no-tests] [--tune]}
PEERS=1
TESTS=1
TUNE=0
for flag in "${@:2}"; do
  case "$flag" in
    --no-peers) PEERS=0 ;;
    --no-tests) TESTS=0 ;;
    --tune) TUNE=1 ;;
    *) echo "unknown flag $flag" >&2; exit 2 ;;
  esac
done
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)  # absolute: the steps below run from the repository root
cd "$(dirname "$0")/.."
LOG="$OUT/bench.log"

SITE=/tmp/ngrpo_site
if compgen -G ".whl/*.whl" >/dev/null; then
  pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" >>"$LOG"
fi
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  >"$OUT/machine.txt" 2>&1

# SM clock, power and throttle reasons every 250 ms while the suite runs: a sustained GEMM load can
# lower the clocks, which the medians then carry.
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
  --format=csv -lms 250 >"$OUT/clocks.csv" 2>/dev/null &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

# 1. The head ops against cuBLAS, checks against float64, where the time goes (isolated / queued /
#    CUDA graph / host), per-kernel profiles (~2-3 minutes).
baseline=()
[ -d .baseline/ngrpo_base ] && baseline=(--baseline ../.baseline)
(cd benchmarks && step gpu_head 240 python gpu_head.py --out "$OUT" --check --diagnose --profile "${baseline[@]}") \
  >"$OUT/head.log" 2>&1
echo "gpu_head exit code: $? (1: a float64 check failed, 2: a section failed, 130/124: cut off)" | tee -a "$OUT/machine.txt"
sed -n '/^###/,$p' "$OUT/head.md" 2>/dev/null | sed '/Per-kernel profile/,$d'

# 2. The kernel tests (the trainer's tests are CPU-only and need packages the GPU image lacks).
if [ "$TESTS" = 1 ]; then
  step "GPU tests" 200 python -m pytest -q -ra -n 16 -p no:cacheprovider --durations=20 tests/test_advantages.py tests/test_policy_loss.py \
    tests/test_validation.py tests/test_linear_logprobs.py tests/test_fused_loss.py tests/test_persistent_gemm.py \
    tests/test_compile.py tests/test_benchmark_peers.py tests/test_launcher.py \
    -k "cuda or persistent_gemm or either_dense or one_chunk or on_a_gpu" >"$OUT/gpu_tests.log" 2>&1
  echo "GPU tests exit code: $?" | tee -a "$OUT/machine.txt"
  grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -1
fi

# 2b. With --tune: the GEMM configuration experiments (docs/kernels.md "Measuring").
if [ "$TUNE" = 1 ]; then
  (cd benchmarks && step "GEMM configurations" 200 python gpu_head.py --out "$OUT/tune" --no-tables --tune --gemms) \
    >"$OUT/tune.log" 2>&1
  echo "GEMM configurations exit code: $?" | tee -a "$OUT/machine.txt"
  sed -n '/^###/,$p' "$OUT/tune/head.md" 2>/dev/null
fi

# 3. The peers (pytest-benchmark) at the 7B head, N = 16384, all valid: ~14 implementations, torch.compile
#    compiling its own; each finished benchmark is also appended to peers.jsonl, so a step cut off by its
#    timeout keeps what it measured (a 60 s budget for the fused loss measured 13 of them on an H200 and
#    lost all: pytest-benchmark writes its JSON at the end).
if [ "$PEERS" = 1 ]; then
  json=()
  for spec in "bench_fused_loss 150" "bench_logprobs 90"; do
    set -- $spec
    echo "=== $1" >>"$LOG"
    (cd benchmarks && BENCH_ROWS="$OUT/peers.jsonl" step "$1" "$2" python -m pytest -q -rs "$1.py" \
      -k "N16384-H3584-V152064-bfloat16 and not padded" --benchmark-json="$OUT/$1.json") >>"$LOG" 2>&1
    echo "$1 exit code: $?" | tee -a "$OUT/machine.txt"
    [ -s "$OUT/$1.json" ] && json+=("$OUT/$1.json")
  done
  if [ ${#json[@]} -gt 0 ]; then
    python benchmarks/report.py "${json[@]}" --out "$OUT/RESULTS_gpu.md" --title "GPU benchmark results" \
      >/dev/null 2>>"$LOG" && tail -30 "$OUT/RESULTS_gpu.md"
  fi
  [ -s "$OUT/peers.jsonl" ] && python - "$OUT/peers.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for op in dict.fromkeys(r["op"] for r in rows):
    mine = [r for r in rows if r["op"] == op]
    print(f"\n{op}, {mine[0]['case']} (median ms, x the GEMM floor timed before each round, peak GiB)")
    for r in sorted(mine, key=lambda r: r["median_ms"]):
        floor = r.get("floor_median_ms")
        ratio = f"{r['median_ms'] / floor:.3f}" if floor else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"  {r['impl']:16s} {r['median_ms']:9.2f} {ratio:>7s} {peak:>7s}")
PY
fi
cat "$OUT/machine.txt"
