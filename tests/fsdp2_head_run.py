"""Helper of test_trainer.py::test_fsdp2_head_gradient_is_averaged_over_ranks, run under
``torchrun --nproc_per_node 2`` on the CPU (gloo): a tiny Qwen2 under FSDP2 (fully_shard), each rank its own
batch, the NGRPO loss through the patched forward (_add_ngrpo_head). The reference is the mean over ranks of
the unsharded model's gradients, which is what FSDP2 computes for every parameter. Layouts: the head in the
root unit (its weight is unsharded when the loss reads it), the same with the root resharded after the
forward, and the head as its own unit (the loss reads a sharded DTensor, whose forward never runs). Rank 0
writes the errors to OUT as JSON."""

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ngrpo_kernels.integrations import trl as ngrpo_trl


def model():
    torch.manual_seed(0)
    m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    with torch.no_grad():
        m.lm_head.weight.mul_(5)
    ngrpo_trl._add_ngrpo_head(m, 1.0)
    return m


def loss(m, rank, K=5):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    request = dict(targets=ids[:, -K:], mask=torch.ones(2, K), old_logprobs=None,
                   advantages=torch.tensor([1.0, -1.0]) * (rank + 1), eps_neg=0.16, eps_pos=0.24, beta=0.0,
                   ref_logprobs=None, entropy_coef=0.01, normalizer=torch.tensor(10.0), rollout_is_weights=None)
    return m(input_ids=ids, attention_mask=torch.ones_like(ids), ngrpo_loss=request).loss


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    reference = model()
    for r in range(world):
        loss(reference, r).backward()
    want = {n: p.grad / world for n, p in reference.named_parameters()}
    errors = {}
    for layout in ("head in the root unit", "head in the root unit, resharded after forward", "head its own unit"):
        m = model()
        for layer in m.model.layers:
            fully_shard(layer, mesh=mesh)
        if layout == "head its own unit":
            fully_shard(m.lm_head, mesh=mesh)
        # accelerate before 1.11 kept embeddings, norm and head in the root and resharded it after forward
        # (fsdp_reshard_after_forward: true): its backward must re-gather them, which FSDP2 arranges on
        # the tensors it finds in the forward's output
        fully_shard(m, mesh=mesh, reshard_after_forward=layout.endswith("forward"))
        seen, whole = [], ngrpo_trl._whole
        ngrpo_trl._whole = lambda param, *dtype: (seen.append(type(param).__name__), whole(param, *dtype))[1]
        try:
            loss(m, rank).backward()
        finally:
            ngrpo_trl._whole = whole
        got = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
        errors[layout] = {n: float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want}
        errors[layout]["read as"] = seen[0]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(errors, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
    # gloo's teardown at interpreter exit sometimes aborts ("terminate called without an active exception")
    # after everything above has finished, which would fail the run for nothing
    os._exit(0)
