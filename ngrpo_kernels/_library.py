"""The ops as PyTorch custom operators (``torch.library``): what autograd runs and ``torch.compile`` traces.

``ngrpo_kernels.functional`` validates its inputs and picks the backend, then calls one function here.
The REFERENCE backend (plain PyTorch, autograd-based) is called directly; every other backend runs
through a custom op in the ``ngrpo`` namespace:

- ``ngrpo::group_advantages``        rewards, group ids -> advantages (no gradient)
- ``ngrpo::policy_loss``             log-probs, ... -> loss, Stat sums, token count, and the loss's gradients
- ``ngrpo::linear_logprobs``         hidden, lm_head, targets -> log-probs, entropy, logsumexp
- ``ngrpo::linear_logprobs_backward`` the recomputing backward of the previous op
- ``ngrpo::fused_linear_ngrpo_loss`` hidden, lm_head, ... -> loss, Stat sums, counts, dX, dW, db
- ``ngrpo::scaled_cast``             its backward: a stored gradient times the upstream one, in the input's dtype
- ``ngrpo::fused_loss_grads``        its backward when an eager one-chunk call left the gradient GEMMs to it

Each has a fake (meta) implementation, so Dynamo and AOTAutograd see output shapes without running a
kernel, and an autograd formula: the fused losses form their gradients in the forward kernels (returned
as extra outputs) and backward only multiplies them by the upstream gradient; the log-prob op's backward
is the second op. (On the eager route a one-chunk Triton fused loss leaves its gradient GEMMs to backward,
which runs them with the upstream gradient: ``ops/fused_loss.deferring``.) The gradients are first order:
a ``create_graph=True`` request is refused (see ``_first_order``), as in eager mode.

Eager calls skip the dispatcher (``_Op``): with plain tensors and nothing tracing, the op's own Python
implementation runs, under an ``autograd.Function`` built from the same setup and backward formulas. The
custom op is for the systems that need one (torch.compile, export, FakeTensor, make_fx, torch.func,
tensor subclasses): its dispatch (schema defaults, the aliasing check, the generated autograd wrapper) is
host time an isolated call pays before its first kernel, several times per fused loss step
(``benchmarks/gpu_head.py --diagnose`` prices both routes). Both routes run the same code and are tested
against each other (tests/test_compile.py).

Float options travel in one float64 **CPU** tensor (``scalars``, NaN for an absent option), not as Python
floats: a custom op's graph is specialised on each float argument's value, so an adaptive entropy
coefficient or a per-step normaliser would recompile every step, whereas a tensor's value is an input
of the graph; a CPU tensor is read without a device synchronisation. Optional tensors that are absent
come back as empty tensors (a custom op cannot return None); the wrappers here turn them into None.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch

from . import _checks as check
from .backend import Backend
from .ops import advantages as _advantages
from .ops import fused_loss as _fused_loss
from .ops import linear_logprobs as _linear_logprobs
from .ops import policy_loss as _policy_loss
from .variants import NUM_STATS, AggMode, Estimator, Stat

Tensor = torch.Tensor


_SCALARS: dict = {}


def _scalars(*values) -> Tensor:
    """Float options as one float64 CPU tensor; None becomes NaN (validated options are finite).

    Under torch.compile a float argument becomes symbolic after its first recompile (automatic dynamic), but
    a factory (``torch.tensor``, ``full``, ``scalar_tensor``) taking it makes the compiled graph specialise on
    its value again (a recompile per value: the 9th is an error under ``fullgraph=True``); arithmetic on a
    tensor keeps it an input of the graph."""
    if torch.compiler.is_compiling():
        one = torch.ones((), dtype=torch.float64)
        return torch.stack([one * (math.nan if v is None else v) for v in values])
    if _traced(()):  # a dispatch mode or a torch.func transform: a tensor of its own, made under it
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
    # Eager: one read-only CPU tensor per set of values, kept (building it was ~8 us of host time a call on
    # this project's CPU; ops only read it, autograd may save it). Made outside inference mode even within
    # it: a later training call with the same values saves it for backward, which an inference tensor
    # refuses. (Keys compare as numbers: -0.0 finds 0.0's tensor; every option reads the same either way.)
    scalars = _SCALARS.get(values)
    if scalars is None:
        if len(_SCALARS) >= 256:
            _SCALARS.clear()
        with torch.inference_mode(False):
            scalars = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
        _SCALARS[values] = scalars
    return scalars


def _unpack(scalars: Tensor) -> list:
    return [None if math.isnan(v) else v for v in scalars.tolist()]


def _absent(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _split(normalizer) -> tuple[Tensor | None, float | None]:
    """A normaliser is a tensor input of the op or a number among its scalars: (tensor, number)."""
    return (normalizer, None) if isinstance(normalizer, torch.Tensor) else (None, normalizer)


_PLAIN = (Tensor, torch.nn.Parameter)


def _reference_inputs(hidden, weight, bias, valid):
    """The REFERENCE backend under the public contract: half inputs computed in float32 (the precision the
    kernels' statistics have; bf16 arithmetic would be the naive path's, not the specification's), and rows
    that do not count zeroed, so padding is never read into a result or a gradient (it may hold NaN)."""
    hidden, weight, bias = _widen(hidden, weight, bias)
    return torch.where(valid[..., None], hidden, 0), weight, bias


def _widen(*tensors):
    """Half-precision tensors in float32 (differentiably), for the REFERENCE backend: the kernels compute in
    float32 whatever the inputs' dtype, and the specification is the exact computation, not bf16 arithmetic."""
    return [t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t for t in tensors]


class _ReferenceGraph(torch.autograd.Function):
    """The REFERENCE backend's autograd graph, run in backward under ``inputs_precision``: plain autograd runs
    its backward GEMMs under the autocast of the ``backward()`` call (on the CPU, bf16 ones: 3e-3 gradient error
    on float32 inputs), while every kernel backend's backward computes in the inputs' precision wherever it is
    called. Forward keeps no graph, only its inputs (as activation checkpointing does): backward builds the
    specification's graph again and differentiates it, on detached copies of the inputs, or, for a
    second-order request (``create_graph=True``), on the inputs themselves, so that the gradient's own graph
    reaches them. A second backward without ``retain_graph`` is refused as plain autograd refuses it."""

    @staticmethod
    def forward(ctx, fn, spec, *inputs):
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        with torch.enable_grad():  # which outputs are differentiable (the graph is dropped on return)
            out, spec[0] = torch.utils._pytree.tree_flatten(fn(*leaves))
        ctx.device, ctx.fn = inputs[0].device, fn
        ctx.differentiable = [o.requires_grad for o in out]
        ctx.save_for_backward(*inputs)
        returned = tuple(o.detach() for o in out)
        ctx.mark_non_differentiable(*[r for r, d in zip(returned, ctx.differentiable) if not d])
        return returned

    @staticmethod
    def backward(ctx, *grads):
        second_order = torch.is_grad_enabled()
        inputs = ctx.saved_tensors
        if not second_order:
            inputs = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        with torch.enable_grad(), inputs_precision(ctx.device):
            out = torch.utils._pytree.tree_flatten(ctx.fn(*inputs))[0]
            pairs = [(o, g) for o, g, d in zip(out, grads, ctx.differentiable) if d and g is not None]
            wanted = [x for x in inputs if x.requires_grad]
            got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                                           create_graph=second_order)
                       if pairs else [None] * len(wanted))
        return (None, None, *[next(got) if x.requires_grad else None for x in inputs])


def _reference(fn, *inputs):
    """``fn(*inputs)`` for the REFERENCE backend: plain autograd, its backward in the inputs' precision
    (``_ReferenceGraph``). Traced calls (torch.compile, torch.func), forward-mode AD (dual tensors) and calls
    without a gradient run ``fn`` as it is."""
    present = [x for x in inputs if x is not None]
    if (_traced(present) or not (torch.is_grad_enabled() and torch._C._any_requires_grad(*present))
            or any(torch.autograd.forward_ad.unpack_dual(x).tangent is not None for x in present)):
        return fn(*inputs)
    spec = [None]
    out = _ReferenceGraph.apply(lambda *xs: fn(*_refill(inputs, xs)), spec, *present)
    return torch.utils._pytree.tree_unflatten(list(out), spec[0])


def _refill(inputs, present):
    present = iter(present)
    return [None if x is None else next(present) for x in inputs]


def _detached(*tensors):
    """Inputs the ops give no gradient (behaviour / reference log-probs, advantages, importance weights)."""
    return [None if t is None else t.detach() for t in tensors]


def _traced(args) -> bool:
    """Must this call go through the dispatcher? Yes under torch.compile / export, while a dispatch mode
    (FakeTensor, make_fx, functionalisation) or a torch.func transform is active, and for tensor subclasses
    (DTensor, ...): they all rely on the custom op."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return True
    for a in args:  # a loop, not any(generator): ~1.5 us less of host time a call here
        if isinstance(a, Tensor) and type(a) not in _PLAIN:
            return True
    return False


def _inputs_device(args):
    """The inputs' GPU as the current device while an op runs. Triton launches on the current device (and
    our workspaces are allocated there); with ``device_map="auto"`` or any model split across GPUs in one
    process, the head's tensors sit on ``cuda:k`` while the current device is still ``cuda:0``, and the
    kernels would run on the wrong GPU. The public entry points put all tensors on one device
    (``_checks.same_device``); host cost when the devices already agree: one ``current_device()``."""
    for a in args:
        if isinstance(a, Tensor) and a.is_cuda:
            if a.get_device() != torch.cuda.current_device():
                return torch.cuda.device(a.device)
            break
    return contextlib.nullcontext()


class _Op:
    """One operation, reachable two ways: ``op``, the ``torch.library`` custom op (with its fake
    implementation and autograd formula), and, for plain eager calls, ``impl`` itself under an
    ``autograd.Function`` made of the same setup and backward formulas."""

    def __init__(self, name: str, impl):
        @functools.wraps(impl)  # the signature and annotations are the custom op's schema
        def on_inputs_device(*args, **kwargs):
            with _inputs_device(args):
                return impl(*args, **kwargs)

        self.name, self.impl = name, on_inputs_device
        self.op = torch.library.custom_op(name, on_inputs_device, mutates_args=())
        self.function = None

    def register_fake(self, fn):
        return self.op.register_fake(fn)

    def register_autograd(self, backward, *, setup_context, eager_context=None):
        """``eager_context``: a context-manager factory the eager route runs ``impl`` under; what it yields
        is ``ctx.eager`` for ``setup_context`` (the custom op's ctx has no such attribute)."""
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):
            # The classic form (setup inside forward): a Function with a separate setup_context pays an
            # inspect.signature on every apply (16 us of host time a call here); eager calls never carry
            # torch.func transforms, which are what the separate form is for (_traced routes those).
            if eager_context is None:
                output = impl(*args)
            else:
                with eager_context() as ctx.eager:
                    output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self.function = type(self.name.replace("::", "_"), (torch.autograd.Function,), dict(
            forward=staticmethod(forward), backward=staticmethod(backward)))

    def __call__(self, *args):
        if _traced(args):
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self.function.apply(*args)
        return self.impl(*args)


@contextlib.contextmanager
def dispatcher_route():
    """Every ngrpo op through its custom op, as under torch.compile, also in eager mode: for benchmarks that
    price the dispatch (``benchmarks/gpu_head.py --diagnose``, ``benchmarks/launch_count.py --host``)."""
    global _traced
    eager_route = _traced
    _traced = lambda args: True  # noqa: E731
    try:
        yield
    finally:
        _traced = eager_route


def _custom_op(name: str):
    """Decorator: the function becomes an ``_Op`` named ``name`` (its annotations are the op's schema)."""
    return lambda impl: _Op(name, impl)


def inputs_precision(device: torch.device):
    """The head ops compute in their inputs' precision (float32 logits and statistics), not in an ambient
    ``torch.autocast``'s: autocast would rewrite the CPU and reference backends' ``@`` into bf16 GEMMs (a
    3e-2 log-prob error on float32 inputs). The GPU kernels never see autocast; this makes every backend
    alike. A no-op where autocast does not exist (meta tensors) and, in eager mode, where it is not enabled
    (entering ``torch.autocast`` costs ~10 us of host time a call; the query ~1 us). Under torch.compile only
    "meta" is taken for such a device: torch 2.11's Dynamo cannot trace ``is_autocast_available``."""
    if device.type == "meta":
        return contextlib.nullcontext()
    if not torch.compiler.is_compiling() and (not torch.amp.is_autocast_available(device.type)
                                              or not torch.is_autocast_enabled(device.type)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _first_order():
    if torch.is_grad_enabled():  # autograd enables grad mode in backward only for create_graph=True
        raise RuntimeError(
            "ngrpo_kernels ops are differentiable once: their gradients are computed by fused kernels "
            "with no autograd graph, so torch.autograd.grad(..., create_graph=True) / double backward "
            "(e.g. a gradient penalty) is not supported. First-order use of the outputs, linear or not, is.")


# --- group advantages ------------------------------------------------------------------------------

@_custom_op("ngrpo::group_advantages")
def _group_advantages_op(rewards: Tensor, group_ids: Tensor, backend: str, estimator: str, num_virtual: int,
                         unbiased: bool, scalars: Tensor) -> Tensor:
    r_max, eps, w_lambda, correct_threshold = _unpack(scalars)
    return _advantages.compute(Backend(backend), rewards, group_ids, estimator=Estimator(estimator), r_max=r_max,
                               num_virtual=num_virtual, eps=eps, unbiased=unbiased, w_lambda=w_lambda,
                               correct_threshold=correct_threshold).contiguous()


@_group_advantages_op.register_fake
def _(rewards, group_ids, backend, estimator, num_virtual, unbiased, scalars):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


def group_advantages(backend: Backend, rewards, group_ids, *, estimator: Estimator, r_max, num_virtual, eps, unbiased,
                     w_lambda, correct_threshold) -> Tensor:
    if backend == Backend.REFERENCE:
        return _advantages.compute(backend, rewards, group_ids, estimator=estimator, r_max=r_max,
                                   num_virtual=num_virtual, eps=eps, unbiased=unbiased, w_lambda=w_lambda,
                                   correct_threshold=correct_threshold)
    return _group_advantages_op(rewards, group_ids, backend.value, estimator.value, num_virtual, unbiased,
                                _scalars(r_max, eps, w_lambda, correct_threshold))


# --- policy loss -----------------------------------------------------------------------------------

@_custom_op("ngrpo::policy_loss")
def _policy_loss_op(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    ref_logprobs: Optional[Tensor], entropy: Optional[Tensor], rollout_is_weights: Optional[Tensor],
                    normalizer: Optional[Tensor], backend: str, loss_agg_mode: str, scalars: Tensor,
                    grad_logprobs: bool, grad_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, number, length_budget = _unpack(scalars)
    stats, n_tokens, g_lp, g_ent = _policy_loss.forward(
        Backend(backend), logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, rollout_is_weights,
        eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, beta=beta, entropy_coef=entropy_coef,
        loss_agg_mode=AggMode(loss_agg_mode), normalizer=normalizer if normalizer is not None else number,
        length_budget=length_budget, grad_logprobs=grad_logprobs, grad_entropy=grad_entropy,
    )
    absent = _absent(stats)
    return (stats[Stat.LOSS].clone(), stats.clone(), n_tokens, absent if g_lp is None else g_lp,
            absent.clone() if g_ent is None else g_ent)


@_policy_loss_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, rollout_is_weights, normalizer, backend,
      loss_agg_mode, scalars, grad_logprobs, grad_entropy):
    dtype = _policy_loss.grad_dtype(Backend(backend), logprobs.dtype)
    shape = logprobs.shape
    return (logprobs.new_empty((), dtype=dtype), logprobs.new_empty((NUM_STATS,), dtype=dtype),
            logprobs.new_empty((), dtype=torch.float32),
            logprobs.new_empty(shape if grad_logprobs else (0,), dtype=dtype),
            logprobs.new_empty(shape if grad_entropy else (0,), dtype=dtype))


def _no_zero_grads(ctx):
    """Outputs other than the loss (Stat sums, counts, the stored gradients) never get a gradient: without
    this, autograd would allocate a zero gradient for each of them in backward (2.2 GB for the 7B head's dW)."""
    ctx.set_materialize_grads(False)


def _policy_loss_setup(ctx, inputs, output):
    _no_zero_grads(ctx)
    logprobs, entropy = inputs[0], inputs[5]
    ctx.save_for_backward(output[3], output[4])
    ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)


def _policy_loss_backward(ctx, grad_loss, *_unused):
    _first_order()
    if grad_loss is None:
        return (None,) * 13
    g_lp, g_ent = ctx.saved_tensors
    grad_lp = None if g_lp.numel() == 0 else (g_lp * grad_loss).to(ctx.dtypes[0])
    grad_ent = None if g_ent.numel() == 0 else (g_ent * grad_loss).to(ctx.dtypes[1])
    return grad_lp, None, None, None, None, grad_ent, None, None, None, None, None, None, None


_policy_loss_op.register_autograd(_policy_loss_backward, setup_context=_policy_loss_setup)


def policy_loss(backend: Backend, logprobs, old_logprobs, advantages, mask, *, eps_neg, eps_pos, clip_ratio_c,
                ref_logprobs, beta, entropy, entropy_coef, loss_agg_mode: AggMode, normalizer, length_budget,
                rollout_is_weights):
    options = dict(eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, beta=beta, entropy_coef=entropy_coef)
    if backend == Backend.REFERENCE:
        old_logprobs, advantages, ref_logprobs, rollout_is_weights = _detached(
            old_logprobs, advantages, ref_logprobs, rollout_is_weights)
        logprobs, old_logprobs, advantages, ref_logprobs, entropy, rollout_is_weights = _widen(
            logprobs, old_logprobs, advantages, ref_logprobs, entropy, rollout_is_weights)
        return _policy_loss.policy_loss_naive(
            logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, entropy=entropy,
            loss_agg_mode=loss_agg_mode, normalizer=normalizer, length_budget=length_budget,
            rollout_is_weights=rollout_is_weights, **options)
    grad = torch.is_grad_enabled()
    tensor_normalizer, number = _split(normalizer)
    loss, stats, n_tokens, _, _ = _policy_loss_op(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, rollout_is_weights, tensor_normalizer,
        backend.value, loss_agg_mode.value,
        _scalars(eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, number, length_budget),
        grad and logprobs.requires_grad, grad and entropy is not None and entropy.requires_grad)
    return loss, _policy_loss.metrics_from_stats(stats, n_tokens, entropy=entropy is not None,
                                                 kl=ref_logprobs is not None, dual_clip=clip_ratio_c is not None)


# --- fused linear -> log-probs ---------------------------------------------------------------------

@_custom_op("ngrpo::linear_logprobs")
def _linear_logprobs_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, backend: str,
                        scalars: Tensor, ignore_index: int, entropy: bool,
                        workspace_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    (inv_temp,) = _unpack(scalars)
    lp, ent, row_stats = _linear_logprobs.impl(Backend(backend)).forward(
        x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), targets.contiguous(),
        inv_temp=inv_temp, ignore_index=ignore_index, entropy=entropy, workspace_bytes=workspace_bytes or None)
    return lp, _absent(lp) if ent is None else ent, row_stats  # row_stats [N, 2]: (max, log s), for backward


@_linear_logprobs_op.register_fake
def _(x, weight, bias, targets, backend, scalars, ignore_index, entropy, workspace_bytes):
    n = x.shape[0]
    return (x.new_empty((n,), dtype=torch.float32), x.new_empty((n if entropy else 0,), dtype=torch.float32),
            x.new_empty((n, 2), dtype=torch.float32))


@_custom_op("ngrpo::linear_logprobs_backward")
def _linear_logprobs_backward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, row_stats: Tensor,
                                 entropy: Tensor, g_lp: Tensor, g_ent: Optional[Tensor], backend: str, scalars: Tensor,
                                 ignore_index: int, need_x: bool, need_w: bool, need_b: bool,
                                 workspace_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    check.weight_kept(weight, weight.dim() == 2 and weight.shape[1] == x.shape[1],
                      "fused_linear_logprobs recomputes the logits in backward",
                      "Keep it gathered until the backward has run (DeepSpeed ZeRO-3: enter the gather context, "
                      "e.g. TRL's maybe_gather_lm_head_ctx, around the backward too).")
    (inv_temp,) = _unpack(scalars)
    with inputs_precision(x.device):  # a backward called under autocast: as the forward
        dx, dw, db = _linear_logprobs.impl(Backend(backend)).backward(
            x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), targets.contiguous(),
            row_stats, entropy, g_lp.float().contiguous(), None if g_ent is None else g_ent.float().contiguous(),
            inv_temp=inv_temp, ignore_index=ignore_index, need_x=need_x, need_w=need_w, need_b=need_b,
            workspace_bytes=workspace_bytes or None)
    return (_absent(x) if dx is None else dx, _absent(weight) if dw is None else dw.to(weight.dtype),
            _absent(weight) if db is None else db.to(bias.dtype))


@_linear_logprobs_backward_op.register_fake
def _(x, weight, bias, targets, row_stats, entropy, g_lp, g_ent, backend, scalars, ignore_index, need_x, need_w, need_b,
      workspace_bytes):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty((weight.shape[0],) if need_b else (0,), dtype=bias.dtype if need_b else weight.dtype))


def _linear_logprobs_setup(ctx, inputs, output):
    _no_zero_grads(ctx)
    x, weight, bias, targets, backend, scalars, ignore_index, entropy, workspace_bytes = inputs
    ctx.save_for_backward(x, weight, bias, targets, output[2], output[1], scalars)
    ctx.options = (backend, ignore_index, workspace_bytes)


def _linear_logprobs_backward(ctx, g_lp, g_ent, _g_row_stats):
    _first_order()
    x, weight, bias, targets, row_stats, ent, scalars = ctx.saved_tensors
    backend, ignore_index, workspace_bytes = ctx.options
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if g_lp is None and g_ent is None:
        return (None,) * 9
    if g_lp is None:
        g_lp = row_stats.new_zeros(row_stats.shape[0])
    dx, dw, db = _linear_logprobs_backward_op(x, weight, bias, targets, row_stats, ent, g_lp, g_ent, backend, scalars,
                                              ignore_index, need_x, need_w, need_b, workspace_bytes)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None,
            None, None, None, None, None, None)


_linear_logprobs_op.register_autograd(_linear_logprobs_backward, setup_context=_linear_logprobs_setup)


def linear_logprobs(backend: Backend, hidden, weight, targets, *, bias, temperature, ignore_index, return_entropy,
                    deterministic, workspace_bytes):
    del deterministic  # every backward is deterministic (fixed chunk order, no atomics)
    if backend == Backend.REFERENCE:
        targets = targets.long()

        def spec(hidden, weight, bias):
            hidden, weight, bias = _reference_inputs(hidden, weight, bias, targets != ignore_index)
            lp, ent = _linear_logprobs.linear_logprobs_naive(hidden, weight, targets, bias=bias,
                                                             temperature=temperature, ignore_index=ignore_index)
            return lp.float(), ent.float()

        lp, ent = _reference(spec, hidden, weight, bias)
        return (lp, ent) if return_entropy else lp
    lead = targets.shape
    lp, ent, _ = _linear_logprobs_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).to(torch.int64), backend.value,
        _scalars(1.0 / temperature), ignore_index, return_entropy, workspace_bytes or 0)
    lp = lp.reshape(lead)
    return (lp, ent.reshape(lead)) if return_entropy else lp


# --- fused linear -> NGRPO loss --------------------------------------------------------------------

@_custom_op("ngrpo::fused_linear_ngrpo_loss")
def _fused_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, mask: Tensor,
                   old_logprobs: Optional[Tensor], advantages: Tensor, ref_logprobs: Optional[Tensor],
                   rollout_is_weights: Optional[Tensor], normalizer: Optional[Tensor], backend: str,
                   loss_agg_mode: str, scalars: Tensor, workspace_bytes: int, skip_zero_advantage: bool,
                   need_dx: bool, need_dw: bool,
                   need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    temperature, eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, number, length_budget = _unpack(scalars)
    stats, n_tokens, computed_frac, dx, dw, db = _fused_loss.forward(
        Backend(backend), hidden, weight, targets, mask, old_logprobs, advantages, bias=bias, temperature=temperature,
        eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, ref_logprobs=ref_logprobs, beta=beta,
        entropy_coef=entropy_coef, loss_agg_mode=AggMode(loss_agg_mode),
        normalizer=normalizer if normalizer is not None else number, length_budget=length_budget,
        rollout_is_weights=rollout_is_weights, workspace_bytes=workspace_bytes or None,
        skip_zero_advantage=skip_zero_advantage, need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    absent = _absent(stats)
    return (stats[Stat.LOSS].clone(), stats.clone(), n_tokens, absent if computed_frac is None else computed_frac,
            absent.clone() if dx is None else dx.view(hidden.shape), absent.clone() if dw is None else dw,
            absent.clone() if db is None else db)


@_fused_loss_op.register_fake
def _(hidden, weight, bias, targets, mask, old_logprobs, advantages, ref_logprobs, rollout_is_weights, normalizer,
      backend, loss_agg_mode, scalars, workspace_bytes, skip_zero_advantage, need_dx, need_dw, need_db):
    f32 = torch.float32
    return (hidden.new_empty((), dtype=f32), hidden.new_empty((NUM_STATS,), dtype=f32), hidden.new_empty((), dtype=f32),
            hidden.new_empty(() if skip_zero_advantage else (0,), dtype=f32),
            hidden.new_empty(hidden.shape if need_dx else (0,), dtype=hidden.dtype if need_dx else f32),
            hidden.new_empty(weight.shape if need_dw else (0,), dtype=f32),
            hidden.new_empty((weight.shape[0],) if need_db else (0,), dtype=f32))


@_custom_op("ngrpo::scaled_cast")
def _scaled_cast_op(g: Tensor, scale: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    return _fused_loss.scaled_cast(g, scale, dtype, Backend(backend))


@_scaled_cast_op.register_fake
def _(g, scale, dtype, backend):
    return g.new_empty(g.shape, dtype=dtype)


def _fused_loss_setup(ctx, inputs, output):
    _no_zero_grads(ctx)
    hidden, weight, bias = inputs[:3]
    deferred = getattr(ctx, "eager", None)  # the eager route's slot (``_fused_loss.deferring``)
    ctx.eager = None  # its tensors are kept by save_for_backward below, not by the node's attributes
    ctx.deferred = bool(deferred)
    if ctx.deferred:
        # The gradient GEMMs run in backward, from the weight (an in-place change of it before then is refused
        # as for any autograd input), dZ and the gathered rows: saved like any activation, so they are freed
        # after backward and seen by saved-tensor hooks (offloading) and checkpointing.
        ctx.save_for_backward(*deferred[0])
        ctx.hidden_shape = hidden.shape
        ctx.needs = (inputs[15], inputs[17])  # need_dx, need_db
    else:
        ctx.save_for_backward(*output[4:])
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.backend = inputs[10]


@_custom_op("ngrpo::fused_loss_grads")
def _fused_loss_grads_op(grad_loss: Tensor, weight: Tensor, dz: Tensor, xc: Tensor, order: Tensor, count: Tensor,
                         scale: Optional[Tensor], need_dx: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of an eager one-chunk fused loss (``_fused_loss.deferring``): its dX / dW / db GEMMs with
    the upstream gradient. A custom op, so that compiled autograd sees one opaque call."""
    from .ops.head_schedule import deferred_backprop  # Triton's: imported only where a Triton forward ran

    dx, dw, db = deferred_backprop(grad_loss, weight, dz, xc, order, count, scale, need_dx=need_dx, need_db=need_db)
    return (_absent(xc) if dx is None else dx, dw, _absent(dw) if db is None else db)


@_fused_loss_grads_op.register_fake
def _(grad_loss, weight, dz, xc, order, count, scale, need_dx, need_db):
    return (xc.new_empty((dz.shape[0], xc.shape[1]) if need_dx else (0,)), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],) if need_db else (0,), dtype=torch.float32 if need_db else weight.dtype))


def _fused_loss_backward(ctx, grad_loss, *_unused):
    _first_order()
    if grad_loss is None:
        return (None,) * 18
    if ctx.deferred:
        need_dx, need_db = ctx.needs
        dx, dw, db = _fused_loss_grads_op(grad_loss, *ctx.saved_tensors, need_dx, need_db)
        grads = (dx.view(ctx.hidden_shape) if need_dx else None, dw, db.to(ctx.dtypes[2]) if need_db else None)
    else:
        grads = [None if g.numel() == 0 else _scaled_cast_op(g, grad_loss, dtype, ctx.backend)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
    return (*grads, *([None] * 15))


# Eager calls let a one-chunk Triton pass run its gradient GEMMs in backward, with the upstream gradient in
# their epilogues (``ops/fused_loss.deferring``); the custom op returns the gradients formed in forward.
_fused_loss_op.register_autograd(_fused_loss_backward, setup_context=_fused_loss_setup,
                                 eager_context=_fused_loss.deferring)


def _fused_loss_reference(hidden, weight, targets, mask, old_logprobs, advantages, *, bias, temperature,
                          skip_zero_advantage, **options):
    """The specification computes every token; with ``skip_zero_advantage`` its metrics cover the tokens the
    other backends compute (``computed_frac``), as theirs do, while the loss keeps every valid token."""
    valid = mask != 0
    old_logprobs, advantages, options["ref_logprobs"], options["rollout_is_weights"] = _detached(
        old_logprobs, advantages, options["ref_logprobs"], options["rollout_is_weights"])

    def spec(hidden, weight, bias, counted=mask):
        hidden, weight, bias = _reference_inputs(hidden, weight, bias, valid)
        return _fused_loss.fused_linear_ngrpo_loss_naive(hidden, weight, targets.long(), counted, old_logprobs,
                                                         advantages=advantages, bias=bias, temperature=temperature,
                                                         **options)

    loss, metrics = _reference(spec, hidden, weight, bias)
    if skip_zero_advantage:
        computed = valid & ((advantages if advantages.dim() == 2 else advantages[:, None]) != 0)
        with torch.no_grad():
            _, metrics = spec(hidden, weight, bias, counted=computed)
        n_valid = valid.sum(dtype=torch.float32)
        metrics["computed_frac"] = torch.where(n_valid > 0, computed.sum(dtype=torch.float32) / n_valid.clamp_min(1), 0)
    return loss, metrics


def fused_linear_ngrpo_loss(backend: Backend, hidden, weight, targets, mask, old_logprobs, advantages, *, bias,
                            temperature, eps_neg, eps_pos, clip_ratio_c, ref_logprobs, beta, entropy_coef,
                            loss_agg_mode: AggMode, normalizer, length_budget, rollout_is_weights, workspace_bytes,
                            skip_zero_advantage):
    options = dict(eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, beta=beta, entropy_coef=entropy_coef,
                   loss_agg_mode=loss_agg_mode, normalizer=normalizer, length_budget=length_budget,
                   ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights)
    if backend == Backend.REFERENCE:
        return _fused_loss_reference(hidden, weight, targets, mask, old_logprobs, advantages, bias=bias,
                                     temperature=temperature, skip_zero_advantage=skip_zero_advantage, **options)
    grad = torch.is_grad_enabled()
    tensor_normalizer, number = _split(normalizer)
    loss, stats, n_tokens, computed_frac, _, _, _ = _fused_loss_op(
        hidden, weight, bias, targets, mask, old_logprobs, advantages, ref_logprobs, rollout_is_weights,
        tensor_normalizer, backend.value, loss_agg_mode.value,
        _scalars(temperature, eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, number, length_budget),
        workspace_bytes or 0, skip_zero_advantage, grad and hidden.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad)
    metrics = _policy_loss.metrics_from_stats(stats, n_tokens, entropy=True, logprob=True, kl=ref_logprobs is not None,
                                              dual_clip=clip_ratio_c is not None)
    if skip_zero_advantage:
        metrics["computed_frac"] = computed_frac.detach()
    return loss, metrics
