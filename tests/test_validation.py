"""Bad input raises a clear error naming the argument, its shape and dtype; nothing is silent."""

import os
import re

import pytest
import torch

import ngrpo_kernels as nk


def _loss_args(B=2, T=3):
    lp = -torch.rand(B, T)
    return dict(logprobs=lp, old_logprobs=lp.clone(), advantages=torch.randn(B), mask=torch.ones(B, T, dtype=torch.bool))


def _loss(**overrides):
    args = _loss_args()
    options = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return nk.ngrpo_policy_loss(args["logprobs"], args["old_logprobs"], args["advantages"], args["mask"], **options)


@pytest.mark.parametrize("rewards,ids,error,words", [
    (torch.tensor([1.0, 0.0]), torch.tensor([0]), ValueError, ["group_ids", "(1,)", "(2,)"]),
    (torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 0]]), ValueError, ["rewards", "rank 1", "(1, 2)"]),
    (torch.tensor([1, 0]), torch.tensor([0, 0]), TypeError, ["rewards", "torch.int64"]),
    (torch.tensor([1j, 0j]), torch.tensor([0, 0]), TypeError, ["rewards", "complex"]),
    (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), TypeError, ["group_ids", "torch.float32"]),
    (torch.tensor([1.0, 0.0]), torch.tensor([True, False]), TypeError, ["group_ids", "torch.bool"]),
    (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), ValueError, ["rewards", "NaN"]),
    (torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]), ValueError, ["rewards", "inf"]),
    (torch.zeros(0), torch.zeros(0, dtype=torch.int64), ValueError, ["rewards", "empty"]),
    ([1.0, 0.0], torch.tensor([0, 0]), TypeError, ["rewards", "list"]),
])
def test_advantage_input_errors(rewards, ids, error, words):
    with pytest.raises(error) as info:
        nk.ngrpo_advantages(rewards, ids)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("options,words", [
    ({"r_max": float("inf")}, ["r_max"]),
    ({"r_max": float("nan")}, ["r_max"]),
    ({"num_virtual": -1}, ["num_virtual"]),
    ({"num_virtual": 1.5}, ["num_virtual"]),
    ({"eps": 0.0}, ["eps", "(0, 1)"]),
    ({"eps": 1.0}, ["eps"]),
])
def test_advantage_option_errors(options, words):
    with pytest.raises(ValueError) as info:
        nk.ngrpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), **options)
    for word in words:
        assert word in str(info.value)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="estimator='ppo'.*'ngrpo'"):
        nk.group_advantages(torch.tensor([1.0]), torch.tensor([0]), estimator="ppo")


def test_nan_rewards_pass_without_validation():
    # validate=False skips the value checks (documented); the structure is still checked
    out = nk.ngrpo_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), validate=False)
    assert out.shape == (2,)
    with pytest.raises(TypeError):
        nk.ngrpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), validate=False)


@pytest.mark.parametrize("overrides,error,words", [
    ({"old_logprobs": -torch.rand(2, 4)}, ValueError, ["old_logprobs", "(2, 3)", "(2, 4)"]),
    ({"mask": torch.ones(3, 3)}, ValueError, ["mask", "(3, 3)"]),
    ({"logprobs": -torch.rand(6)}, ValueError, ["logprobs", "rank 2", "(6,)"]),
    ({"advantages": torch.randn(3)}, ValueError, ["advantages", "(3,)", "(2,)"]),
    ({"advantages": torch.randn(2, 4)}, ValueError, ["advantages", "(2, 4)"]),
    ({"advantages": torch.randn(2, 3, 1)}, ValueError, ["advantages", "rank 1 or 2"]),
    ({"advantages": torch.tensor([1, 0])}, TypeError, ["advantages", "torch.int64"]),
    ({"logprobs": torch.zeros(2, 3, dtype=torch.int32)}, TypeError, ["logprobs", "torch.int32"]),
    ({"old_logprobs": torch.zeros(2, 3, dtype=torch.complex64)}, TypeError, ["old_logprobs", "complex64"]),
    ({"mask": torch.ones(2, 3, dtype=torch.complex64)}, TypeError, ["mask", "complex64"]),
    ({"logprobs": torch.zeros(0, 3), "old_logprobs": torch.zeros(0, 3), "advantages": torch.zeros(0),
      "mask": torch.zeros(0, 3)}, ValueError, ["logprobs", "empty"]),
    ({"ref_logprobs": torch.zeros(2, 2), "beta": 0.1}, ValueError, ["ref_logprobs", "(2, 2)"]),
    ({"entropy": torch.zeros(2, 3, dtype=torch.int64), "entropy_coef": 0.1}, TypeError, ["entropy", "int64"]),
    ({"rollout_is_weights": torch.zeros(3, 2)}, ValueError, ["rollout_is_weights"]),
    ({"loss_agg_mode": "seq-mean"}, ValueError, ["loss_agg_mode", "'seq-mean'", "token-mean"]),
    ({"eps_neg": 0.0}, ValueError, ["eps_neg", "(0, 1)"]),
    ({"eps_pos": 0.0}, ValueError, ["eps_pos", "> 0"]),
    ({"eps_pos": float("nan")}, ValueError, ["eps_pos"]),
    ({"clip_ratio_c": 1.0}, ValueError, ["clip_ratio_c", "> 1"]),
    ({"beta": 0.1}, ValueError, ["beta", "ref_logprobs"]),
    ({"beta": -0.1, "ref_logprobs": torch.zeros(2, 3)}, ValueError, ["beta", ">= 0"]),
    ({"entropy_coef": 0.01}, ValueError, ["entropy_coef", "entropy"]),
    ({"normalizer": 0}, ValueError, ["normalizer", "> 0"]),
    ({"normalizer": float("inf")}, ValueError, ["normalizer"]),
    ({"normalizer": torch.tensor(0.0)}, ValueError, ["normalizer", "> 0"]),
    ({"normalizer": torch.tensor([3.0])}, ValueError, ["normalizer", "rank 0"]),
    # as the kernels take it, in float32: inf there, and 0 (they once gave a NaN and a -inf loss)
    ({"normalizer": torch.tensor(1e300, dtype=torch.float64)}, ValueError, ["normalizer", "float32"]),
    ({"normalizer": torch.tensor(1e-300, dtype=torch.float64)}, ValueError, ["normalizer", "float32"]),
    ({"length_budget": 10}, ValueError, ["length_budget", "seq-mean-token-sum-norm"]),
    ({"length_budget": 0, "loss_agg_mode": "seq-mean-token-sum-norm"}, ValueError, ["length_budget", "> 0"]),
    ({"mask": torch.full((2, 3), 2.0)}, ValueError, ["mask", "0 and 1"]),
    ({"logprobs": torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])}, ValueError, ["logprobs", "NaN"]),
    ({"advantages": torch.tensor([float("inf"), 0.0])}, ValueError, ["advantages", "inf"]),
])
def test_policy_loss_input_errors(overrides, error, words):
    with pytest.raises(error) as info:
        _loss(**overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


NAN_BACKENDS = ["torch", "triton", "reference"] + (["cpp"] if nk.cpp_available() else [])


def test_nan_at_masked_positions_is_not_an_error():
    lp = torch.tensor([[-0.5, float("nan")]])
    loss, _ = nk.ngrpo_policy_loss(lp, torch.tensor([[-0.5, float("-inf")]]), torch.tensor([1.0]),
                                   torch.tensor([[True, False]]))
    assert float(loss) == pytest.approx(-1.0)


@pytest.mark.parametrize("backend", NAN_BACKENDS)
def test_an_all_padding_sequence_may_hold_a_nan_advantage(backend):
    """Per-sequence advantages [B] of a sequence with no valid token are never read, as per-token ones at
    masked positions are not: a NaN there is accepted (it was refused in [B] form only), and the loss is the
    other sequences'."""
    lp = torch.tensor([[-1.0, -2.0], [0.0, 0.0], [-0.5, -0.1]])
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    with nk.use_backend(backend):
        got, _ = nk.ngrpo_policy_loss(lp, lp, torch.tensor([0.5, float("nan"), -1.0]), mask)
        want, _ = nk.ngrpo_policy_loss(lp, lp, torch.tensor([0.5, 0.0, -1.0]), mask)
        torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="advantages has NaN"):  # a sequence with a valid token is read
            nk.ngrpo_policy_loss(lp, lp, torch.tensor([0.5, 0.0, float("nan")]), mask)


@pytest.mark.parametrize("backend", NAN_BACKENDS)
def test_unsigned_targets_are_checked_as_the_ops_read_them(backend):
    """uint8 targets: -100 wraps to 156 in uint8, so a target of 156 passed the check for an ignore marker,
    then reached the op (as int64, a real id past V) and gave NaN or an index error."""
    h, w = torch.randn(1, 3, 8), torch.randn(100, 8)
    t = torch.tensor([[1, 156, 2]], dtype=torch.uint8)
    with nk.use_backend(backend), pytest.raises(ValueError, match="targets must lie in"):
        nk.fused_linear_logprobs(h, w, t)
    t[0, 1] = 99
    with nk.use_backend(backend):
        torch.testing.assert_close(nk.fused_linear_logprobs(h, w, t), nk.fused_linear_logprobs(h, w, t.long()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices():
    args = _loss_args()
    with pytest.raises(ValueError, match="one device"):
        nk.ngrpo_policy_loss(args["logprobs"].cuda(), args["old_logprobs"], args["advantages"], args["mask"])


def test_mixed_devices_meta():
    # the device check is structural: a meta tensor stands in for a second device on CPU-only machines
    args = _loss_args()
    with pytest.raises(ValueError, match="one device.*meta"):
        nk.ngrpo_policy_loss(args["logprobs"], args["old_logprobs"].to("meta"), args["advantages"], args["mask"])
    with pytest.raises(ValueError, match="one device"):
        nk.ngrpo_advantages(torch.tensor([1.0]), torch.tensor([0], device="meta"))


def test_backend_selection():
    assert nk.selected_backend("cpu") in (nk.Backend.TORCH, nk.Backend.TRITON)
    with nk.use_backend("reference"):
        assert nk.selected_backend("cpu") == nk.Backend.REFERENCE
    with pytest.raises(ValueError, match="backend='cuda'"):
        with nk.use_backend("cuda"):
            pass


def test_nan_hidden_at_a_valid_position_is_caught():
    hidden = torch.randn(2, 3, 8)
    weight = torch.randn(10, 8)
    targets = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    hidden[1, 2, 4] = float("nan")  # masked: allowed
    nk.fused_linear_ngrpo_loss(hidden, weight, targets, mask, None, advantages=torch.randn(2))
    nk.fused_linear_logprobs(hidden, weight, targets.masked_fill(~mask, -100))
    hidden[0, 1, 3] = float("inf")  # valid: refused, naming the argument
    with pytest.raises(ValueError, match="hidden has NaN or inf"):
        nk.fused_linear_ngrpo_loss(hidden, weight, targets, mask, None, advantages=torch.randn(2))
    with pytest.raises(ValueError, match="hidden has NaN or inf"):
        nk.fused_linear_logprobs(hidden, weight, targets.masked_fill(~mask, -100))


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    args = _loss_args()
    pos = (args["logprobs"], args["old_logprobs"], args["advantages"], args["mask"])
    loss, _ = nk.ngrpo_policy_loss(*pos, eps_neg=np.float32(0.2), eps_pos=np.float64(0.28), normalizer=np.int64(5),
                                   beta=np.float32(0.0))
    want, _ = nk.ngrpo_policy_loss(*pos, eps_neg=0.2, eps_pos=0.28, normalizer=5)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    adv = nk.ngrpo_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 0, 0]), num_virtual=np.int64(1),
                              r_max=np.float32(1.0))
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError, match="eps_neg"):
        _loss(eps_neg=np.bool_(True))


def test_advantages_of_shape_b_by_1_are_per_sequence():
    """TRL keeps per-sequence advantages as [B, 1]: accepted as [B], in both losses."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 5, 8, 11
    lp, adv, mask = -torch.rand(B, T, generator=g), torch.randn(B, generator=g), torch.ones(B, T)
    want, _ = nk.ngrpo_policy_loss(lp, lp + 0.1, adv, mask)
    torch.testing.assert_close(nk.ngrpo_policy_loss(lp, lp + 0.1, adv[:, None], mask)[0], want)
    x, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (B, T), generator=g)
    want, _ = nk.fused_linear_ngrpo_loss(x, w, t, mask, None, advantages=adv)
    torch.testing.assert_close(nk.fused_linear_ngrpo_loss(x, w, t, mask, None, advantages=adv[:, None])[0], want)
    with pytest.raises(ValueError, match="advantages"):
        nk.ngrpo_policy_loss(lp, lp, torch.randn(B, 2), mask)


def test_validate_is_a_flag_everywhere():
    """validate="False" (a YAML or CLI string) is refused, not read as True; so is a non-bool switch."""
    from ngrpo_kernels.integrations.liger import LigerFusedLinearNGRPOLoss

    lp = -torch.rand(2, 3)
    with pytest.raises(TypeError, match="validate"):
        nk.ngrpo_policy_loss(lp, lp, torch.randn(2), torch.ones(2, 3), validate="False")
    with pytest.raises(TypeError, match="validate"):
        nk.ngrpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), validate="no")
    with pytest.raises(TypeError, match="validate"):
        nk.fused_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), validate="False")
    with pytest.raises(TypeError, match="validate"):
        nk.NGRPOLoss(validate="False")
    with pytest.raises(TypeError, match="validate"):
        LigerFusedLinearNGRPOLoss(validate="False")
    with pytest.raises(TypeError, match="enabled"):
        nk.gradients_in_forward("no")
    assert nk.gradients_in_forward(False) is False


def test_group_ids_of_the_wrong_type_are_named():
    np = pytest.importorskip("numpy")
    x, w, t = torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.int64)
    for ids in (np.array([0, 0]), [0, 0]):
        with pytest.raises(TypeError, match="group_ids"):
            nk.fused_linear_ngrpo_loss(x, w, t, torch.ones(2, 3), None, rewards=torch.tensor([1.0, 0.0]),
                                       group_ids=ids)


def test_sequence_level_importance_weights_broadcast():
    """[B, 1] rollout importance weights (TRL's sequence-level correction) weigh every token of the sequence."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    lp, mask, adv = -torch.rand(B, T, generator=g), torch.ones(B, T), torch.randn(B, generator=g)
    old, w = lp + 0.3 * torch.randn(B, T, generator=g), torch.rand(B, 1, generator=g) + 0.5
    want, _ = nk.ngrpo_policy_loss(lp, old, adv, mask, rollout_is_weights=w.expand(B, T).contiguous())
    torch.testing.assert_close(nk.ngrpo_policy_loss(lp, old, adv, mask, rollout_is_weights=w)[0], want)
    x, head = torch.randn(B, T, 4, generator=g), torch.randn(7, 4, generator=g)
    t = torch.randint(0, 7, (B, T), generator=g)
    want, _ = nk.fused_linear_ngrpo_loss(x, head, t, mask, old, advantages=adv, rollout_is_weights=w.expand(B, T))
    torch.testing.assert_close(nk.fused_linear_ngrpo_loss(x, head, t, mask, old, advantages=adv,
                                                          rollout_is_weights=w)[0], want)
    for bad in (w[:2], w[:1]):  # another batch size is refused by name, never broadcast
        with pytest.raises(ValueError, match="rollout_is_weights"):
            nk.ngrpo_policy_loss(lp, old, adv, mask, rollout_is_weights=bad)
        with pytest.raises(ValueError, match="rollout_is_weights"):
            nk.fused_linear_ngrpo_loss(x, head, t, mask, old, advantages=adv, rollout_is_weights=bad)
    with pytest.raises(ValueError, match=r"got shape \(2, 1\)"):  # the shape as passed
        nk.fused_linear_ngrpo_loss(x, head, t, mask, old, advantages=adv[:2, None])


def test_rewards_never_get_a_gradient():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], requires_grad=True)
    for backend in ("torch", "reference"):
        with nk.use_backend(backend):
            assert not nk.ngrpo_advantages(rewards, torch.tensor([0, 0, 1, 1])).requires_grad


def test_liger_adapter_casts_hidden_states_to_the_heads_dtype():
    """bf16 activations with a float32 master head (Liger accepts them): computed as float32 hidden states."""
    from ngrpo_kernels.integrations.liger import LigerFusedLinearNGRPOLoss

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 8, generator=g).bfloat16().requires_grad_(), torch.randn(11, 8, generator=g)
    ids, mask, adv = torch.randint(0, 11, (2, 3), generator=g), torch.ones(2, 3), torch.randn(2, generator=g)
    loss, _ = LigerFusedLinearNGRPOLoss()(x, w, ids, mask, adv)
    want, _ = LigerFusedLinearNGRPOLoss()(x.detach().float(), w, ids, mask, adv)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16


def test_reference_never_takes_a_counted_target_for_an_ignore_marker():
    """validate=False, a counted position whose target is -100: the specification does not silently ignore
    it (the PyTorch paths raise an index error, the kernels give NaN)."""
    x, w, mask = torch.randn(1, 2, 4), torch.randn(5, 4), torch.ones(1, 2)
    with nk.use_backend("reference"), pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        nk.fused_linear_ngrpo_loss(x, w, torch.tensor([[1, -100]]), mask, None, advantages=torch.ones(1),
                                   validate=False)


def test_liger_adapter_refuses_kl_without_reference_logprobs():
    from ngrpo_kernels.integrations.liger import LigerFusedLinearNGRPOLoss

    fn = LigerFusedLinearNGRPOLoss(beta=0.04, loss_type="bnpo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        fn(torch.randn(6, 8), torch.randn(10, 8), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3),
           torch.randn(2), old_per_token_logps=-torch.rand(2, 3))


def test_liger_adapter_takes_ligers_importance_ratio_shapes():
    """Liger's vllm_is_ratio may be (B,) or (B, 1), one ratio per sequence, or (B, T). B == T here, so a (B,)
    ratio spread along the tokens instead of the sequences would give another loss, not an error."""
    from ngrpo_kernels.integrations.liger import LigerFusedLinearNGRPOLoss

    g = torch.Generator().manual_seed(0)
    B = T = 4
    x, w = torch.randn(B * T, 8, generator=g), torch.randn(11, 8, generator=g)
    ids, mask = torch.randint(0, 11, (B, T), generator=g), torch.ones(B, T, dtype=torch.long)
    adv, old = torch.randn(B, generator=g), -torch.rand(B, T, generator=g)
    ratio = torch.tensor([0.5, 2.0, 1.0, 0.1])
    fn = LigerFusedLinearNGRPOLoss()

    def loss(r):
        return fn(x, w, ids, mask, adv, old_per_token_logps=old, vllm_is_ratio=r)[0]

    want = loss(ratio[:, None].expand(B, T).contiguous())
    assert not torch.equal(want, loss(ratio[None, :].expand(B, T).contiguous()))
    torch.testing.assert_close(loss(ratio), want)
    torch.testing.assert_close(loss(ratio[:, None]), want)
    for bad in (torch.ones(B + 1), torch.ones(B, 2), torch.ones(B, T, 1)):
        with pytest.raises(ValueError, match="vllm_is_ratio"):
            loss(bad)


def test_liger_adapter_takes_ligers_constructor():
    """The drop-in's positional parameters are Liger's, in Liger's order, so a call written for Liger binds
    the same way; options for behaviour NGRPO lacks are refused, not ignored."""
    import inspect

    from ngrpo_kernels.integrations.liger import LigerFusedLinearNGRPOLoss

    liger = pytest.importorskip("liger_kernel.chunked_loss").LigerFusedLinearGRPOLoss
    positional = [name for name, p in inspect.signature(LigerFusedLinearNGRPOLoss.__init__).parameters.items()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == list(inspect.signature(liger.__init__).parameters)
    assert LigerFusedLinearNGRPOLoss(0.0, True, False, 1, 0.1, 0.3).options["eps_pos"] == 0.3
    with pytest.raises(ValueError, match="delta"):
        LigerFusedLinearNGRPOLoss(delta=4.0)
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        LigerFusedLinearNGRPOLoss(use_bias_correction_kl=True)
    with pytest.raises(ValueError, match="sequence|token"):
        LigerFusedLinearNGRPOLoss(importance_sampling_level="sequence")


def test_micro_batching_pitfalls_warn():
    args = _loss_args()
    pos = (args["logprobs"], args["old_logprobs"], args["advantages"], args["mask"])
    with pytest.warns(UserWarning, match="length_budget"):
        nk.ngrpo_policy_loss(*pos, loss_agg_mode="seq-mean-token-sum-norm", normalizer=4)
    with pytest.warns(UserWarning, match="whole in this micro-batch"):
        nk.fused_linear_ngrpo_loss(torch.randn(2, 3, 8), torch.randn(10, 8), torch.zeros(2, 3, dtype=torch.long),
                                   args["mask"], None, rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
                                   normalizer=6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the safe forms stay silent
        nk.ngrpo_policy_loss(*pos, loss_agg_mode="seq-mean-token-sum-norm", normalizer=4, length_budget=3)
        nk.ngrpo_policy_loss(*pos, normalizer=4)


def _head_batch(device, *, seed, B=2, T=3, H=8, V=11):
    """A small all-valid head batch on ``device`` (hidden [B, T, H], weight [V, H], targets, mask) and the
    generator that drew it, for the draws a test adds."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=gen).to(device)
    w = (torch.randn(V, H, generator=gen) / 3).to(device)
    t = torch.randint(0, V, (B, T), generator=gen).to(device)
    return h, w, t, torch.ones(B, T, dtype=torch.bool, device=device), gen


@pytest.mark.parametrize("backend", NAN_BACKENDS)
def test_a_banning_bias_on_half_inputs_gives_the_references_gradients(backend, device):
    """A banned token's bias of -1e6 (finite, so accepted) at temperature 0.5 with bf16 inputs: the fused loss
    stores half-precision logits shifted by their slice's max in fp16, where that logit is -inf, and its
    entropy-gradient term was 0 * -inf, NaN in every gradient (Triton). The banned tokens have probability 0;
    loss, entropy and gradients must match the reference's (float32 arithmetic on the same inputs)."""
    h, w, t, m, gen = _head_batch(device, seed=5, T=4, H=16, V=37)
    t = t.masked_fill((t == 3) | (t == 20), 0)
    bias = torch.zeros(37, device=device)
    bias[[3, 20]] = -1e6
    h, w, bias = (x.to(torch.bfloat16) for x in (h, w, bias))
    old, adv = (-torch.rand(2, 4, generator=gen) - 2).to(device), torch.tensor([1.0, -0.5], device=device)

    def run(name):
        x, wt = h.clone().requires_grad_(), w.clone().requires_grad_()
        with nk.use_backend(name):
            loss, metrics = nk.fused_linear_ngrpo_loss(x, wt, t, m, old, advantages=adv, bias=bias, temperature=0.5,
                                                       entropy_coef=0.05)
            loss.backward()
            lp, ent = nk.fused_linear_logprobs(x.detach().requires_grad_(), wt.detach(), t, bias=bias,
                                               temperature=0.5, return_entropy=True)
        return loss, metrics["entropy"], lp, ent, x.grad.float(), wt.grad.float()

    got, want = run(backend), run("reference")
    for g, e in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2 * e.abs().max().item())


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("V,banned", [(37, [(0, 8), (16, 30)]), (1100, [(3, 40), (1000, 1100)])])
def test_a_banned_range_of_the_vocabulary_gives_the_references_outputs(backend, V, banned, device):
    """Whole ranges of tokens banned with a -1e4 bias (a slice, the first part of a slice, the vocabulary's
    last block of slices): the slices' maxima and the online log-sum-exp over blocks of slices then meet
    maxima 1e4 apart, which a slice max taken from part of its slice, or a running max lost between blocks,
    turns into inf / NaN. Log-probs, entropy, the fused loss and every gradient match the reference's."""
    h, w, t, m, gen = _head_batch(device, seed=9, T=5, H=16, V=V)
    bias = torch.zeros(V, device=device)
    for lo, hi in banned:
        bias[lo:hi] = -1e4
    t = torch.where(bias[t] < 0, V - 200 if V > 1000 else 10, t)  # targets among the allowed tokens
    old, adv = (-torch.rand(2, 5, generator=gen) - 2).to(device), torch.tensor([1.0, -0.5], device=device)

    def run(name):
        x, wt, b = h.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_()
        with nk.use_backend(name):
            loss, metrics = nk.fused_linear_ngrpo_loss(x, wt, t, m, old, advantages=adv, bias=b, temperature=0.7,
                                                       entropy_coef=0.05)
            loss.backward()
            lp, ent = nk.fused_linear_logprobs(h, w, t, bias=bias, temperature=0.7, return_entropy=True)
        return loss, metrics["entropy"], lp, ent, x.grad, wt.grad, b.grad

    for name, g, e in zip(("loss", "entropy metric", "logprobs", "entropy", "dX", "dW", "db"), run(backend),
                          run("reference")):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item()),
                                   msg=lambda msg: f"{name}: {msg}")


def test_a_bias_that_overflows_at_the_temperature_is_refused():
    """torch.finfo(float32).min is finite, but divided by a temperature below 1 it is -inf (NaN entropy terms)."""
    h, w, t, m, _ = _head_batch("cpu", seed=6)
    bias = torch.zeros(11)
    bias[4] = torch.finfo(torch.float32).min
    adv = torch.tensor([1.0, -1.0])
    nk.fused_linear_logprobs(h, w, t, bias=bias)  # temperature 1: finite
    with pytest.raises(ValueError, match="bias / temperature overflows"):
        nk.fused_linear_logprobs(h, w, t, bias=bias, temperature=0.7)
    with pytest.raises(ValueError, match="bias / temperature overflows"):
        nk.fused_linear_ngrpo_loss(h, w, t, m, None, advantages=adv, bias=bias, temperature=0.7)


@pytest.mark.parametrize("backend", NAN_BACKENDS)
def test_non_finite_values_are_never_hidden(backend, device):
    """With validate=False nothing is checked, but nothing is hidden either: a NaN weight, a NaN log-prob or
    an out-of-range target at a valid position gives a NaN result (or an error), never a finite loss; a
    target outside [0, V) is never read."""
    if device.type == "cuda" and backend != "triton":
        pytest.skip("CPU backend")
    h, w, t, m, _ = _head_batch(device, seed=7)
    old, adv = torch.full((2, 3), -2.5, device=device), torch.tensor([1.0, -0.5], device=device)
    w_nan = w.clone()
    w_nan[3, 3] = float("nan")
    t_out = t.clone()
    t_out[0, 1] = 11
    with nk.use_backend(backend):
        loss, metrics = nk.fused_linear_ngrpo_loss(h, w_nan, t, m, old, advantages=adv, validate=False)
        assert loss.isnan() and metrics["entropy"].isnan()
        lp, ent = nk.fused_linear_logprobs(h, w_nan, t, return_entropy=True, validate=False)
        assert lp.isnan().all() and ent.isnan().all()
        for call in (lambda: nk.fused_linear_ngrpo_loss(h, w, t_out, m, old, advantages=adv, validate=False)[0],
                     lambda: nk.fused_linear_logprobs(h, w, t_out, validate=False)[0, 1]):
            try:
                assert call().isnan()
            except (RuntimeError, IndexError):  # the PyTorch paths' gather refuses the index: also loud
                assert backend != "triton"
        lp = torch.tensor([[float("nan"), -0.5]], device=device)
        loss, _ = nk.ngrpo_policy_loss(lp, torch.tensor([[-1.0, -0.7]], device=device), adv[:1], m[:1, :2],
                                       validate=False)
        assert loss.isnan()


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("where", ["old", "adv", "ref", "isw", "entropy"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_per_token_inputs_give_nan(backend, where, value, device):
    """An infinite (or NaN) old log-prob, advantage, reference log-prob, importance weight or entropy at a valid
    position gives a NaN loss on every backend, never the finite value a clip bound or the A = 0 rule would
    make of it (old log-prob +inf once gave -0.5 on all backends, and the C++ fused loss NaN)."""
    if device.type == "cuda" and backend != "triton":
        pytest.skip("CPU backend")
    gen = torch.Generator().manual_seed(3)
    m = torch.ones(2, 3, dtype=torch.bool, device=device)
    lp = (-torch.rand(2, 3, generator=gen)).to(device).requires_grad_()
    ins = dict(old=(-torch.rand(2, 3, generator=gen)).to(device), adv=torch.tensor([1.0, -0.5], device=device),
               ref=(-torch.rand(2, 3, generator=gen)).to(device), isw=torch.ones(2, 3, device=device),
               entropy=torch.rand(2, 3, generator=gen).to(device))
    bad = dict(ins)
    bad[where] = ins[where].clone()
    if where == "adv":
        bad[where][0] = value
    else:
        bad[where][0, 1] = value
    kw = dict(ref_logprobs=bad["ref"], beta=0.1, rollout_is_weights=bad["isw"], validate=False)
    with nk.use_backend(backend):
        loss, _ = nk.ngrpo_policy_loss(lp, bad["old"], bad["adv"], m, entropy=bad["entropy"], entropy_coef=0.01, **kw)
        assert loss.isnan()
        loss.backward()
        assert lp.grad[0, 1].isnan() or where == "adv"  # a NaN advantage reaches the whole row
        if where != "entropy":  # the fused loss computes its own entropy
            h = torch.randn(2, 3, 8, generator=gen).to(device)
            w = (torch.randn(11, 8, generator=gen) / 3).to(device)
            t = torch.randint(0, 11, (2, 3), generator=gen).to(device)
            loss, _ = nk.fused_linear_ngrpo_loss(h, w, t, m, bad["old"], advantages=bad["adv"], **kw)
            assert loss.isnan()


@pytest.mark.parametrize("backend", NAN_BACKENDS)
def test_an_overflowing_ratio_where_the_term_is_constant_gives_finite_values(backend, device):
    """A ratio that overflows float32 (log-ratio ~200) where A = 0, where the clip binds (A > 0) or where the
    dual clip binds (A < 0): the token's term is constant, so loss and gradient are finite and the gradient
    is exactly 0 there, as in float64 (the reference backend's autograd once gave 0 * inf = NaN)."""
    if device.type == "cuda" and backend != "triton":
        pytest.skip("CPU backend")
    m = torch.ones(1, 2, dtype=torch.bool, device=device)
    old = torch.tensor([[-200.0, -0.7]], device=device)
    for adv, clip_c in ((0.0, None), (1.0, None), (-1.0, 3.0)):
        lp = torch.tensor([[-0.1, -0.5]], device=device, requires_grad=True)
        with nk.use_backend(backend):
            loss, _ = nk.ngrpo_policy_loss(lp, old, torch.tensor([adv], device=device), m, clip_ratio_c=clip_c,
                                           validate=False)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        assert lp.grad[0, 0].item() == 0.0
        if adv == 0.0:
            assert loss.item() == 0.0


def test_non_finite_weight_and_bias_are_refused():
    h, w, t = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))
    m, adv = torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, -0.5])
    bad_w = w.clone()
    bad_w[2, 5] = float("inf")
    bias = torch.zeros(11)
    bias[4] = float("-inf")
    with pytest.raises(ValueError, match="weight has NaN or inf"):
        nk.fused_linear_logprobs(h, bad_w, t)
    with pytest.raises(ValueError, match="weight has NaN or inf"):
        nk.fused_linear_ngrpo_loss(h, bad_w, t, m, None, advantages=adv)
    with pytest.raises(ValueError, match="bias has NaN or inf.*-1e4"):
        nk.fused_linear_logprobs(h, w, t, bias=bias)
    with pytest.raises(ValueError, match="bias has NaN or inf"):
        nk.fused_linear_ngrpo_loss(h, w, t, m, None, advantages=adv, bias=bias)
    bias[4] = -1e4  # the advised way to ban a token: probability 0, every output finite
    lp, ent = nk.fused_linear_logprobs(h, w, t, bias=bias, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


def test_options_are_checked_where_they_are_given():
    """Module options fail at construction; flags refuse strings ("False" would read as True); options the
    call does not use (r_max with given advantages) are still checked."""
    for bad in (dict(temperature=0.0), dict(temperature=-1.0), dict(num_virtual=-1), dict(r_max=float("nan")),
                dict(workspace_bytes=-5), dict(workspace_bytes=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            nk.NGRPOLoss(**bad)
    with pytest.raises(TypeError, match="skip_zero_advantage"):
        nk.NGRPOLoss(skip_zero_advantage="False")
    with pytest.raises(TypeError, match="unbiased"):
        nk.ngrpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), unbiased="False")
    h, w, t = torch.randn(1, 2, 4), torch.randn(5, 4), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="return_entropy"):
        nk.fused_linear_logprobs(h, w, t, return_entropy="yes")
    m, adv = torch.ones(1, 2), torch.ones(1)
    for bad in (dict(r_max=float("inf")), dict(num_virtual=-1), dict(workspace_bytes=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            nk.fused_linear_ngrpo_loss(h, w, t, m, None, advantages=adv, **bad)


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -8.0])
def test_a_bad_normalizer_is_not_a_silent_zero(backend, value, device):
    """validate=False with a NaN / inf / 0 / negative tensor normaliser: the loss shows it as the reference's
    does (non-finite, or the sign), never the 0 loss and zero gradients that a safe inverse (and the
    reference's empty-batch rule, and 1 / inf) once made of it."""
    if device.type == "cuda" and backend != "triton":
        pytest.skip("CPU backend")
    h, w, t, m, gen = _head_batch(device, seed=5)
    adv = torch.tensor([1.0, -0.5], device=device)
    lp = -torch.rand(2, 3, generator=gen).to(device)
    results = {}
    for name in (backend, "reference"):
        with nk.use_backend(name):
            norm = torch.tensor(value, device=device)
            fused, _ = nk.fused_linear_ngrpo_loss(h, w, t, m, None, advantages=adv, normalizer=norm, validate=False)
            plain, _ = nk.ngrpo_policy_loss(lp, lp - 0.1, adv, m, normalizer=norm, validate=False)
            results[name] = (fused, plain)
            with pytest.raises(ValueError, match="normalizer"):  # a number is checked without a sync: always
                nk.ngrpo_policy_loss(lp, lp - 0.1, adv, m, normalizer=value, validate=False)
    for got, want in zip(results[backend], results["reference"]):
        if value < 0:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert got < 0 if want < 0 else got > 0
        else:
            assert not torch.isfinite(got) and not torch.isfinite(want)


@pytest.mark.parametrize("backend", NAN_BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "old", "ref", "isw"])
def test_skipping_zero_advantage_tokens_hides_no_nan(backend, where, device):
    """skip_zero_advantage computes no FLOPs for valid tokens with A = 0, but a NaN in their inputs still
    gives a NaN loss, as without the skip (NaN at masked positions still does not)."""
    if device.type == "cuda" and backend != "triton":
        pytest.skip("CPU backend")
    h, w, t, m, gen = _head_batch(device, seed=9, B=3, T=4)
    m[2, 3] = False
    adv = torch.tensor([1.0, 0.0, -0.5], device=device)  # row 1 is skipped
    ins = dict(old=-torch.rand(3, 4, generator=gen).to(device), ref=-torch.rand(3, 4, generator=gen).to(device),
               isw=torch.ones(3, 4, device=device))

    def loss_with(row, col):
        bad = {k: v.clone() for k, v in ins.items()}
        hb = h.clone()
        if where == "hidden":
            hb[row, col, 2] = float("nan")
        else:
            bad[where][row, col] = float("nan")
        with nk.use_backend(backend):
            return nk.fused_linear_ngrpo_loss(hb, w, t, m, bad["old"], advantages=adv, ref_logprobs=bad["ref"],
                                              rollout_is_weights=bad["isw"], skip_zero_advantage=True,
                                              validate=False)[0]

    assert loss_with(1, 2).isnan()  # valid, skipped
    assert torch.isfinite(loss_with(2, 3))  # masked: never read


@pytest.mark.parametrize("backend", NAN_BACKENDS)
def test_autocast_does_not_lower_the_heads_precision(backend, device):
    """Under torch.autocast, float32 inputs give the same log-probs, loss and gradients as outside it on every
    backend (autocast once turned the CPU and reference backends' GEMMs into bf16 ones: 3e-2 log-prob error)."""
    if device.type == "cuda" and backend != "triton":
        pytest.skip("CPU backend")
    h, w, t, m, gen = _head_batch(device, seed=11, T=5, H=16, V=37)
    h.requires_grad_(), w.requires_grad_()
    old, adv = -torch.rand(2, 5, generator=gen).to(device) - 2, torch.tensor([1.0, -0.5], device=device)

    def run(autocast, autocast_backward):
        h.grad = w.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            lp, ent = nk.fused_linear_logprobs(h, w, t, return_entropy=True)
            loss, _ = nk.fused_linear_ngrpo_loss(h, w, t, m, old, advantages=adv)
            with torch.autocast(device.type, enabled=autocast_backward):
                (lp.sum() + ent.sum()).backward()
                grads = [h.grad.clone(), w.grad.clone()]
                h.grad = w.grad = None
                loss.backward()
        return [lp, ent, loss, *grads, h.grad, w.grad]

    with nk.use_backend(backend):
        want = run(False, False)
        # PyTorch advises backward outside autocast; every backend holds even inside it (the reference's
        # plain autograd once ran its backward GEMMs in bf16 there: 3e-3 gradient error).
        got = run(True, autocast_backward=True)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_integer_options_take_numpy_integers_and_the_workspace_check_asks_for_what_runs():
    np = pytest.importorskip("numpy")
    h, w = torch.randn(2, 3, 8), torch.randn(23, 8)
    t = torch.randint(0, 23, (2, 3))
    t[0, 0] = -100
    torch.testing.assert_close(nk.fused_linear_logprobs(h, w, t, ignore_index=np.int64(-100)),
                               nk.fused_linear_logprobs(h, w, t, ignore_index=-100))
    with pytest.raises(TypeError, match="ignore_index"):
        nk.fused_linear_logprobs(h, w, t, ignore_index=np.bool_(True))
    m, adv = torch.ones(2, 3), torch.tensor([1.0, -1.0])
    t[0, 0] = 0
    need_grad = h.to(torch.bfloat16).requires_grad_(), w.to(torch.bfloat16)
    with torch.no_grad():  # no gradient runs, so no dZ row: 4 bytes a logit suffice
        nk.fused_linear_ngrpo_loss(*need_grad, t, m, None, advantages=adv, workspace_bytes=4 * 23)
    with pytest.raises(ValueError, match="workspace_bytes"):
        nk.fused_linear_ngrpo_loss(*need_grad, t, m, None, advantages=adv, workspace_bytes=4 * 23)
    bias = torch.zeros(23, dtype=torch.bfloat16, requires_grad=True)  # the bias's gradient needs dZ too
    with pytest.raises(ValueError, match="workspace_bytes"):
        nk.fused_linear_ngrpo_loss(h.to(torch.bfloat16), w.to(torch.bfloat16), t, m, None, advantages=adv, bias=bias,
                                   workspace_bytes=4 * 23)


def test_meta_tensors_pass_forward_and_backward_on_the_pytorch_backend():
    """Shape-only (meta) tensors go through the log-prob and fused-loss ops and their backward: the autocast
    guard is a no-op where autocast does not exist (it raised 'unsupported scalarType' in backward)."""
    h = torch.randn(2, 3, 8, device="meta", requires_grad=True)
    w = torch.randn(11, 8, device="meta", requires_grad=True)
    t = torch.randint(0, 11, (2, 3), device="meta")
    with nk.use_backend("torch"):
        nk.fused_linear_logprobs(h, w, t, validate=False).sum().backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape
        loss, _ = nk.fused_linear_ngrpo_loss(h, w, t, torch.ones(2, 3, dtype=torch.bool, device="meta"), None,
                                             advantages=torch.ones(2, device="meta"), validate=False)
        loss.backward()


@pytest.mark.parametrize("value", [1e39, 1e-46])
def test_a_number_normaliser_outside_float32_is_refused(value):
    """The loss divides by the normaliser in float32: 1e39 would be inf there (and the loss NaN)."""
    with pytest.raises(ValueError, match="float32's range"):
        _loss(normalizer=value)


def test_triton_interpret_is_read_when_the_package_is_imported():
    """Triton reads TRITON_INTERPRET when a kernel is defined (ours on first use): a value set after
    ``import ngrpo_kernels`` is not taken (it handed GPU code to the interpreter: "Cannot call @triton.jit'd
    outside of the scope of a kernel"), and forcing Triton on CPU tensors without it says what to do (it
    failed with triton's "0 active drivers")."""
    import subprocess
    import sys

    script = """
import os, torch, ngrpo_kernels as nk
h, w, t = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))
os.environ["TRITON_INTERPRET"] = "1"
assert nk.selected_backend("cpu").value != "triton"
nk.fused_linear_logprobs(h, w, t)
try:
    with nk.use_backend("triton"):
        nk.fused_linear_logprobs(h, w, t)
except RuntimeError as err:
    assert "TRITON_INTERPRET=1" in str(err) and "before" in str(err), err
    print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("option,value,words", [
    ("epsilon_low", -1.0, "epsilon_low must lie in (0, 1)"), ("epsilon_high", 0.0, "epsilon_high must be > 0"),
    ("beta", -1.0, "beta must be >= 0"), ("temperature", 0.0, "temperature must be > 0"),
    ("clip_ratio_c", 1.0, "clip_ratio_c must be > 1"), ("workspace_bytes", 0, "workspace_bytes"),
])
def test_liger_adapter_checks_its_options_when_built(option, value, words):
    """As NGRPOLoss does, not first in the forward (where beta=-1 was reported as a missing ref_per_token_logps)."""
    from ngrpo_kernels.integrations.liger import LigerFusedLinearNGRPOLoss

    with pytest.raises(ValueError, match=re.escape(words)):
        LigerFusedLinearNGRPOLoss(**{option: value})
    assert "eps_neg=0.16" in repr(LigerFusedLinearNGRPOLoss())
