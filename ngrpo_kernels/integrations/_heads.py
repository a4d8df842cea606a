"""What the RL-stack adapters share about a model's output head (TRL's and verl's)."""

from __future__ import annotations

import torch


def logit_scale(config) -> float:
    """The factor the model's head multiplies its logits by, folded into the temperature the kernels divide
    by. Read as TRL 1.16's own fused head reads it (``trl.trainer.utils.add_fused_lm_head``), from the text
    config of a vision-language model: Cohere's ``logit_scale`` (Muse Glimmer's ``output_multiplier``),
    Falcon-H1's ``lm_head_multiplier``, else ``logits_scaling``, which Granite and MiniCPM3 divide by and
    HyperCLOVA X multiplies by. A soft cap (Gemma's ``final_logit_softcapping``) is not a scale: refused."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None) is not None:
        raise ValueError(f"the model's final_logit_softcapping={text.final_logit_softcapping} is not implemented "
                         "by the fused head (it would train on uncapped logits)")
    scale = next((getattr(text, name) for name in ("logit_scale", "output_multiplier", "lm_head_multiplier")
                  if getattr(text, name, None) is not None), None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = float(text.logits_scaling)
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / scaling
    scale = 1.0 if scale is None else float(scale)
    if not 0.0 < scale < float("inf"):
        raise ValueError(f"the model's logit scale {scale} must be positive and finite (it divides the temperature)")
    return scale


def whole(param, compute_dtype: torch.dtype | None = None):
    """A parameter as one plain tensor. FSDP2 leaves the head sharded (a DTensor) when it is its own unit, since
    its forward, which would unshard it, is never called: gather it. Each rank's gradient of the whole tensor
    is its own tokens' part, so it goes back as a partial to be averaged (reduce-scattered) over the mesh, as
    FSDP2 averages every other gradient by default; a plain ``full_tensor()`` would treat it as identical on
    every rank and keep each rank's unreduced rows. (Mesh dimensions along which the ranks see the same
    tokens, as with tensor parallelism, average identical parts: unchanged.) A custom
    ``set_gradient_divide_factor`` is not seen here: the head's gradient stays the mean.

    ``compute_dtype`` (the hidden states' half dtype): what a gathered head is cast to. The shard is FSDP2's
    float32 master weight, which its mixed-precision policy would have cast for the forward; kept in float32
    the head GEMMs ran as exact float32 ones. It is cast after the gather, so that the gradient is averaged in
    float32 (verl's reduce_dtype) and only then rounded into the float32 master's shard."""
    if not hasattr(param, "full_tensor"):
        return param
    from torch.distributed.tensor import Partial

    full = param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)
    if compute_dtype in (torch.bfloat16, torch.float16) and full.dtype != compute_dtype:
        full = full.to(compute_dtype)
    return full
