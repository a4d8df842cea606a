"""Every implementation the benchmarks compare, as factories: ``factory(case) -> callable`` that runs one
forward+backward (or one no-grad pass) and returns only when the device is done, or raises
``Unavailable(reason)`` where it cannot run (missing package, CPU-only or GPU-only).

All of them compute the same NGRPO token-mean loss (eps 0.16 / 0.24, no KL, no entropy bonus: the
peers that lack an entropy term are compared on equal work) from the same inputs: hidden states
[B, T, H], the lm_head weight [V, H], sampled tokens, old log-probs and per-sequence advantages.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch._dynamo

import ngrpo_kernels as nk
from ngrpo_kernels.backend import interpreter_enabled
from ngrpo_kernels.ops.policy_loss.naive import policy_loss_naive

# The torch.compile rows compile with static shapes, one graph per benchmark case; Dynamo keeps 8 graphs per
# function by default and would run a 9th case eagerly under the torch.compile label.
for _limit in ("recompile_limit", "cache_size_limit"):  # the name in newer torch, the older one
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, max(getattr(torch._dynamo.config, _limit), 64))
        break


class Unavailable(Exception):
    """This implementation cannot run here (the reason says why)."""


def _peer(module: str, name: str, package: str):
    """``module.name`` from a peer library, or Unavailable (missing, or present without its own
    dependencies, as on a bare GPU image)."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as err:
        raise Unavailable(f"{package} not importable ({type(err).__name__}: {err})") from None


def _gpu_only(case):
    if case.device != "cuda":
        raise Unavailable("Triton GPU kernel")


@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    H: int
    V: int
    dtype: torch.dtype
    device: str
    sequences: int = 8
    padded: bool = False  # response lengths uniform in [T/4, T] (37.5 % padding in expectation), as in RL batches

    @property
    def label(self) -> str:
        pad = "-padded" if self.padded else ""
        return f"N{self.N}-H{self.H}-V{self.V}-{str(self.dtype).replace('torch.', '')}{pad}"


@functools.lru_cache(maxsize=4)
def inputs(case: Case):
    g = torch.Generator().manual_seed(0)
    B, T = case.sequences, case.N // case.sequences
    hidden = torch.randn(B, T, case.H, generator=g)
    weight = torch.randn(case.V, case.H, generator=g) * (4.0 / case.H) ** 0.5  # logits with std ~2
    targets = torch.randint(0, case.V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    if case.padded:
        lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
    noise = torch.randn(B, T, generator=g) * 0.1
    # every group of 4 mixed (no zero advantage: seed 0 once drew an all-correct batch, loss and gradients 0)
    rewards = (torch.arange(B) % 3 == 0).float()
    adv = nk.ngrpo_advantages(rewards, torch.arange(B) // 4)
    dev, dt = case.device, case.dtype
    hidden, weight, targets = hidden.to(dev, dt), weight.to(dev, dt), targets.to(dev)
    old = head_logprobs(hidden, weight, targets) + noise.to(dev)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask.to(dev), old=old, adv=adv.to(dev))


def head_logprobs(hidden, weight, targets, chunk=2048):
    """The head's own log-probs of ``targets`` (plain PyTorch, in chunks of tokens): the benchmarks' old
    log-probs are these plus noise of std 0.1, so that the ratios are near 1 as in an RL step (most tokens
    inside the clip band, some outside). Drawn independently of the model, old log-probs in [-4, 0] against
    the 7B head's ~-14 put every ratio near 1e-5: every A < 0 token clipped to a zero gradient, the rest
    scaled by 1e-5, and half of every dZ zero rows in the contenders' gradient GEMMs."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = torch.empty(flat_t.shape, dtype=torch.float32, device=hidden.device)
    for lo in range(0, flat_t.numel(), chunk):
        z = (flat_h[lo:lo + chunk] @ weight.T).float()
        out[lo:lo + chunk] = torch.log_softmax(z, -1).gather(1, flat_t[lo:lo + chunk, None])[:, 0]
    return out.view(targets.shape)


def _sync(case):
    if case.device == "cuda":
        torch.cuda.synchronize()


def _train_step(case, loss_fn):
    """fwd+bwd: fresh leaf tensors each call, gradients for hidden and weight (the last call's leaves stay
    readable as ``step.leaves``, for the tests that check the peers' gradients)."""
    x = inputs(case)

    def step():
        h = x["hidden"].detach().requires_grad_()
        w = x["weight"].detach().requires_grad_()
        loss = loss_fn(h, w, x)
        loss.backward()
        _sync(case)
        step.leaves = h, w
        return loss
    return step


def _policy_loss(logprobs, x):
    loss, _ = policy_loss_naive(logprobs, x["old"], x["adv"], x["mask"])
    return loss


def _full_logprobs(h, w, targets):
    logits = (h @ w.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]


# ---------------------------------------------------------------- fused loss, forward + backward

def _plain(case, logprobs):
    """A plain-PyTorch head (full, compiled or chunked logits); in padded batches over the valid tokens only
    (``h[mask]``, one host sync), as TRL's and verl's heads are called: every peer with a way to skip
    padding uses it."""
    lp = _only_valid(logprobs)
    return _train_step(case, lambda h, w, x: _policy_loss(
        lp(h, w, x["targets"], x["mask"] if case.padded else None), x))


def loss_naive(case):
    return _plain(case, _full_logprobs)


def loss_torch_compile(case):
    return _plain(case, _compiled_full_logprobs())


@functools.lru_cache(maxsize=None)
def _compiled_full_logprobs():
    # Static shapes: every benchmark shape compiles its own graph, in the warm-up (with the default,
    # Dynamo's second shape would switch to one dynamic-shape graph for the rest).
    return torch.compile(_full_logprobs, dynamic=False)


def _chunked_logprobs(h, w, targets, chunk=1024):
    """What a careful PyTorch user writes: per chunk of tokens, logits under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    parts = [checkpoint(_full_logprobs, flat_h[i:i + chunk], w, flat_t[i:i + chunk], use_reentrant=False)
             for i in range(0, flat_h.shape[0], chunk)]
    return torch.cat(parts).view(targets.shape)


def loss_torch_chunked(case):
    return _plain(case, _chunked_logprobs)


def loss_liger(case):
    LigerFusedLinearGRPOLoss = _peer("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss", "liger-kernel")
    fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.16, epsilon_high=0.24,
                                  loss_type="bnpo", compiled=True)

    def loss(h, w, x):
        out, _ = fn(h, w, x["targets"], x["mask"].long(), x["adv"], old_per_token_logps=x["old"])
        return out
    return _train_step(case, loss)


def loss_liger_triton(case):
    """Liger's Triton grpo_loss on materialised logits (GPU only)."""
    _gpu_only(case)
    triton_grpo_loss = _peer("liger_kernel.transformers.grpo_loss", "triton_grpo_loss", "liger-kernel")

    def loss(h, w, x):
        # Liger's kernel reads logits[:, :-1] as the predictions of completion_ids: one more position, added
        # to the hidden states (a [B, 1, H] copy) rather than to the logits (a [B, T, V] copy).
        logits = torch.cat([h, h[:, -1:]], dim=1) @ w.T
        loss, _ = triton_grpo_loss(logits, x["old"], None, x["targets"], x["adv"], x["mask"].long(),
                                   temperature=1.0, beta=0.0, eps_low=0.16, eps_high=0.24, inplace=True,
                                   loss_type="bnpo", reduce=True)
        return loss
    return _train_step(case, loss)


def _cce_logprobs_of(linear_cross_entropy, h, w, targets, mask=None):
    """CCE skips the tokens whose target is its ignore_index (-100): padding, given that way, costs it nothing."""
    if mask is not None:
        targets = targets.masked_fill(~mask, -100)
    return -linear_cross_entropy(h, w, targets, reduction="none", ignore_index=-100)


def loss_cce(case):
    _gpu_only(case)
    linear_cross_entropy = _peer("cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy")

    def loss(h, w, x):
        lp = _cce_logprobs_of(linear_cross_entropy, h, w, x["targets"], x["mask"])
        return _policy_loss(lp.float(), x)
    return _train_step(case, loss)


def _only_valid(logprobs):
    """A head computed over the valid tokens only (``h[mask]``), as TRL's and verl's (remove-padding) trainers
    call theirs; the log-probs are scattered back to [B, T] (0 at padding) for the same policy loss."""
    def wrapped(h, w, targets, mask=None):
        if mask is None:
            return logprobs(h, w, targets)
        out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        return out.masked_scatter(mask, logprobs(h[mask][None], w, targets[mask][None]).float())
    return wrapped


def _trl_flat_logprobs(h, w, targets):
    ChunkedLogProbFunction = _peer("trl.kernels.chunked_logprob", "ChunkedLogProbFunction", "trl >= 1.15")
    flat = h.reshape(-1, h.shape[-1])
    lp, *_ = ChunkedLogProbFunction.apply(flat, w, None, targets.reshape(-1), 1.0, 32768, None, 1.0, ())
    return lp.view(targets.shape)


_trl_logprobs = _only_valid(_trl_flat_logprobs)


def loss_trl_fused(case):
    _peer("trl.kernels.chunked_logprob", "ChunkedLogProbFunction", "trl >= 1.15")  # fail early, not mid-timing
    # its backward imports trl.trainer.utils (datasets, accelerate, pandas): absent, it would fail mid-backward
    _peer("trl.trainer.utils", "maybe_gather_lm_head_ctx", "trl's trainer utilities (datasets, accelerate)")
    return _train_step(case, lambda h, w, x: _policy_loss(_trl_logprobs(h, w, x["targets"], x["mask"]), x))


@functools.lru_cache(maxsize=None)
def _verl_heads():
    """verl's two fused log-prob + entropy heads: ``linear_cross_entropy`` (utils/kernel, Triton, GPU) and
    ``FusedLinearForPPO`` (utils/experimental/torch_functional, chunked PyTorch). Imported normally where verl
    imports (CI); otherwise loaded from verl's files without running verl/__init__, which needs Ray and
    TensorDict (the GPU image carries only verl's wheel): the Triton file's ``verl.utils.device`` import then
    gets a stand-in that answers for CUDA. The kernels themselves are verl's, unchanged."""
    try:
        lce = importlib.import_module("verl.utils.kernel.linear_cross_entropy").linear_cross_entropy
        head = importlib.import_module("verl.utils.experimental.torch_functional").FusedLinearForPPO
        return lce, head
    except Exception:
        pass
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("verl not installed")
    root = Path(spec.submodule_search_locations[0])
    for name in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
        del sys.modules[name]  # a half-imported verl from the attempt above
    device = types.ModuleType("verl.utils.device")
    device.is_cuda_available = torch.cuda.is_available()
    device.get_device_capability = lambda device_id=0: torch.cuda.get_device_capability(device_id)
    device.get_device_name = lambda: "cuda"
    device.get_torch_device = lambda: torch.cuda
    for name, path in (("verl", root), ("verl.utils", root / "utils"), ("verl.utils.kernel", root / "utils" / "kernel"),
                       ("verl.utils.experimental", root / "utils" / "experimental")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    sys.modules["verl.utils.device"] = device
    try:
        lce = importlib.import_module("verl.utils.kernel.linear_cross_entropy").linear_cross_entropy
        head = importlib.import_module("verl.utils.experimental.torch_functional").FusedLinearForPPO
    except Exception as err:
        raise Unavailable(f"verl's kernel files not loadable ({type(err).__name__}: {err})") from None
    return lce, head


def _verl_logprobs(kind):
    """verl's head as its patched model forward calls it: (log-probs, entropy) at temperature 1, over the
    valid tokens only when a mask is given (verl's remove-padding layout)."""
    def logprobs(h, w, targets):
        lce, head = _verl_heads()
        flat_h, flat_t = h.reshape(-1, h.shape[-1]).contiguous(), targets.reshape(-1)
        if kind == "triton":
            lp, _ent = lce(flat_h, w, flat_t, 1.0, "none")
        else:
            lp, _ent = head(impl_backend="torch").forward(flat_h, w, flat_t, 1.0)
        return lp.view(targets.shape)
    return _only_valid(logprobs)


def loss_verl(kind):
    def factory(case):
        if kind == "triton":
            _gpu_only(case)
        _verl_heads()  # fail early, not mid-timing
        fn = _verl_logprobs(kind)
        return _train_step(case, lambda h, w, x: _policy_loss(fn(h, w, x["targets"], x["mask"]).float(), x))
    return factory


def _ngrpo_loss(backend):
    def factory(case):
        try:
            with nk.use_backend(backend):
                pass
        except RuntimeError as err:
            raise Unavailable(str(err)) from None
        if backend == "triton" and case.device != "cuda":
            raise Unavailable("compiled Triton needs a GPU (the interpreter is for tests)")
        if backend in ("cpp", "torch") and case.device != "cpu":
            raise Unavailable("CPU backend")

        def loss(h, w, x):
            with nk.use_backend(backend):
                out, _ = nk.fused_linear_ngrpo_loss(h, w, x["targets"], x["mask"], x["old"], advantages=x["adv"],
                                                    validate=False)
            return out
        return _train_step(case, loss)
    return factory


def loss_ngrpo_compiled(case):
    """Ours inside torch.compile(fullgraph=True), on this device's default backend: what a user who compiles
    the training step gets (the ops are custom ops; the graph around them is compiled)."""
    if case.device != "cuda" and interpreter_enabled():
        raise Unavailable("the default CPU backend is the Triton interpreter here (it is for tests)")

    @torch.compile(fullgraph=True, dynamic=False)  # static shapes: each case compiles its own graph (warm-up)
    def loss(h, w, x):
        out, _ = nk.fused_linear_ngrpo_loss(h, w, x["targets"], x["mask"], x["old"], advantages=x["adv"],
                                            validate=False)
        return out
    return _train_step(case, loss)


def gemm_floor_train(case):
    """The three GEMMs that fwd+bwd cannot avoid: logits, dX, dW (6*N*H*V FLOPs)."""
    x = inputs(case)
    h = x["hidden"].reshape(-1, case.H)
    w = x["weight"]
    dz = torch.randn(case.N, case.V, dtype=case.dtype, device=case.device) * 1e-3

    def step():
        torch.matmul(h, w.T)
        torch.matmul(dz, w)
        torch.matmul(dz.T, h)
        _sync(case)
    return step


FUSED_LOSS = {
    # ours first: a step cut off by its time limit (gpu_suite.sh) keeps our rows and loses peers' instead
    "gemm_floor": gemm_floor_train,
    "ngrpo_triton": _ngrpo_loss("triton"),
    "ngrpo_compiled": loss_ngrpo_compiled,
    "ngrpo_cpp": _ngrpo_loss("cpp"),
    "ngrpo_torch": _ngrpo_loss("torch"),
    "naive": loss_naive,
    "torch_compile": loss_torch_compile,
    "torch_chunked": loss_torch_chunked,
    "liger": loss_liger,
    "liger_triton": loss_liger_triton,
    "cce": loss_cce,
    "trl_fused": loss_trl_fused,
    "verl_triton": loss_verl("triton"),
    "verl_torch": loss_verl("torch"),
}


# ---------------------------------------------------------------- no-grad log-prob pass

def _no_grad(case, fn):
    x = inputs(case)

    def run():
        with torch.no_grad():
            out = fn(x["hidden"], x["weight"], x["targets"])
        _sync(case)
        return out
    return run


def _ngrpo_logprobs(backend):
    def factory(case):
        if backend == "triton" and case.device != "cuda":
            raise Unavailable("compiled Triton needs a GPU (the interpreter is for tests)")
        if backend == "torch" and case.device != "cpu":
            raise Unavailable("CPU backend")

        def fn(h, w, t):
            with nk.use_backend(backend):
                return nk.fused_linear_logprobs(h, w, t, validate=False)
        return _no_grad(case, fn)
    return factory


def _cce_logprobs(case):
    _gpu_only(case)
    linear_cross_entropy = _peer("cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy")
    return _no_grad(case, lambda h, w, t: _cce_logprobs_of(linear_cross_entropy, h, w, t))


def _trl_nograd(case):
    _peer("trl.kernels.chunked_logprob", "ChunkedLogProbFunction", "trl >= 1.15")  # fail early, not mid-timing
    return _no_grad(case, _trl_logprobs)


def _verl_nograd(kind):
    def factory(case):
        if kind == "triton":
            _gpu_only(case)
        _verl_heads()
        return _no_grad(case, _verl_logprobs(kind))
    return factory


def _liger_logprobs(case):
    raise Unavailable("liger-kernel has no log-prob-only op (its GRPO loss takes ref log-probs as input)")


def gemm_floor_nograd(case):
    x = inputs(case)
    h = x["hidden"].reshape(-1, case.H)

    def run():
        torch.matmul(h, x["weight"].T)
        _sync(case)
    return run


LOGPROBS = {
    # ours first: a step cut off by its time limit (gpu_suite.sh) keeps our rows and loses peers' instead
    "gemm_floor": gemm_floor_nograd,
    "ngrpo_triton": _ngrpo_logprobs("triton"),
    "ngrpo_torch": _ngrpo_logprobs("torch"),
    "naive": lambda case: _no_grad(case, _full_logprobs),
    "torch_compile": lambda case: _no_grad(case, _compiled_full_logprobs()),
    "torch_chunked": lambda case: _no_grad(case, _chunked_logprobs),
    "liger": _liger_logprobs,
    "cce": _cce_logprobs,
    "trl_fused": _trl_nograd,
    "verl_triton": _verl_nograd("triton"),
    "verl_torch": _verl_nograd("torch"),
}


# ---------------------------------------------------------------- group advantages at large B

@dataclasses.dataclass(frozen=True)
class AdvCase:
    B: int
    group: int
    device: str

    @property
    def label(self) -> str:
        return f"B{self.B}-G{self.group}"


def _adv_inputs(case):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (case.B,), generator=g).float()
    ids = torch.arange(case.B) // case.group
    perm = torch.randperm(case.B, generator=g)  # trainers shuffle: groups are not contiguous
    return rewards[perm].to(case.device), ids[perm].to(case.device)


def _adv(backend):
    def factory(case):
        if backend == "triton" and case.device != "cuda":
            raise Unavailable("compiled Triton needs a GPU (the interpreter is for tests)")
        if backend == "torch" and case.device != "cpu":
            raise Unavailable("CPU backend")
        rewards, ids = _adv_inputs(case)

        def run():
            with nk.use_backend(backend):
                out = nk.ngrpo_advantages(rewards, ids, validate=False)
            _sync(case)
            return out
        return run
    return factory


def adv_reshape(case):
    """What TRL does: sort into contiguous groups of equal size, view(-1, G), mean/std per row (with
    NGRPO's virtual sample added analytically)."""
    rewards, ids = _adv_inputs(case)

    def run():
        order = torch.argsort(ids, stable=True)
        r = rewards[order].view(-1, case.group).double()
        n = case.group + 1
        mu = (r.sum(1, keepdim=True) + 1.0) / n
        var = (((r - mu) ** 2).sum(1, keepdim=True) + (1.0 - mu) ** 2) / (n - 1)
        out = torch.empty_like(rewards)
        out[order] = ((r - mu) / (var.sqrt() + 1e-6)).view(-1).float()
        _sync(case)
        return out
    return run


def adv_naive(case):
    if case.B > 20_000:
        raise Unavailable("the Python loop over groups takes minutes at this size")
    rewards, ids = _adv_inputs(case)
    from ngrpo_kernels.ops.advantages.naive import ngrpo_advantages_naive

    def run():
        out = ngrpo_advantages_naive(rewards, ids)
        _sync(case)
        return out
    return run


ADVANTAGES = {
    "naive": adv_naive,
    "reshape_groups": adv_reshape,
    "ngrpo_triton": _adv("triton"),
    "ngrpo_torch": _adv("torch"),
}
