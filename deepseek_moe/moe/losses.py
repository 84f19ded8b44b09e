"""Balance losses of DeepSeekMoE (eq. 12-17), returned before their alpha weights.

Shape legend: B sequences, S tokens per sequence, E routed experts (N' in the paper), K routed
experts per token (K'), G device groups (D in the paper).

With ``seq_aux`` the statistics f and P are taken over each sequence and the loss is averaged
over the batch (what the released code does); otherwise over all B*S tokens at once. Under
perfectly uniform routing both losses equal 1.
"""

from __future__ import annotations

from typing import Optional

import torch


def balance_statistics(
    scores_BSE: torch.Tensor, topk_ids_BSK: torch.Tensor, valid_BS: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """f_i (eq. 13) and P_i (eq. 14) per sequence: two [B, E] fp32 tensors.

    f carries no gradient (it counts discrete choices); P carries the router's gradient.
    ``valid_BS``: the real tokens (None: all); padding takes no part in either statistic, and
    each sequence's T is its number of real tokens.
    """
    B, S, E = scores_BSE.shape
    K = topk_ids_BSK.shape[-1]
    device = scores_BSE.device
    w_BS = torch.ones(B, S, device=device) if valid_BS is None else valid_BS.to(device, torch.float32)
    counts_BE = torch.zeros(B, E, dtype=torch.float32, device=device)
    counts_BE.scatter_add_(1, topk_ids_BSK.reshape(B, S * K), w_BS.repeat_interleave(K, dim=1))
    n_B1 = w_BS.sum(1, keepdim=True).clamp_min(1.0)
    f_BE = counts_BE * (E / K) / n_B1
    if valid_BS is None:
        P_BE = scores_BSE.float().mean(dim=1)
    else:
        P_BE = (scores_BSE.float() * w_BS.unsqueeze(-1)).sum(1) / n_B1
    return f_BE, P_BE


def balance_losses(
    scores_BSE: torch.Tensor,
    topk_ids_BSK: torch.Tensor,
    n_groups: int = 1,
    seq_aux: bool = True,
    valid_BS: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert-level eq. 12, device-level eq. 15) balance losses, each a scalar before alpha.

    Routed experts are split into ``n_groups`` contiguous groups of equal size for eq. 15-17 (under
    expert parallelism, the ranks that hold them).
    """
    if not seq_aux:
        B, S, E = scores_BSE.shape
        scores_BSE = scores_BSE.reshape(1, B * S, E)
        topk_ids_BSK = topk_ids_BSK.reshape(1, B * S, -1)
        valid_BS = None if valid_BS is None else valid_BS.reshape(1, B * S)
    f_BE, P_BE = balance_statistics(scores_BSE, topk_ids_BSK, valid_BS)
    expert_loss = (f_BE * P_BE).sum(-1).mean()
    B, E = f_BE.shape
    if E % n_groups:
        raise ValueError(f"{n_groups} device groups do not divide {E} routed experts")
    f_BG = f_BE.view(B, n_groups, E // n_groups).mean(-1)  # eq. 16
    P_BG = P_BE.view(B, n_groups, E // n_groups).sum(-1)  # eq. 17
    device_loss = (f_BG * P_BG).sum(-1).mean()
    return expert_loss, device_loss
