"""ngrpo-kernels: fused kernels for NGRPO reinforcement-learning training of LLMs.

Public API (one entry point per op; each picks the backend from the tensors' device):

- ``ngrpo_advantages`` / ``group_advantages``: group advantages with NGRPO's virtual max-reward sample.
- ``fused_linear_logprobs``: hidden states x lm_head -> token log-probs (+ entropy), no full logits.
- ``fused_linear_ngrpo_loss`` / ``NGRPOLoss``: hidden states -> NGRPO loss and gradients in one pass.
- ``ngrpo_policy_loss``: the asymmetric clipped policy loss, forward and backward in one fused pass.
- ``selected_backend(device)`` / ``use_backend(name)``: which implementation runs, and forcing one.
- ``gradients_in_forward(enabled=True)``: process-wide, the fused loss forms its gradients in the forward at
  any size (for frameworks that free the lm_head weight between forward and backward; DeepSpeed parameters
  are recognised without it).
"""

from .backend import Backend, selected_backend, use_backend
from ._cpp import cpp_available
from .functional import (
    fused_linear_logprobs,
    fused_linear_ngrpo_loss,
    group_advantages,
    ngrpo_advantages,
    ngrpo_policy_loss,
)
from .modules import NGRPOLoss
from .ops.fused_loss import gradients_in_forward
from .variants import AggMode, Estimator

__version__ = "0.1.0"

__all__ = [
    "AggMode",
    "Backend",
    "Estimator",
    "NGRPOLoss",
    "cpp_available",
    "fused_linear_logprobs",
    "fused_linear_ngrpo_loss",
    "gradients_in_forward",
    "group_advantages",
    "ngrpo_advantages",
    "ngrpo_policy_loss",
    "selected_backend",
    "use_backend",
]
