"""Group advantages: every backend against the float64 reference and docs/algorithm.md §2's numbers."""

import math

import pytest
import torch

import ngrpo_kernels as nk
from ngrpo_kernels.ops.advantages.naive import group_advantages_naive

# docs/algorithm.md §2, G = 8, binary rewards, eps = 1e-6: k correct -> (A correct, A wrong), NGRPO then GRPO.
TABLE_NGRPO = {0: (None, -0.333332), 1: (1.763830, -0.503951), 2: (1.333331, -0.666665),
              4: (0.843272, -1.054091), 7: (0.333332, -2.666658), 8: (0.0, None)}
TABLE_GRPO = {1: (2.474867, -0.353552), 2: (1.620182, -0.540061), 4: (0.935413, -0.935413),
             7: (0.353552, -2.474867)}


def _group_of_8(k, device):
    rewards = torch.tensor([1.0] * k + [0.0] * (8 - k), device=device)
    return rewards, torch.full((8,), 42, dtype=torch.int64, device=device)


def _run(backend, fn, *args, **kwargs):
    with nk.use_backend(backend):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("k", sorted(TABLE_NGRPO))
def test_spec_table_ngrpo(k, device, backend):
    rewards, ids = _group_of_8(k, device)
    for out in (_run(backend, nk.ngrpo_advantages, rewards, ids),
                group_advantages_naive(rewards.double(), ids)):
        correct, wrong = TABLE_NGRPO[k]
        if correct is not None:
            assert out[:k].cpu().double() == pytest.approx([correct] * k, abs=1e-6)
        if wrong is not None:
            assert out[k:].cpu().double() == pytest.approx([wrong] * (8 - k), abs=1e-6)


@pytest.mark.parametrize("k", sorted(TABLE_GRPO))
def test_spec_table_grpo(k, device, backend):
    rewards, ids = _group_of_8(k, device)
    out = _run(backend, nk.group_advantages, rewards, ids, estimator="grpo").cpu().double()
    correct, wrong = TABLE_GRPO[k]
    assert out[:k] == pytest.approx([correct] * k, abs=1e-6)
    assert out[k:] == pytest.approx([wrong] * (8 - k), abs=1e-6)


@pytest.mark.parametrize("G", [2, 3, 5, 8, 16, 40])
def test_closed_form_binary(G, device, backend):
    """A_correct = sqrt(G(G-k)/((G+1)(k+1))), A_wrong = -sqrt(G(k+1)/((G+1)(G-k))) (eps = 0)."""
    eps = 1e-12
    for k in range(0, G):
        rewards = torch.tensor([1.0] * k + [0.0] * (G - k), device=device)
        ids = torch.zeros(G, dtype=torch.int64, device=device)
        out = _run(backend, nk.ngrpo_advantages, rewards, ids, eps=eps).cpu().double()
        want_wrong = -math.sqrt(G * (k + 1) / ((G + 1) * (G - k)))
        assert out[k:] == pytest.approx([want_wrong] * (G - k), rel=2e-6)
        if k:
            want_correct = math.sqrt(G * (G - k) / ((G + 1) * (k + 1)))
            assert out[:k] == pytest.approx([want_correct] * k, rel=2e-6)


def test_small_groups_by_hand(device, backend):
    # three wrong -> -0.5 each; {1, 0} -> +0.577 / -1.155; singleton 1 -> 1/(1+eps); singleton 0 -> 0
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=device)
    ids = torch.tensor([7, 3, 7, 3, 7, 11, 12], device=device)
    out = _run(backend, nk.ngrpo_advantages, rewards, ids).cpu().double()
    s3 = math.sqrt(1 / 3) + 1e-6
    # {0,0,0} + virtual 1: mu' = 1/4, sigma' = sqrt((3/16 + 9/16) / 3) = 1/2
    # {1,0} + virtual 1:   mu' = 2/3, sigma' = sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3)
    want = [-0.25 / (0.5 + 1e-6), (1 / 3) / s3, -0.25 / (0.5 + 1e-6), (-2 / 3) / s3, -0.25 / (0.5 + 1e-6),
            1 / (1 + 1e-6), 0.0]
    assert abs(want[0] + 0.5) < 2e-6 and abs(want[1] - 0.577) < 1e-3 and abs(want[3] + 1.155) < 1e-3
    assert out == pytest.approx(want, abs=5e-7)


def test_population_std_option(device, backend):
    """unbiased=False divides by N (the paper's Eq. 6): {1, 0} + one virtual 1 -> mu 2/3, var 2/9."""
    rewards = torch.tensor([1.0, 0.0], device=device)
    ids = torch.tensor([5, 5], device=device)
    sigma = math.sqrt(2 / 9)
    pop = _run(backend, nk.ngrpo_advantages, rewards, ids, unbiased=False, eps=1e-9).cpu().double()
    assert pop == pytest.approx([(1 / 3) / sigma, (-2 / 3) / sigma], rel=1e-6)
    unb = _run(backend, nk.ngrpo_advantages, rewards, ids, eps=1e-9).cpu().double()
    assert unb == pytest.approx([(1 / 3) / math.sqrt(1 / 3), (-2 / 3) / math.sqrt(1 / 3)], rel=1e-6)


def test_eps_outside_sqrt(device, backend):
    # GRPO on {1, 0}: std = sqrt(1/2); A = 0.5 / (std + eps). eps inside the sqrt would give 0.5.
    rewards = torch.tensor([1.0, 0.0], device=device)
    ids = torch.tensor([0, 0], device=device)
    out = _run(backend, nk.group_advantages, rewards, ids, estimator="grpo", eps=0.5).cpu().double()
    assert out == pytest.approx([0.5 / (math.sqrt(0.5) + 0.5), -0.5 / (math.sqrt(0.5) + 0.5)], rel=1e-6)


def test_virtual_samples_options(device, backend):
    # {0, 0} with M = 2 virtual samples of r_max = 1: mu = 0.5, var = (4 * 0.25) / 3.
    rewards = torch.tensor([0.0, 0.0], device=device)
    ids = torch.tensor([1, 1], device=device)
    out = _run(backend, nk.ngrpo_advantages, rewards, ids, num_virtual=2, eps=1e-9).cpu().double()
    assert out == pytest.approx([-0.5 / math.sqrt(1 / 3)] * 2, rel=1e-6)
    # r_max = 3 on {1, 0}: mu = 4/3, var = ((1/3)^2 + (4/3)^2 + (5/3)^2) / 2 = 7/3
    out = _run(backend, nk.ngrpo_advantages, torch.tensor([1.0, 0.0], device=device), ids, r_max=3.0,
               eps=1e-9).cpu().double()
    assert out == pytest.approx([(-1 / 3) / math.sqrt(7 / 3), (-4 / 3) / math.sqrt(7 / 3)], rel=1e-6)


@pytest.mark.parametrize("r_max", [0.7, 1000.1, -0.3])
def test_r_max_is_not_rounded_to_float32(r_max, device, backend):
    """An all-correct group of float64 rewards equal to an r_max that float32 cannot hold: every sample equals
    the virtual one, so the advantages are exactly 0. A float32-rounded r_max left a std of ~1e-8 and gave
    advantages of 2e-3 (0.7) to 0.76 (1000.1) on the PyTorch path; compiled Triton passes a Python float
    argument as float32."""
    rewards = torch.full((6,), r_max, dtype=torch.float64, device=device)
    ids = torch.tensor([0, 0, 0, 1, 1, 1], device=device)
    rewards[3] = r_max - 1.0  # a mixed group beside it, against the float64 spec
    out = _run(backend, nk.ngrpo_advantages, rewards, ids, r_max=r_max)
    assert out[:3].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out.cpu().double(), group_advantages_naive(rewards.cpu(), ids.cpu(), r_max=r_max),
                               rtol=1e-6, atol=1e-6)


def test_num_virtual_zero_is_grpo(device, backend, gen):
    rewards = torch.randint(0, 2, (37,), generator=gen).float().to(device)
    ids = torch.randint(0, 6, (37,), generator=gen).to(device)
    a = _run(backend, nk.ngrpo_advantages, rewards, ids, num_virtual=0)
    b = _run(backend, nk.group_advantages, rewards, ids, estimator="grpo")
    torch.testing.assert_close(a, b)


def test_dr_grpo_and_w_reinforce(device, backend):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], device=device)
    ids = torch.tensor([0, 0, 0, 9, 9], device=device)
    dr = _run(backend, nk.group_advantages, rewards, ids, estimator="dr_grpo").cpu().double()
    assert dr == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0], abs=1e-6)
    w = _run(backend, nk.group_advantages, rewards, ids, estimator="w_reinforce").cpu().double()
    assert w == pytest.approx([0.1, -1.0, -1.0, 0.1, 0.1], abs=1e-7)
    w = _run(backend, nk.group_advantages, rewards, ids, estimator="w_reinforce", w_lambda=0.25)
    assert w.cpu().double() == pytest.approx([0.25, -1.0, -1.0, 0.25, 0.25], abs=1e-7)
    # correct means strictly above correct_threshold (default 0.5)
    graded = torch.tensor([0.5, 0.7, 0.2, 0.625, 0.75], device=device)  # exact in float32
    w = _run(backend, nk.group_advantages, graded, ids, estimator="w_reinforce").cpu().double()
    assert w == pytest.approx([-1.0, 0.1, -1.0, 0.1, 0.1], abs=1e-7)
    w = _run(backend, nk.group_advantages, graded, ids, estimator="w_reinforce", correct_threshold=0.625)
    assert w.cpu().double() == pytest.approx([-1.0, 0.1, -1.0, -1.0, 0.1], abs=1e-7)
    # ... above the threshold itself, not above its rounding to the rewards' dtype (0.502 is 0.50390625 in bf16)
    w = _run(backend, nk.group_advantages, torch.tensor([0.50390625, 0.5], device=device).bfloat16(), ids[:2],
             estimator="w_reinforce", correct_threshold=0.502)
    assert w.cpu().double() == pytest.approx([0.1, -1.0], abs=1e-7)


@pytest.mark.parametrize("estimator", ["ngrpo", "grpo", "dr_grpo", "w_reinforce"])
@pytest.mark.parametrize("B,num_groups", [(1, 1), (2, 1), (7, 3), (61, 9), (257, 5), (130, 130)])
@pytest.mark.parametrize("unbiased", [True, False])
def test_random_against_reference(estimator, B, num_groups, unbiased, device, backend, gen):
    """Shuffled, non-contiguous, arbitrary-valued ids (negative, sparse); binary and real rewards;
    groups larger than the kernel's block (257 / 5) and all singletons (130 / 130)."""
    id_values = torch.randperm(10_000, generator=gen)[:num_groups] * 7 - 30_000
    ids = id_values[torch.randint(0, num_groups, (B,), generator=gen)]
    for rewards in (torch.randint(0, 2, (B,), generator=gen).double(), torch.randn(B, generator=gen, dtype=torch.float64)):
        want = group_advantages_naive(rewards, ids, estimator=nk.Estimator(estimator), unbiased=unbiased)
        got = _run(backend, nk.group_advantages, rewards.to(device), ids.to(device), estimator=estimator,
                   unbiased=unbiased)
        assert got.dtype == torch.float32 and got.device.type == device.type and got.shape == (B,)
        torch.testing.assert_close(got.cpu().double(), want, rtol=2e-6, atol=2e-6)


def test_reordering_does_not_split_groups(device, backend, gen):
    B = 48
    rewards = torch.randint(0, 2, (B,), generator=gen).float()
    ids = torch.arange(B) // 8 * 1000 + 17
    perm = torch.randperm(B, generator=gen)
    whole = _run(backend, nk.ngrpo_advantages, rewards.to(device), ids.to(device))
    shuffled = _run(backend, nk.ngrpo_advantages, rewards[perm].to(device), ids[perm].to(device))
    torch.testing.assert_close(shuffled, whole[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64, torch.uint8])
def test_input_dtypes(dtype, id_dtype, device, backend):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5], dtype=dtype, device=device)
    ids = torch.tensor([3, 3, 4, 4], dtype=id_dtype, device=device)
    got = _run(backend, nk.ngrpo_advantages, rewards, ids)
    want = group_advantages_naive(rewards.double().cpu(), ids.cpu())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-6, atol=2e-6)
