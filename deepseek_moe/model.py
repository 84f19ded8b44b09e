"""The DeepSeekMoE causal language model: a decoder-only Transformer whose FFNs are the MoE layers
of DeepSeekMoE (Dai et al. 2024, eq. 9-11).

Pre-norm RMSNorm, rotary positions, multi-head attention through scaled_dot_product_attention,
SwiGLU FFNs; layer i uses an MoE FFN when ``config.is_moe_layer(i)``. Module names mirror the
released checkpoint (``model.layers.{i}.self_attn.q_proj`` ...), so the converter only has to
stack and unstack the routed experts.

Incremental decoding keeps each layer's keys and values in a ``KVCache`` (preallocated, as in
gpt-fast); batched prompts are left-padded and described by an ``attention_mask``.

Shape legend: B batch, S sequence (new tokens), T keys attended (cached + new), D hidden,
H heads, Hkv key/value heads, hd head dim, V vocab.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekMoEConfig
from .ffn import SwiGLU
from .moe import DeepseekMoE, MoEAux
from . import kernels
from .quant import FUSED_ROWS, QuantLinear, fused_linears, gemv_usable, kernel_args


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside ``[0, vocab_size)``.

    On the CPU (not under ``torch.compile``) a clear ``ValueError`` naming the id. Elsewhere the
    check must not read the ids back to the host (that would stall the GPU every forward), so it
    is an asynchronous device-side assertion: a bad id still stops the run, without a stall.
    """
    if input_ids.numel() == 0:
        return
    bad_BS = (input_ids < 0) | (input_ids >= vocab_size)
    if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if bad_BS.any():
            bad = input_ids[bad_BS][0].item()
            raise ValueError(f"token id {bad} is out of range for vocab_size {vocab_size}")
    else:
        torch._assert_async(~bad_BS.any(), f"a token id is out of range for vocab_size {vocab_size}")


NORM_KERNEL_ROWS = 8  # at most this many rows: a quantized model's norms take the package's kernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.use_kernel = False  # decoding through kernels.rms_norm_rows (quantized models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (x * rsqrt(mean(x^2) + eps): torch's rms_norm, the same values and
        # gradients as the formula), scale in the model dtype (as the released code does).
        if self.use_kernel and self._kernel_serves(x):
            return kernels.rms_norm_rows(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _kernel_serves(self, x: torch.Tensor) -> bool:
        """Decoding a quantized model (``use_kernel``, which ``quant.quantize_modules`` sets; a
        few rows, no gradient, on the CPU): the package's one-operation RMSNorm (torch's is about
        fifteen operations on the CPU, most of a decoded token's norm time), where the package's
        kernels are available."""
        return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.is_contiguous()
                and x.shape[-1] > 0 and x.numel() // x.shape[-1] <= NORM_KERNEL_ROWS
                and x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and kernels.available())


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., hd] for rotate-half RoPE at ``positions`` [...] ((S,) or (B, S)), in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [..., hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_mask_BST(valid_BT: torch.Tensor, start: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, S, T) for queries in slots ``[start, T)`` over keys in ``[0, T)``.

    A query sees the real (``valid_BT``) keys at or before its slot. A padding query also sees
    itself, so that no row of the softmax is empty (an all-masked row would give NaN); what it
    computes is never read by a real token, whose keys exclude padding.
    """
    k_slot_T = torch.arange(valid_BT.shape[1], device=valid_BT.device)
    q_slot_S = k_slot_T[start:]
    causal_ST = k_slot_T <= q_slot_S.unsqueeze(1)
    self_ST = k_slot_T == q_slot_S.unsqueeze(1)
    return ((causal_ST & valid_BT.unsqueeze(1)) | self_ST).unsqueeze(1)


def segment_mask_and_positions(segment_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of packed examples (``segment_ids_BS``: each example a run of equal ids): the
    boolean SDPA mask (B, 1, S, S), causal within each example and closed between examples, and
    the rotary positions (B, S), counted from each example's first token."""
    S = segment_ids_BS.shape[1]
    slot_S = torch.arange(S, device=segment_ids_BS.device)
    same_BSS = segment_ids_BS.unsqueeze(2) == segment_ids_BS.unsqueeze(1)
    mask = same_BSS & (slot_S.unsqueeze(0) <= slot_S.unsqueeze(1))
    starts_BS = torch.ones_like(segment_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
    first_BS = torch.where(starts_BS, slot_S, torch.zeros_like(slot_S)).cummax(1).values
    return mask.unsqueeze(1), slot_S - first_BS


class KVCache:
    """Rotated keys and values of every layer, for decoding one step at a time (inference only).

    Preallocated per layer: ``k[i]``, ``v[i]`` [B, Hkv, max_len, hd]; slots ``[0, length)`` are
    filled. ``valid_BT`` marks the filled slots that hold real tokens (False for padding) and
    ``seen_B`` counts each row's real tokens, which is the position its next real token gets.
    ``DeepseekForCausalLM.forward(..., cache=c)`` appends its tokens (``append``) and attends over
    the cache.
    """

    def __init__(
        self,
        config: DeepseekMoEConfig,
        batch_size: int,
        max_len: int,
        *,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
    ):
        if batch_size <= 0:
            raise ValueError(f"cache batch_size must be positive, got {batch_size}")
        if not 0 < max_len <= config.max_position_embeddings:
            raise ValueError(
                f"cache max_len must be in [1, max_position_embeddings={config.max_position_embeddings}]"
                f", got {max_len}"
            )
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        L = config.num_hidden_layers
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(L)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(L)]
        self.valid_BT = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.all_real = True  # no padding appended: one new token attends to every slot, no mask

    @classmethod
    def for_model(cls, model: "DeepseekForCausalLM", batch_size: int, max_len: int) -> "KVCache":
        """A cache on the model's device, in its dtype."""
        w = model.model.embed_tokens.weight
        return cls(model.config, batch_size, max_len, device=w.device, dtype=w.dtype)

    @property
    def batch_size(self) -> int:
        return self.valid_BT.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid_BT.shape[1]

    def reset(self) -> None:
        """Forget every token (the buffers are reused as they are)."""
        self.length = 0
        self.all_real = True
        self.valid_BT.zero_()
        self.seen_B.zero_()

    def append(self, S: int, valid_BS: Optional[torch.Tensor] = None) -> int:
        """Take ``S`` new tokens into slots ``[length, length + S)``: ``valid_BS`` (B, S) marks the
        real ones (None: all real), which count towards ``seen_B``. Returns the first new slot,
        where the layers then write the tokens' keys and values."""
        start = self.length
        self.valid_BT[:, start : start + S] = True if valid_BS is None else valid_BS
        self.seen_B += S if valid_BS is None else valid_BS.sum(1)
        if valid_BS is not None and self.all_real and not bool(valid_BS.all()):
            self.all_real = False
        self.length = start + S
        return start


def apply_rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHSd * cos_Sd + rotated * sin_Sd


class Attention(nn.Module):
    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        D, H, Hkv, hd = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, hd
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, H * hd, bias=bias)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=bias)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=bias)
        self.o_proj = nn.Linear(H * hd, D, bias=bias)

    def decode_args(self, norm: RMSNorm) -> Optional[tuple]:
        """What ``kernels.attention_block`` takes of this layer and ``norm`` (the norm's weight and
        eps, the query, key and value projections' stored tensors, the output projection's, their
        schemes), where the layer can take it: quantized projections the kernel serves, H = Hkv,
        the norm's kernel on; None elsewhere."""
        qkv, o = [self.q_proj, self.k_proj, self.v_proj], self.o_proj
        w = norm.weight  # (where the layer is: what gemv_usable asks of an input)
        if (self.n_kv_heads != self.n_heads or not norm.use_kernel or not isinstance(o, QuantLinear)
                or not gemv_usable(qkv, 1, w) or not gemv_usable([o], 1, w)):
            return None
        first = qkv[0]
        return (norm.weight, norm.eps, kernel_args(qkv), kernel_args([o]), first.bits, first.group_size, o.bits,
                o.group_size)

    def decode_block(self, x_BSD: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor,
                     kv: Optional[tuple[torch.Tensor, torch.Tensor]], start: int,
                     mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``x + self(norm(x), ...)`` in one operation of the package's kernels
        (``kernels.attention_block``, the same numbers) where a quantized bf16 model decodes one
        new token per row (a cache, no mask, at most ``quant.FUSED_ROWS`` rows, ``decode_args``,
        the norm's kernel serving); None elsewhere."""
        B, S, _ = x_BSD.shape
        if (S != 1 or kv is None or mask is not None or B > FUSED_ROWS or x_BSD.dtype != torch.bfloat16
                or not norm._kernel_serves(x_BSD) or not kernels.decode_attention_serves(kv[0])):
            return None
        args = self.decode_args(norm)  # (B <= FUSED_ROWS: rows the kernel takes)
        if args is None:
            return None
        return kernels.attention_block(x_BSD, *args, cos, sin, kv[0], kv[1], start, self.head_dim ** -0.5)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start: int = 0,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``kv``: this layer's cache buffers, written at slots ``[start, start + S)``; ``mask``
        (B, 1, S, T) boolean; None means plain causal over the S new tokens (then start == 0), or,
        for one new token, every filled slot (a cache without padding)."""
        B, S, _ = x_BSD.shape
        if (S == 1 and kv is not None and mask is None and self.n_kv_heads == self.n_heads
                and kernels.decode_attention_serves(kv[0])):
            # One new token of a quantized bf16 model: projections in one kernel call, then
            # rotation, the cache's slot and the attention in one operation.
            qkv = fused_linears((self.q_proj, self.k_proj, self.v_proj), x_BSD, fp32=True)
            if qkv is not None:
                y = kernels.decode_attention_rope(qkv.view(3, B, -1), cos, sin, kv[0], kv[1], start,
                                                  self.head_dim ** -0.5)
                return self.o_proj(y)
        qkv = fused_linears((self.q_proj, self.k_proj, self.v_proj), x_BSD)
        if qkv is not None:  # one tensor [3, B, S, H*hd] (decoding a quantized model): rotate q and k at once
            qkv = qkv.view(3, B, S, self.n_heads, self.head_dim).transpose(2, 3)
            q, k = apply_rope(qkv[:2], cos, sin)
            v = qkv[2]
        else:
            q = self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k_buf, v_buf = kv  # [B, Hkv, max_len, hd]
            k_buf[:, :, start : start + S] = k
            v_buf[:, :, start : start + S] = v
            k, v = k_buf[:, :, : start + S], v_buf[:, :, : start + S]  # (B, Hkv, T, hd)
        if S == 1 and mask is None and kernels.decode_attention_serves(q):
            y = kernels.decode_attention(q, k, v, self.head_dim ** -0.5)  # (B, H, 1, hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and S > 1,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, H, S, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekMoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (
            DeepseekMoE(config, layer_idx)
            if self.is_moe
            else SwiGLU(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_ids: torch.Tensor,
        kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start: int = 0,
        mask: Optional[torch.Tensor] = None,
        valid_BS: Optional[torch.Tensor] = None,
        routing_stats: bool = True,
    ) -> tuple[torch.Tensor, Optional[MoEAux]]:
        fused = self.self_attn.decode_block(x, self.input_layernorm, cos, sin, kv, start, mask)
        x = fused if fused is not None else x + self.self_attn(self.input_layernorm(x), cos, sin, kv, start, mask)
        if self.is_moe and not routing_stats:
            block = self.mlp.decode_block(x, self.post_attention_layernorm)
            if block is not None:
                return block
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, aux = self.mlp(h, input_ids, valid_BS, routing_stats)
            return x + y, aux
        return x + self.mlp(h), None


class DeepseekModel(nn.Module):
    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    """Model output. Per-layer tensors are stacked over the MoE layers, in layer order."""

    logits: torch.Tensor  # (B, S, V)
    loss: Optional[torch.Tensor] = None  # lm_loss + alpha_1 * sum(expert) + alpha_2 * sum(device)
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None  # the weighted balance-loss term alone
    expert_balance_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [L_moe]
    device_balance_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [L_moe]
    tokens_per_expert: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [L_moe, E]
    dropped_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [L_moe]
    routing_entropy: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [L_moe], nats


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: Optional[float] = None) -> None:
        """Normal(0, std) for every matrix (std = ``initializer_range``, 0.006); norms to 1."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        cache: Optional[KVCache] = None,
        positions: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        routing_stats: bool = True,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """``input_ids`` (B, S) -> logits (B, S, V); with ``labels`` (B, S), the shifted LM loss
        (next-token, ``-100`` ignored) plus the weighted balance losses.

        ``attention_mask`` (B, S): 1 for real tokens, 0 for padding (batched prompts are padded on
        the left). Padding keys are masked out, and each row's positions count its real tokens
        only, so its first real token is at position 0. ``cache``: the tokens continue the cached
        sequence; their keys and values are appended to it and the cached padding stays masked.
        ``positions`` ((S,) or (B, S)) overrides the rotary positions. ``segment_ids`` (B, S):
        several examples packed into one row, each a run of equal ids (negative: padding); a token
        attends only to the earlier tokens of its own example and its positions start at 0 with
        the example (no cache). Padding (by either mask) takes no part in the balance losses.
        With none of these this is the plain causal forward used in pre-training.
        ``routing_stats=False`` (generation) leaves the balance losses and the routing entropy
        out: their fields are empty and ``aux_loss`` is 0; ``tokens_per_expert`` is still given.
        ``logits_to_keep=N`` > 0: logits of the last N positions only (a prompt's prefill needs
        the last one: the output head over every position is a large share of a long prompt).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        cfg = self.config
        device = input_ids.device
        check_token_ids(input_ids, cfg.vocab_size)
        start = 0 if cache is None else cache.length
        if cache is not None and (cache.batch_size != B or start + S > cache.max_len):
            raise ValueError(
                f"cache of batch {cache.batch_size} and {cache.max_len} slots ({start} used) cannot "
                f"take input of batch {B} and length {S}"
            )
        if S > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {S} exceeds max_position_embeddings {cfg.max_position_embeddings}"
            )
        valid_BS = self._valid_tokens(input_ids, attention_mask)
        mask = None
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids cannot be combined with a cache or an attention_mask")
            if segment_ids.shape != (B, S):
                raise ValueError(f"segment_ids must have the shape of input_ids {(B, S)}, "
                                 f"got {tuple(segment_ids.shape)}")
            mask, seg_positions = segment_mask_and_positions(segment_ids.to(device))
            positions = seg_positions if positions is None else positions
            valid_BS = segment_ids.to(device) >= 0  # negative ids: padding
        positions = self._positions(input_ids, cache, positions, valid_BS)
        if cache is not None:
            cache.append(S, valid_BS)
            # One new token after real ones only attends to every filled slot: no mask (it
            # would be all true; building it and masking cost more than the attention).
            if (start > 0 or valid_BS is not None) and not (S == 1 and cache.all_real):
                mask = attention_mask_BST(cache.valid_BT[:, : start + S], start)
        elif valid_BS is not None and segment_ids is None:
            mask = attention_mask_BST(valid_BS, 0)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        auxes: list[MoEAux] = []
        for i, layer in enumerate(self.model.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, aux = layer(x, cos, sin, input_ids, kv, start, mask, valid_BS, routing_stats)
            if aux is not None:
                auxes.append(aux)
        if logits_to_keep > 0:
            if labels is not None:
                raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.model.norm(x))
        out = CausalLMOutput(logits=logits)
        if auxes:
            out.tokens_per_expert = torch.stack([a.tokens_per_expert for a in auxes])
            out.dropped_tokens = torch.stack([a.dropped_tokens for a in auxes])
            out.expert_balance_loss = self._stacked([a.expert_balance_loss for a in auxes], routing_stats, device)
            out.device_balance_loss = self._stacked([a.device_balance_loss for a in auxes], routing_stats, device)
            out.routing_entropy = self._stacked([a.routing_entropy for a in auxes], routing_stats, device)
        else:
            out.expert_balance_loss = torch.zeros(0, device=device)
            out.device_balance_loss = torch.zeros(0, device=device)
            out.tokens_per_expert = torch.zeros(0, cfg.n_routed_experts, dtype=torch.long, device=device)
            out.dropped_tokens = torch.zeros(0, dtype=torch.long, device=device)
            out.routing_entropy = torch.zeros(0, device=device)
        out.aux_loss = (
            cfg.aux_loss_alpha * out.expert_balance_loss.sum()
            + cfg.device_aux_loss_alpha * out.device_balance_loss.sum()
        )
        if labels is not None:
            out.lm_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
            out.loss = out.lm_loss + out.aux_loss
        return out

    def decode_plan(self, cache: KVCache) -> Optional[list]:
        """Generation's fast path for one row of a quantized bf16 model (``decode_step``): per
        layer, what its attention block and its MoE block give the package's one-operation
        kernels (``Attention.decode_args``, ``DeepseekMoE.decode_args``), or None where the layer
        takes its modules (a dense FFN, a layer the kernels do not serve). Gathered once for a
        generation, while the modules stay as they are; None where no layer is served or ``cache``
        is not one bf16 row without padding on the CPU."""
        if (cache.batch_size != 1 or not cache.all_real or torch.is_grad_enabled()
                or self.model.embed_tokens.weight.dtype != torch.bfloat16
                or not kernels.decode_attention_serves(cache.k[0]) or not kernels.cpu_routing_kernels(cache.k[0])):
            return None
        plan: list = []
        for layer in self.model.layers:
            attn = layer.self_attn.decode_args(layer.input_layernorm)
            moe = layer.mlp.decode_args(layer.post_attention_layernorm) if layer.is_moe else None
            norms_bf16 = all(n.weight.dtype == torch.bfloat16
                             for n in (layer.input_layernorm, layer.post_attention_layernorm))
            plan.append((attn, layer.self_attn.head_dim ** -0.5, moe) if attn and moe and norms_bf16 else None)
        return plan if any(plan) else None

    def decode_step(self, input_ids: torch.Tensor, cache: KVCache, plan: list) -> torch.Tensor:
        """Logits [1, 1, V] of one new token continuing ``cache`` (``decode_plan``'s), the numbers
        of ``self(input_ids, cache=cache, routing_stats=False).logits``: the served layers in two
        operations each (``kernels.attention_block``, ``kernels.moe_block``), without the
        per-layer checks, argument gathering and statistics of the modules' path (about a tenth of
        a token's time on the 16B); anything else through ``forward``."""
        if input_ids.shape != (1, 1) or not cache.all_real or cache.length + 1 > cache.max_len:
            return self(input_ids, cache=cache, routing_stats=False).logits
        check_token_ids(input_ids, self.config.vocab_size)
        start = cache.length
        positions = self._positions(input_ids, cache, None, None)
        cache.append(1, None)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # per-row positions, as forward broadcasts them
        for i, (layer, entry) in enumerate(zip(self.model.layers, plan)):
            if entry is None or not x.is_contiguous():
                x, _ = layer(x, cos, sin, input_ids, (cache.k[i], cache.v[i]), start, None, None, False)
            else:
                attn, scale, moe = entry
                x = kernels.attention_block(x, *attn, cos, sin, cache.k[i], cache.v[i], start, scale)
                x, _ = kernels.moe_block(x, *moe)
        return self.lm_head(self.model.norm(x))

    @staticmethod
    def _stacked(values: list[Optional[torch.Tensor]], present: bool, device: torch.device) -> torch.Tensor:
        """Per-layer scalars stacked [L_moe]; empty where the forward left them out."""
        if not present:
            return torch.zeros(0, device=device)
        return torch.stack(values)  # type: ignore[arg-type]

    @staticmethod
    def _valid_tokens(
        input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """``attention_mask`` as a boolean (B, S) of the real tokens; None: every token is real."""
        B, S = input_ids.shape
        if attention_mask is None:
            return None
        if attention_mask.shape != (B, S):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {(B, S)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask.to(device=input_ids.device, dtype=torch.bool)

    def _positions(
        self,
        input_ids: torch.Tensor,
        cache: Optional[KVCache],
        positions: Optional[torch.Tensor],
        valid_BS: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Rotary positions ((S,) or (B, S)) of ``forward``'s new tokens (``valid_BS``: the real
        ones, None: all), continuing from the real tokens already in ``cache``."""
        B, S = input_ids.shape
        device, max_pos = input_ids.device, self.config.max_position_embeddings
        if positions is None:
            if cache is None and valid_BS is None:
                positions = torch.arange(S, device=device)
            else:  # each row counts its real tokens, continuing from those in the cache
                real_BS = torch.ones_like(input_ids, dtype=torch.bool) if valid_BS is None else valid_BS
                positions = real_BS.long().cumsum(1) - 1
                if cache is not None:
                    positions = positions + cache.seen_B.unsqueeze(1)
                positions = positions.clamp_min(0)
        elif positions.shape not in ((S,), (B, S)):
            raise ValueError(f"positions must be (S,) or (B, S), got shape {tuple(positions.shape)}")
        elif positions.numel() and int(positions.max()) >= max_pos:
            raise ValueError(f"positions exceed max_position_embeddings {max_pos}")
        return positions.to(device)

    def num_parameters(self) -> int:
        """Parameters, counting a quantized layer's weight (stored as integers and scales, in
        buffers) as the ``in x out`` parameters it stands for."""
        from .quant import quantized_layers

        quantized = sum(m.in_features * m.out_features for m in quantized_layers(self))
        return sum(p.numel() for p in self.parameters()) + quantized

    @classmethod
    def from_pretrained(cls, path: "str | os.PathLike[str]", *, dtype: Optional[torch.dtype] = None,
                        device: "str | torch.device" = "cpu", max_memory: "int | str | None" = None,
                        experts: str = "auto") -> "DeepseekForCausalLM":
        """The model of a checkpoint, as transformers' ``from_pretrained``: ``path`` is a checkpoint
        in the released layout (a hub snapshot of deepseek-moe-16b, an export, a quantized one),
        one of this project's training checkpoints, its ``checkpoints/`` folder or a run directory
        (its newest whole checkpoint). Returned in eval mode. ``dtype``, ``max_memory`` and
        ``experts`` as in ``checkpoint.load_pretrained``."""
        from .checkpoint import load_pretrained
        from .runs import resolve_checkpoint

        ckpt, _ = resolve_checkpoint(path)
        return load_pretrained(ckpt, device=device, dtype=dtype, max_memory=max_memory, experts=experts).eval()

    def save_pretrained(self, path: "str | os.PathLike[str]", *, dtype: Optional[torch.dtype] = None,
                        max_shard_size: "int | str" = "5GB",
                        tokenizer: "str | os.PathLike[str] | None" = None) -> None:
        """Write this model in the released layout (``config.json`` and safetensors shards with
        their index), atomically; ``tokenizer`` (a tokenizer.json) is copied in beside it.
        ``from_pretrained`` reads it back bit for bit."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype,
                        extra_files={"tokenizer.json": tokenizer} if tokenizer is not None else None)
