"""Balance losses of DeepSeekMoE (eq. 12-17), returned before their alpha weights.

Shape legend: B sequences, S tokens per sequence, E routed experts (N' in the paper), K routed
experts per token (K'), G device groups (D in the paper).

With ``seq_aux`` the statistics f and P are taken over each sequence and the loss is averaged
over the batch (what the released code does); otherwise over all B*S tokens at once. Under
perfectly uniform routing both losses equal 1.
"""

from __future__ import annotations

import torch


def balance_statistics(
    scores_BSE: torch.Tensor, topk_ids_BSK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f_i (eq. 13) and P_i (eq. 14) per sequence: two [B, E] fp32 tensors.

    f carries no gradient (it counts discrete choices); P carries the router's gradient.
    """
    B, S, E = scores_BSE.shape
    K = topk_ids_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=torch.float32, device=scores_BSE.device)
    counts_BE.scatter_add_(
        1, topk_ids_BSK.reshape(B, S * K), torch.ones(B, S * K, device=scores_BSE.device)
    )
    f_BE = counts_BE * (E / (K * S))
    P_BE = scores_BSE.float().mean(dim=1)
    return f_BE, P_BE


def balance_losses(
    scores_BSE: torch.Tensor,
    topk_ids_BSK: torch.Tensor,
    n_groups: int = 1,
    seq_aux: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert-level eq. 12, device-level eq. 15) balance losses, each a scalar before alpha.

    Routed experts are split into ``n_groups`` contiguous groups of equal size for eq. 15-17 (under
    expert parallelism, the ranks that hold them).
    """
    if not seq_aux:
        B, S, E = scores_BSE.shape
        scores_BSE = scores_BSE.reshape(1, B * S, E)
        topk_ids_BSK = topk_ids_BSK.reshape(1, B * S, -1)
    f_BE, P_BE = balance_statistics(scores_BSE, topk_ids_BSK)
    expert_loss = (f_BE * P_BE).sum(-1).mean()
    B, E = f_BE.shape
    if E % n_groups:
        raise ValueError(f"{n_groups} device groups do not divide {E} routed experts")
    f_BG = f_BE.view(B, n_groups, E // n_groups).mean(-1)  # eq. 16
    P_BG = P_BE.view(B, n_groups, E // n_groups).sum(-1)  # eq. 17
    device_loss = (f_BG * P_BG).sum(-1).mean()
    return expert_loss, device_loss
