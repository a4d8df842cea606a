#!/usr/bin/env bash
# One command for a lent GPU machine: the GPU correctness tests, then the GPU benchmarks, then the
# report. OUTDIR receives 8 files (the device tool's limit): machine.txt, gpu_tests.log, bench.log,
# three benchmark JSON files, RESULTS_gpu.md and results_gpu.png; the table is printed last.
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# The GPU image has torch, triton, pytest and pytest-benchmark but nothing from outside: carry the
# peers as wheels (downloaded here, .whl/ is git-ignored) and name .whl in the device tool's carry:
#   pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy trl==1.16.0
# Budget: tests <= 4 min, benchmarks <= 4.5 min; each step is cut off by `timeout`, never the call.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG="$OUT/bench.log"

SITE=/tmp/ngrpo_site
if compgen -G ".whl/*.whl" >/dev/null; then
  pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" >>"$LOG"
fi
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
unset TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  >"$OUT/machine.txt" 2>&1

# The kernel tests (the trainer's tests are CPU-only and need packages the GPU image lacks).
timeout 240 python -m pytest -q -ra tests/test_advantages.py tests/test_policy_loss.py tests/test_validation.py \
  tests/test_linear_logprobs.py tests/test_fused_loss.py >"$OUT/gpu_tests.log" 2>&1
echo "GPU tests exit code: $?" | tee -a "$OUT/machine.txt"
tail -3 "$OUT/gpu_tests.log"

# One JSON per benchmark file, each under its own time limit: a cut-off run loses only its own file.
json=()
for spec in "bench_fused_loss 170" "bench_logprobs 70" "bench_advantages 30"; do
  set -- $spec
  echo "=== $1" >>"$LOG"
  (cd benchmarks && timeout "$2" python -m pytest -q "$1.py" --benchmark-json="$OUT/$1.json") >>"$LOG" 2>&1
  echo "$1 exit code: $?" | tee -a "$OUT/machine.txt"
  [ -s "$OUT/$1.json" ] && json+=("$OUT/$1.json")
done

if [ ${#json[@]} -gt 0 ]; then
  python benchmarks/report.py "${json[@]}" --out "$OUT/RESULTS_gpu.md" --plot "$OUT/results_gpu.png" \
    --title "GPU benchmark results" >/dev/null 2>>"$LOG"
  cat "$OUT/machine.txt" "$OUT/RESULTS_gpu.md"
else
  echo "no benchmark JSON (see bench.log)"; tail -20 "$LOG"
fi
