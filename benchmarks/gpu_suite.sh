#!/usr/bin/env bash
# One command for a lent GPU machine: the GPU correctness tests, then the GPU benchmarks, then the
# report; logs, JSON, the table and the plot land in OUTDIR and the table is printed last.
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# The GPU image has torch, triton, pytest and pytest-benchmark but nothing from outside: carry the
# peers as wheels (downloaded here, .whl/ is git-ignored) and name .whl in the device tool's carry:
#   pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy trl==1.16.0
# Budget: tests <= 4 min, benchmarks <= 4.5 min (each step is cut off by `timeout`, never the call).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

SITE=/tmp/ngrpo_site
if compgen -G ".whl/*.whl" >/dev/null; then
  pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >"$OUT/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
fi
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
unset TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  >"$OUT/machine.txt" 2>&1

timeout 240 python -m pytest tests -q -ra >"$OUT/gpu_tests.log" 2>&1
echo "GPU tests exit code: $?" | tee -a "$OUT/machine.txt"
tail -5 "$OUT/gpu_tests.log"

(cd benchmarks && timeout 270 python -m pytest -q . --benchmark-json="$OUT/bench.json") >"$OUT/bench.log" 2>&1
echo "GPU benchmarks exit code: $?" | tee -a "$OUT/machine.txt"

if [ -s "$OUT/bench.json" ]; then
  python benchmarks/report.py "$OUT/bench.json" --out "$OUT/RESULTS_gpu.md" --plot "$OUT/results_gpu.png" \
    --title "GPU benchmark results" >/dev/null 2>"$OUT/report.log"
  cat "$OUT/machine.txt" "$OUT/RESULTS_gpu.md"
else
  echo "no benchmark JSON (see $OUT/bench.log)"; tail -20 "$OUT/bench.log"
fi
