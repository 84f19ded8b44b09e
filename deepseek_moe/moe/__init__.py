"""Mixture-of-Experts: router, dispatch, grouped experts, balance losses, and the layer."""

from .dispatch import Permutation, combine, dispatch, dispatch_reference, expert_counts, permute
from .experts import GroupedExperts
from .layer import DeepseekMoE, MoEAux, moe_layers
from .losses import balance_losses, balance_statistics
from .router import HashRouter, RouterOutput, TopKRouter

__all__ = [
    "DeepseekMoE",
    "GroupedExperts",
    "HashRouter",
    "MoEAux",
    "RouterOutput",
    "TopKRouter",
    "balance_losses",
    "balance_statistics",
    "Permutation",
    "combine",
    "dispatch",
    "dispatch_reference",
    "expert_counts",
    "moe_layers",
    "permute",
]
