"""ngrpo-kernels: fused kernels for NGRPO reinforcement-learning training of LLMs.

Public API (one entry point per op; each picks the backend from the tensors' device):

- ``ngrpo_advantages`` / ``group_advantages``: group advantages with NGRPO's virtual max-reward sample.
- ``fused_linear_logprobs``: hidden states x lm_head -> token log-probs (+ entropy), no full logits.
- ``ngrpo_policy_loss``: the asymmetric clipped policy loss, forward and backward in one fused pass.
- ``selected_backend(device)`` / ``use_backend(name)``: which implementation runs, and forcing one.
"""

from .backend import Backend, selected_backend, use_backend
from .functional import fused_linear_logprobs, group_advantages, ngrpo_advantages, ngrpo_policy_loss
from .variants import AggMode, Estimator

__version__ = "0.1.0"

__all__ = [
    "AggMode",
    "Backend",
    "Estimator",
    "fused_linear_logprobs",
    "group_advantages",
    "ngrpo_advantages",
    "ngrpo_policy_loss",
    "selected_backend",
    "use_backend",
]
