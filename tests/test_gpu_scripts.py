"""The scripts a lent GPU runs (benchmarks/gpu_suite.sh -> gpu_head.py, gpu_trainer.sh) must work the first
time: a GPU session has 15 minutes, and a script that breaks there wastes them. gpu_head.py runs every
section on the CPU at tiny shapes (``--smoke``: the Triton interpreter, no CUDA); the shell scripts are
parsed; the host-work guard counts the launches each head pass makes before its first GEMM."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["Correctness against float64", "No-grad log-probs", "Log-probs + entropy, forward and backward",
            "Fused NGRPO loss", "Each GEMM of one chunk", "Sweep", "Fused loss with alternative GEMM configurations",
            "Isolated call, queued behind GPU work",
            "Host profile: no-grad", "Host profile: fused loss", "Per-kernel profile: fused loss"]


def _env():
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))


def _gpu_head():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_head
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_head


def test_gpu_head_runs_every_section(tmp_path):
    out = tmp_path / "head"
    proc = subprocess.run(
        [sys.executable, "gpu_head.py", "--smoke", "--out", str(out), "--check", "--diagnose", "--gemms", "--sweep",
         "--tune", "--profile", "--reps", "1", "--sizes", "32", "--loss-sizes", "32"],
        cwd=ROOT / "benchmarks", env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "head.md").read_text()
    for section in SECTIONS:
        assert f"### {section}" in md, section
    rows = json.loads((out / "head.json").read_text())["rows"]
    ops = {r["op"] for r in rows}
    assert {"logprobs_no_grad", "logprobs_grad", "fused_loss", "gemm_chunk", "diagnose", "tune_fused_loss"} <= ops
    assert "Did not run" not in md  # every configuration of --gemms and --tune ran (the interpreter has no limits)
    assert "   own us    cum us  ncalls  function" in md  # the host profile in microseconds
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)
    check = json.loads((out / "head.json").read_text())["check"]
    assert all(c["finite"] for c in check.values())
    assert check["fused_loss fp16"]["dx_rel"] < 2 * check["fused_loss fp16"]["floor_dx_rel"] + 1e-3
    assert json.loads((out / "head.json").read_text())["check_failures"] == []
    assert "**Checks: all passed**" in md


def test_gpu_head_without_its_tables(tmp_path):
    """--no-tables (gpu_suite.sh --tune's step): only the sections asked for run, not the three head tables
    again (about a minute of a GPU session)."""
    proc = subprocess.run([sys.executable, "gpu_head.py", "--smoke", "--no-tables", "--out", str(tmp_path)],
                          cwd=ROOT / "benchmarks", env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "head.md").read_text()
    assert md.startswith("Device: ") and "### " not in md
    assert json.loads((tmp_path / "head.json").read_text())["rows"] == []


def test_precision_probe_runs():
    """benchmarks/precision_probe.py (the signed errors behind the checks' tensor-core yardstick), on a tiny head:
    every line it prints, with finite numbers."""
    proc = subprocess.run([sys.executable, "benchmarks/precision_probe.py"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("ours, fused_linear_ngrpo_loss"), proc.stdout
    assert "nan" not in proc.stdout and "inf" not in proc.stdout


def test_gpu_head_checks_can_fail():
    """--check's verdict (the exit code and head.md's line) names each bound a broken kernel breaks."""
    gpu_head = _gpu_head()
    fused = dict(finite=True, masked_dx_zero=True, loss_rel=1e-8, f32_loss_rel=1e-8, adv_scale_rel=10.0, dx_rel=3e-3,
                 dw_rel=3e-3, naive_bf16_dx_rel=2e-2, naive_bf16_dw_rel=2e-2)
    lp = dict(finite=True, ignored_zero=True, lp_max_abs=2e-5, lp_bias=1.4e-5, tc_lp_bias=1.4e-5, ent_max_abs=3e-5,
              dx_rel=2e-3, dw_rel=2e-3)
    fp16 = dict(finite=True, dx_rel=3e-4, dw_rel=3e-4, floor_dx_rel=2e-4, floor_dw_rel=2e-4)
    res = {f"{op} {tag}": dict(r) for tag in ("all valid", "padded (NaN in padding)")
           for op, r in (("fused_loss", fused), ("logprobs", lp))}
    res["fused_loss fp16"] = fp16
    assert gpu_head.check_failures(res) == []
    res["fused_loss all valid"]["dw_rel"] = 0.5
    res["logprobs padded (NaN in padding)"]["ent_max_abs"] = float("nan")
    res["fused_loss fp16"]["finite"] = False
    res["fused_loss padded (NaN in padding)"]["loss_rel"] = 1e-4  # bound: 2.8e-5 + 4e-8 + 1e-5
    failures = gpu_head.check_failures(res)
    assert len(failures) == 4 and "dw rel 5.0e-01" in failures[0] and "loss rel 1.0e-04" in failures[1], failures
    assert "fp16" in failures[3]
    res = {k: dict(v) for k, v in res.items()}
    res["logprobs all valid"]["lp_bias"] = 5e-5  # a log-prob bias of our own, beyond the tensor cores'
    assert any("mean log-prob error 5.0e-05" in f for f in gpu_head.check_failures(res))


@pytest.mark.parametrize("stop", [RuntimeError("a broken section"), KeyboardInterrupt()])
def test_gpu_head_keeps_what_it_measured_when_a_section_fails_or_is_cut_off(tmp_path, monkeypatch, stop):
    """A GPU run is too scarce to lose to one error: a section that raises is written down in head.md and the
    others still run (exit code 2); the suite's step limit (SIGINT) ends the run with head.md written and says
    where (exit code 130). head.md used to be written only at the very end."""
    gpu_head = _gpu_head()
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise stop

    monkeypatch.setattr(gpu_head, "check", fail)
    monkeypatch.setattr(gpu_head, "make_inputs", fail)
    monkeypatch.setattr(sys, "argv", ["gpu_head.py", "--smoke", "--out", str(tmp_path), "--check"])
    for name in ("H", "V", "DEV", "DT", "OUT_DIR"):  # --smoke rebinds the module's shape globals
        monkeypatch.setattr(gpu_head, name, getattr(gpu_head, name))
    code = gpu_head.main()
    md = (tmp_path / "head.md").read_text()
    if isinstance(stop, KeyboardInterrupt):
        assert code == 130 and len(calls) == 1 and "**Cut off after" in md
    else:
        errors = json.loads((tmp_path / "head.json").read_text())["section_errors"]
        assert code == 2 and len(calls) == 4 and len(errors) == 4  # the checks and the three timed sections
        assert "**the float64 checks failed**: `RuntimeError: a broken section`" in md
        assert "### Fused NGRPO loss, forward + backward" in md  # the last section still ran (and wrote its table)


@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_trainer.sh"])
def test_gpu_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_launches_before_the_first_gemm_stay_few():
    """An isolated call pays every launch before its first GEMM in host latency (benchmarks/RESULTS_gpu.md:
    the isolated-call excess at 4k tokens). Only the compaction may come first (one launch: the predicate
    inside, the first chunk's hidden rows gathered by it); the per-token arrays follow the GEMM."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "launch_count.py"), "--host"], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {}
    for line in proc.stdout.splitlines():
        found = re.match(r"(.+): before the first GEMM (\d+) ATen \+ (\d+) Triton launches", line)
        if found:
            counts[found.group(1)] = int(found.group(2)) + int(found.group(3))
    assert proc.stdout.count("host us around the launches") == 2, proc.stdout  # --host ran (timings not judged)
    assert counts["no-grad log-probs"] <= 1
    assert counts["fused loss (forward, gradients formed)"] <= 1


def test_a_baseline_that_registers_the_same_custom_ops_is_refused(tmp_path):
    """A baseline copy from 34735e9 on registers the ngrpo:: custom ops again: torch would replace this tree's
    (the "through the custom op" rows would time the baseline, and torch 2.11 segfaults). Not loaded."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_head
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    package = tmp_path / "ngrpo_base"
    package.mkdir()
    (package / "__init__.py").write_text("import torch.library\n")
    assert gpu_head.load_baseline(str(tmp_path)) is None
    assert gpu_head.load_baseline(None) is None
    (package / "__init__.py").write_text("VERSION = 'before the custom ops'\n")  # an older copy loads
    try:
        assert gpu_head.load_baseline(str(tmp_path)).VERSION == "before the custom ops"
    finally:
        sys.modules.pop("ngrpo_base", None)
        sys.path.remove(str(tmp_path))


def test_gemm_config_overrides_reach_backward():
    """gpu_head times variants through configs.override; on a GPU autograd's device thread would not see the
    override's context variable, so backward must run on the calling thread while it is active."""
    from ngrpo_kernels.ops.persistent_gemm import configs

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(configs.config_for("logits", torch.bfloat16, torch.device("cpu")))
            return g

    marker = configs.GemmConfig(16, 16, 16, 1, 1, 1, tma=False)
    x = torch.ones(2, requires_grad=True)
    with configs.override(logits=marker):
        assert not torch._C._is_multithreading_enabled()
        Probe.apply(x).sum().backward()
    assert seen == [marker] and torch._C._is_multithreading_enabled()
