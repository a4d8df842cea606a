"""torch.compile and torch.library: every public op traces with fullgraph=True, compiled results and gradients
equal eager ones, float options do not recompile per value, value checks still fire, and
``torch.library.opcheck`` accepts each custom op (schema, fake tensors, autograd registration, AOT dispatch).

Compiled with ``backend="aot_eager"`` (Dynamo + AOTAutograd + fake tensors: where tracing fails) and, once per
op, with inductor. Small shapes: the kernels run under the Triton interpreter when TRITON_INTERPRET=1."""

import contextlib

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import ngrpo_kernels as nk
from ngrpo_kernels import _library

B, T, H, V = 3, 5, 16, 37


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(device=torch.device("cpu"), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    x = dict(
        hidden=torch.randn(B, T, H, generator=g).to(dtype), weight=(0.3 * torch.randn(V, H, generator=g)).to(dtype),
        targets=torch.randint(0, V, (B, T), generator=g), mask=mask, lp=lp,
        old=lp + 0.2 * torch.randn(B, T, generator=g), ent=torch.rand(B, T, generator=g),
        ref=lp + 0.1 * torch.randn(B, T, generator=g), adv=torch.randn(B, generator=g),
        rewards=(torch.rand(2 * B, generator=g) > 0.5).float(), ids=torch.arange(2 * B) // 2,
    )
    return {k: v.to(device) for k, v in x.items()}


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _compare(fn, args, backend="aot_eager", atol=1e-5):
    """fn(*leaves) -> (loss, extra tensors); compiled and eager agree in value and in every leaf's gradient."""
    eager_args, compiled_args = _leaves(*args), _leaves(*args)
    want = fn(*eager_args)
    got = torch.compile(fn, backend=backend, fullgraph=True)(*compiled_args)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, atol=atol, rtol=1e-5)
    want[0].backward()
    got[0].backward()
    for e, c in zip(eager_args, compiled_args):
        torch.testing.assert_close(c.grad, e.grad, atol=atol, rtol=1e-5)


def test_policy_loss_compiles(backend, device):
    x = _inputs(device)

    def fn(lp, ent):
        loss, m = nk.ngrpo_policy_loss(lp, x["old"], x["adv"], x["mask"], ref_logprobs=x["ref"], beta=0.04,
                                       entropy=ent, entropy_coef=0.01, clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean")
        return loss, m["clip_frac"], m["kl"], m["dual_clip_frac"]

    with nk.use_backend(backend):
        _compare(fn, (x["lp"], x["ent"]))


def test_linear_logprobs_compiles(backend, device):
    x = _inputs(device)
    targets = x["targets"].masked_fill(~x["mask"], -100)

    def fn(hidden, weight):
        lp, ent = nk.fused_linear_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True)
        return (lp * x["adv"][:, None]).sum() + 0.1 * ent.sum(), lp, ent

    with nk.use_backend(backend):
        _compare(fn, (x["hidden"], x["weight"]))


def test_fused_loss_compiles(backend, device):
    x = _inputs(device)

    def fn(hidden, weight):
        loss, m = nk.fused_linear_ngrpo_loss(hidden, weight, x["targets"], x["mask"], x["old"], advantages=x["adv"],
                                             entropy_coef=0.001, temperature=0.9, normalizer=torch.tensor(7.0))
        return loss, m["entropy"], m["clip_frac"], m["logprob_mean"]

    with nk.use_backend(backend):
        _compare(fn, (x["hidden"], x["weight"]), atol=1e-4)


def test_advantages_compile(backend, device):
    x = _inputs(device)
    fn = torch.compile(lambda r: nk.ngrpo_advantages(r, x["ids"], r_max=1.0), backend="aot_eager", fullgraph=True)
    with nk.use_backend(backend):
        torch.testing.assert_close(fn(x["rewards"]), nk.ngrpo_advantages(x["rewards"], x["ids"]))


def test_inductor_compiles_the_fused_loss_and_logprobs():
    """The default compiler, end to end, on the default backend of this machine."""
    x = _inputs()

    def fn(hidden, weight):
        loss, _ = nk.fused_linear_ngrpo_loss(hidden, weight, x["targets"], x["mask"], x["old"], advantages=x["adv"])
        lp = nk.fused_linear_logprobs(hidden, weight, x["targets"])
        return loss + 0.5 * (lp * x["mask"]).sum(), lp

    _compare(fn, (x["hidden"], x["weight"]), backend="inductor", atol=1e-4)


def test_float_options_do_not_recompile_per_value():
    """An adaptive entropy coefficient, a per-step normaliser, a KL coefficient, a temperature (with a bias,
    which validation divides by it: a formatted message once pinned the value): one graph after the first
    recompile (Dynamo's automatic dynamic), whatever the values. Counted through AOTAutograd (as inductor
    compiles): a float that reaches a tensor factory is specialised there, after Dynamo, and recompiled per
    value (the 9th an error under fullgraph=True), which Dynamo's own count did not see."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x = _inputs()
    counter = CompileCounterWithBackend("aot_eager")

    bias = torch.zeros(x["weight"].shape[0])  # with a bias, validation reads the temperature too

    @torch.compile(backend=counter, fullgraph=True)
    def step(hidden, weight, entropy_coef, normalizer, beta, temperature):
        loss, _ = nk.fused_linear_ngrpo_loss(hidden, weight, x["targets"], x["mask"], x["old"], advantages=x["adv"],
                                             entropy_coef=entropy_coef, normalizer=normalizer,
                                             ref_logprobs=x["ref"], beta=beta, bias=bias, temperature=temperature)
        return loss

    losses = []
    for i in range(5):
        hidden, weight = _leaves(x["hidden"], x["weight"])
        loss = step(hidden, weight, 0.001 * (i + 1), 10.0 + i, 0.01 * i + 0.001, 1.0 - 0.05 * i)
        loss.backward()
        want, _ = nk.fused_linear_ngrpo_loss(x["hidden"], x["weight"], x["targets"], x["mask"], x["old"],
                                             advantages=x["adv"], entropy_coef=0.001 * (i + 1), normalizer=10.0 + i,
                                             ref_logprobs=x["ref"], beta=0.01 * i + 0.001, bias=bias,
                                             temperature=1.0 - 0.05 * i)
        torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)
        losses.append(loss.item())
    assert counter.frame_count <= 2, f"{counter.frame_count} graphs for 5 option values"
    assert len(set(losses)) == 5  # the values did reach the kernel


def test_value_checks_still_fire_when_compiled():
    x = _inputs()
    fn = torch.compile(lambda lp: nk.ngrpo_policy_loss(lp, x["old"], x["adv"], x["mask"])[0], backend="aot_eager",
                       fullgraph=True)
    fn(x["lp"])
    bad = x["lp"].clone()
    bad[x["mask"]] = float("nan")
    with pytest.raises(RuntimeError, match="logprobs has NaN"):
        fn(bad)


def test_compiled_backward_is_first_order_only():
    x = _inputs()
    lp = x["lp"].clone().requires_grad_()
    loss = torch.compile(lambda lp: nk.ngrpo_policy_loss(lp, x["old"], x["adv"], x["mask"])[0],
                         backend="aot_eager", fullgraph=True)(lp)
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    eager = nk.ngrpo_policy_loss(lp, x["old"], x["adv"], x["mask"])[0]
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(eager, lp, create_graph=True)


# --- torch.library.opcheck on each custom op ---------------------------------------------------------

def _opcheck_cases(backend, device):
    x = _inputs(device)
    name = nk.Backend(backend).value
    s = _library._scalars
    lp, ent, hidden, weight = _leaves(x["lp"], x["ent"], x["hidden"], x["weight"])
    n = B * T
    return {
        "group_advantages": (torch.ops.ngrpo.group_advantages.default,
                             (x["rewards"], x["ids"], name, "ngrpo", 1, True, s(1.0, 1e-6, 0.1, 0.5))),
        "policy_loss": (torch.ops.ngrpo.policy_loss.default,
                        (lp, x["old"], x["adv"], x["mask"], x["ref"], ent, None, torch.tensor(9.0, device=device), name, "token-mean",
                         s(0.16, 0.24, 3.0, 0.04, 0.01, None, None), True, True)),
        "linear_logprobs": (torch.ops.ngrpo.linear_logprobs.default,
                            (hidden.reshape(n, H), weight, None, x["targets"].reshape(n), name, s(1 / 0.7), -100, True,
                             0)),
        "linear_logprobs_backward": (torch.ops.ngrpo.linear_logprobs_backward.default,
                                     (x["hidden"].reshape(n, H), x["weight"], None, x["targets"].reshape(n),
                                      torch.tensor([[3.0, 0.5]], device=device).repeat(n, 1),  # (max, log s)
                                      torch.rand(n, device=device), torch.randn(n, device=device),
                                      torch.randn(n, device=device), name,
                                      s(1.0), -100, True, True, False, 0)),
        "fused_linear_ngrpo_loss": (torch.ops.ngrpo.fused_linear_ngrpo_loss.default,
                                    (hidden, weight, None, x["targets"], x["mask"], x["old"], x["adv"], None, None,
                                     None, name, "seq-mean-token-sum-norm",
                                     s(1.0, 0.16, 0.24, None, 0.0, 0.001, 4.0, 8.0), 0, False, True, True, False)),
        "scaled_cast": (torch.ops.ngrpo.scaled_cast.default,
                        (torch.randn(7, 33, device=device), torch.tensor(0.37, device=device), torch.bfloat16, name)),
        # an eager one-chunk Triton fused loss's backward: dZ [n, V], gathered rows [n, H], token order and count
        "fused_loss_grads": (torch.ops.ngrpo.fused_loss_grads.default,
                             (torch.tensor(0.37, device=device), x["weight"], 0.01 * torch.randn(n, V, device=device),
                              x["hidden"].reshape(n, H), torch.randperm(n, device=device),
                              torch.tensor([n - 4], dtype=torch.int32, device=device), None, True, True)),
        # fp16: dZ formed times a power of two (the scale), only dW asked for
        "fused_loss_grads_fp16": (torch.ops.ngrpo.fused_loss_grads.default,
                                  (torch.tensor(0.37, device=device), x["weight"].half(),
                                   (0.01 * torch.randn(n, V, device=device)).half(), x["hidden"].reshape(n, H).half(),
                                   torch.randperm(n, device=device),
                                   torch.tensor([n], dtype=torch.int32, device=device),
                                   torch.tensor(0.25, device=device), False, False)),
    }


@pytest.mark.parametrize("op", ["group_advantages", "policy_loss", "linear_logprobs", "linear_logprobs_backward",
                                "fused_linear_ngrpo_loss", "scaled_cast", "fused_loss_grads", "fused_loss_grads_fp16"])
def test_opcheck(op, backend, device):
    if op.startswith("fused_loss_grads") and backend != "triton":
        pytest.skip("the deferred backward of the Triton schedule")
    fn, args = _opcheck_cases(backend, device)[op]
    torch.library.opcheck(fn, args)


@pytest.mark.skipif(not nk.cpp_available(), reason="the C++ extension was not built")
def test_fused_loss_compiles_on_the_cpp_backend():
    """The CPU default of the fused loss when the Triton interpreter is off."""
    test_fused_loss_compiles("cpp", torch.device("cpu"))


def test_dynamic_shapes_compile_once():
    """dynamic=True: one graph for batches of several shapes (the fakes and the checks take symbolic sizes)."""
    counter = CompileCounter()

    def step(hidden, weight, targets, mask, old, adv):
        loss, _ = nk.fused_linear_ngrpo_loss(hidden, weight, targets, mask, old, advantages=adv)
        return loss + 0.1 * (nk.fused_linear_logprobs(hidden, weight, targets) * mask).sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(3)
    for b, t in ((2, 5), (3, 7), (4, 9)):
        args = (torch.randn(b, t, H, generator=g), 0.3 * torch.randn(V, H, generator=g),
                torch.randint(0, V, (b, t), generator=g), torch.rand(b, t, generator=g) > 0.3,
                -torch.rand(b, t, generator=g), torch.randn(b, generator=g))
        eager_leaves, compiled_leaves = _leaves(*args[:2]), _leaves(*args[:2])
        want, got = step(*eager_leaves, *args[2:]), compiled(*compiled_leaves, *args[2:])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        want.backward()
        got.backward()
        for e, c in zip(eager_leaves, compiled_leaves):
            torch.testing.assert_close(c.grad, e.grad, atol=1e-4, rtol=1e-5)
    assert counter.frame_count == 1


def test_backward_allocates_no_zero_gradients_for_side_outputs():
    """The ops' side outputs (Stat sums, the stored dX / dW) get no gradient: autograd must not materialise
    zeros for them in backward (at the 7B head a zero dW would be 2.2 GB and a memset). Every op the backward
    dispatches that returns a new [V, H] tensor is recorded: only the returned gradient may appear (made by
    ``scaled_cast`` from the stored one, or by ``fused_loss_grads`` where the eager route left the gradient
    GEMMs to backward; in-place ops allocate nothing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view or func._schema.is_mutable:  # views and in-place ops allocate nothing
                return out
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.shape == (V, H):
                    self.calls.append(str(func))
            return out

    x = _inputs()
    hidden, weight = _leaves(x["hidden"], x["weight"])
    loss, _ = nk.fused_linear_ngrpo_loss(hidden, weight, x["targets"], x["mask"], x["old"], advantages=x["adv"])
    with Record() as record:
        loss.backward()
    assert record.calls in (["ngrpo.scaled_cast.default"], ["ngrpo.fused_loss_grads.default"]), record.calls

    hidden, weight = _leaves(x["hidden"], x["weight"])
    lp, ent = nk.fused_linear_logprobs(hidden, weight, x["targets"], return_entropy=True)
    with Record() as record:
        lp.sum().backward()  # entropy and the logsumexp unused
    assert record.calls == ["ngrpo.linear_logprobs_backward.default"], record.calls


# --- the eager route and the dispatcher route ----------------------------------------------------------

class _PassThrough:
    """A dispatch mode that only forwards: while it is active every ngrpo op goes through the dispatcher."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = set()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "ngrpo":
                    self.ops.add(func.name())
                return func(*args, **(kwargs or {}))

        return Mode()


def _every_public_op(x):
    """Each public op once, forward and backward: (outputs, gradients of the leaves)."""
    hidden, weight, lp, ent = _leaves(x["hidden"], x["weight"], x["lp"], x["ent"])
    loss, metrics = nk.fused_linear_ngrpo_loss(hidden, weight, x["targets"], x["mask"], x["old"], advantages=x["adv"],
                                               entropy_coef=0.01)
    logp, h = nk.fused_linear_logprobs(hidden, weight, x["targets"], return_entropy=True, temperature=0.7)
    ploss, _ = nk.ngrpo_policy_loss(lp, x["old"], x["adv"], x["mask"], entropy=ent, entropy_coef=0.01)
    adv = nk.ngrpo_advantages(x["rewards"], x["ids"])
    (loss + (logp * x["mask"]).sum() + h.mean() + ploss).backward()
    outputs = [loss, metrics["clip_frac"], logp, h, ploss, adv]
    return [o.detach() for o in outputs], [hidden.grad, weight.grad, lp.grad, ent.grad]


def test_eager_calls_skip_the_dispatcher(backend, device, monkeypatch):
    """Plain eager calls run the ops' Python implementations directly (no custom-op dispatch: host time an
    isolated call pays before its first kernel); every custom op is made unusable and everything still runs."""
    def unusable(*args, **kwargs):
        raise AssertionError("an eager call went through the dispatcher")

    for op in (_library._fused_loss_op, _library._linear_logprobs_op, _library._linear_logprobs_backward_op,
               _library._policy_loss_op, _library._group_advantages_op, _library._scaled_cast_op,
               _library._fused_loss_grads_op):
        monkeypatch.setattr(op, "op", unusable)
    with nk.use_backend(backend):
        outputs, grads = _every_public_op(_inputs(device))
        with _library.dispatcher_route(), pytest.raises(AssertionError, match="dispatcher"):
            _every_public_op(_inputs(device))  # what the benchmarks use to price the dispatch
    assert all(torch.isfinite(t).all() for t in outputs + grads)


def test_both_routes_give_identical_results(backend, device):
    """The eager route and the dispatcher route (taken under a dispatch mode, as by FakeTensor or make_fx) run
    the same code: identical outputs and gradients, and the dispatcher route really reached every op."""
    x = _inputs(device)
    with nk.use_backend(backend):
        eager_out, eager_grads = _every_public_op(x)
        with _PassThrough() as mode:
            op_out, op_grads = _every_public_op(x)
    assert mode.ops == {"ngrpo::fused_linear_ngrpo_loss", "ngrpo::scaled_cast", "ngrpo::linear_logprobs",
                        "ngrpo::linear_logprobs_backward", "ngrpo::policy_loss", "ngrpo::group_advantages"}, mode.ops
    for a, b in zip(eager_out + eager_grads, op_out + op_grads):
        assert torch.equal(a, b)


def test_tensor_subclasses_and_transforms_take_the_dispatcher():
    """What cannot run the Python implementation directly is routed to the custom op."""
    t = torch.zeros(2)
    assert not _library._traced((t, torch.nn.Parameter(t), "x", 1.0, None))
    assert _library._traced((torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), t),))
    with _PassThrough():
        assert _library._traced((t,))
    seen = []
    torch.func.grad(lambda v: (seen.append(_library._traced((v,))), v.sum())[1])(t)
    assert seen == [True]


# --- the inputs' device ---------------------------------------------------------------------------------

def test_every_kernel_launches_under_the_inputs_device_guard(monkeypatch):
    """Triton launches on the current device; each op makes its inputs' device current (_inputs_device) for
    its whole body, on both routes, forward and backward: no launch happens outside that guard."""
    from triton.runtime.interpreter import InterpretedFunction

    from ngrpo_kernels.backend import interpreter_enabled
    if not interpreter_enabled():
        pytest.skip("counts the Triton interpreter's launches (TRITON_INTERPRET=1)")
    depth, launches = [0], []

    @contextlib.contextmanager
    def guard(args):
        assert any(isinstance(a, torch.Tensor) for a in args)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append(depth[0] > 0)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(_library, "_inputs_device", guard)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    with nk.use_backend("triton"):
        _every_public_op(_inputs())
        eager = len(launches)
        with _library.dispatcher_route():
            _every_public_op(_inputs())
    assert eager > 10 and len(launches) > eager + 10 and all(launches), launches


class _OnGPU(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what _inputs_device reads), for a machine without GPUs."""
    is_cuda = property(lambda self: True)
    device = property(lambda self: torch.device("cuda", 1))

    def get_device(self):
        return 1


@pytest.mark.parametrize("current", [0, 1])
def test_inputs_device_becomes_current_only_when_it_differs(monkeypatch, current):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    on_gpu = torch.Tensor._make_subclass(_OnGPU, torch.zeros(2))
    with _library._inputs_device(("x", None, on_gpu, torch.zeros(1))):
        pass
    assert entered == ([torch.device("cuda", 1)] if current == 0 else [])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("CPU inputs never ask for a GPU"))
    with _library._inputs_device((torch.zeros(1), 2.0)):
        pass


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ops_run_on_the_inputs_gpu_when_another_is_current():
    """device_map="auto" puts the head on the last GPU while the process's current device stays cuda:0: every
    op must run there (Triton would launch on cuda:0 with cuda:1's pointers) and leave cuda:0 current."""
    torch.cuda.set_device(0)
    x = _inputs(torch.device("cuda", 1))
    got_out, got_grads = _every_public_op(x)
    assert torch.cuda.current_device() == 0
    with torch.cuda.device(1):
        want_out, want_grads = _every_public_op(x)
    for a, b in zip(got_out + got_grads, want_out + want_grads):
        assert a.device == torch.device("cuda", 1)
        torch.testing.assert_close(a, b)


def test_a_symbolic_batch_size_is_not_mistaken_for_a_shape_error():
    """A forward compiled with dynamic=True, then compiled again (fullgraph) under no_grad, as a trainer's old-
    policy pass does: the advantages' shape check compared a symbolic batch size by tuple membership and raised
    'advantages must have shape (4,) or (4, 6), got shape (4,)' while tracing."""
    import copy

    B, T, H, V = 4, 6, 16, 64
    gen = torch.Generator().manual_seed(0)

    class Policy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lm_head = torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)
            self.loss = nk.NGRPOLoss()

        def forward(self, ids, mask, old, adv):
            return self.loss(self.emb(ids), self.lm_head.weight, ids, mask, old, advantages=adv)[0]

    args = (torch.randint(0, V, (B, T), generator=gen), torch.ones(B, T), -torch.rand(B, T, generator=gen) - 2,
            torch.randn(B, generator=gen))
    model = Policy()
    want = model(*args)
    torch.testing.assert_close(torch.compile(copy.deepcopy(model), fullgraph=True, dynamic=True)(*args), want)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(copy.deepcopy(model), fullgraph=True)(*args), want.detach())

    # the Liger adapter's per-token vllm_is_ratio, checked the same way
    from ngrpo_kernels.integrations.liger import LigerFusedLinearNGRPOLoss

    liger = LigerFusedLinearNGRPOLoss()
    ids, mask, old, adv = args
    hidden, ratio = model.emb(ids).detach(), torch.ones(B, T)

    def liger_loss(h):
        return liger(h.reshape(B * T, H), model.lm_head.weight, ids, mask, adv, old_per_token_logps=old,
                     vllm_is_ratio=ratio)[0]

    want = liger_loss(hidden)
    torch.testing.assert_close(torch.compile(liger_loss, fullgraph=True, dynamic=True)(hidden), want)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(liger_loss, fullgraph=True)(hidden), want.detach())
