"""The causal LM: layer layout, outputs, loss composition, causality, init, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek_moe.ffn import SwiGLU
from deepseek_moe.model import DeepseekForCausalLM, RMSNorm, apply_rope, rope_cos_sin
from deepseek_moe.moe import DeepseekMoE
from deepseek_moe.presets import get_config


def small(name: str = "tiny", **kw):
    base = dict(vocab_size=97, num_hidden_layers=3, first_k_dense_replace=1, aux_loss_alpha=0.01,
                device_aux_loss_alpha=0.05, n_device_groups=7)
    if name != "tiny":
        base.pop("device_aux_loss_alpha"), base.pop("n_device_groups")
    base.update(kw)
    torch.manual_seed(0)
    return DeepseekForCausalLM(get_config(name, **base))


def test_layer_layout_follows_first_k_dense_replace():
    m = small()
    assert isinstance(m.model.layers[0].mlp, SwiGLU)
    assert all(isinstance(m.model.layers[i].mlp, DeepseekMoE) for i in (1, 2))
    with torch.device("meta"):
        m16 = DeepseekForCausalLM(get_config("16b"))
    assert isinstance(m16.model.layers[0].mlp, SwiGLU)
    assert m16.model.layers[0].mlp.gate_proj.weight.shape == (10944, 2048)
    assert m16.model.layers[5].mlp.experts.w1.shape == (64, 1408, 2048)
    assert m16.model.layers[5].mlp.shared_experts.gate_proj.weight.shape == (2 * 1408, 2048)


def test_output_and_loss_composition():
    m = small()
    x = torch.randint(0, 97, (2, 16))
    out = m(x, labels=x)
    assert out.logits.shape == (2, 16, 97)
    assert out.expert_balance_loss.shape == (2,) and out.device_balance_loss.shape == (2,)
    assert out.tokens_per_expert.shape == (2, 63)
    assert (out.tokens_per_expert.sum(-1) == 2 * 16 * 7).all()
    want_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, want_lm)
    want = want_lm + 0.01 * out.expert_balance_loss.sum() + 0.05 * out.device_balance_loss.sum()
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_generation_can_leave_the_statistics_and_all_but_the_last_logits_out():
    """``routing_stats=False`` (what generation asks for) changes no logit and no routing count,
    and leaves the balance losses and the entropy empty; ``logits_to_keep`` gives the last
    positions' logits of the full forward."""
    m = small()
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = m(x)
        lean = m(x, routing_stats=False)
        last = m(x, logits_to_keep=2)
    torch.testing.assert_close(lean.logits, full.logits, rtol=0, atol=0)
    assert torch.equal(lean.tokens_per_expert, full.tokens_per_expert)
    assert full.expert_balance_loss.numel() == 2 and full.routing_entropy.numel() == 2
    for t in (lean.expert_balance_loss, lean.device_balance_loss, lean.routing_entropy):
        assert t.numel() == 0
    assert lean.aux_loss.item() == 0
    torch.testing.assert_close(last.logits, full.logits[:, -2:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        m(x, labels=x, logits_to_keep=1)


def test_ignore_index_in_labels():
    m = small()
    x = torch.randint(0, 97, (1, 12))
    labels = x.clone()
    labels[:, 6:] = -100
    out = m(x, labels=labels)
    want = F.cross_entropy(out.logits[0, :5], x[0, 1:6])
    torch.testing.assert_close(out.lm_loss, want)


@pytest.mark.parametrize("name", ["tiny", "dense-tiny", "hash-tiny", "gshard-tiny"])
def test_causal(name):
    m = small(name)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_model_fast_equals_reference_dispatch():
    m = small()
    x = torch.randint(0, 97, (2, 16))
    out_fast = m(x, labels=x)
    out_fast.loss.backward()
    g_fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    for layer in m.model.layers:
        if layer.is_moe:
            layer.mlp.dispatch = "reference"
    out_ref = m(x, labels=x)
    out_ref.loss.backward()
    torch.testing.assert_close(out_fast.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(g_fast[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_dense_model_has_empty_moe_outputs():
    m = small("dense-tiny")
    x = torch.randint(0, 97, (1, 8))
    out = m(x, labels=x)
    assert out.expert_balance_loss.numel() == 0
    assert out.aux_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_init_std_and_norms():
    m = small(vocab_size=4096)
    w = m.model.layers[1].mlp.experts.w1
    assert abs(w.std().item() - 0.006) < 3e-4
    assert abs(m.model.embed_tokens.weight.std().item() - 0.006) < 3e-4
    assert torch.equal(m.model.norm.weight, torch.ones_like(m.model.norm.weight))
    with torch.device("meta"):
        meta = DeepseekForCausalLM(get_config("tiny"))
    assert all(p.is_meta for p in meta.parameters())


def test_bad_inputs():
    m = small()
    with pytest.raises(ValueError, match="token id 97 is out of range"):
        m(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        m(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.zeros(1, 1025, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        m(torch.zeros(5, dtype=torch.long))


def test_rmsnorm_and_rope():
    norm = RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), want)
    # RoPE preserves norms and makes q.k depend on the relative position only.
    cos, sin = rope_cos_sin(torch.arange(16), 8, 10000.0, torch.float32)
    q, k = torch.randn(8), torch.randn(8)
    qs = apply_rope(q.expand(1, 1, 16, 8), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 16, 8), cos, sin)[0, 0]
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(16))
    torch.testing.assert_close(qs[5] @ ks[3], qs[12] @ ks[10], rtol=1e-5, atol=1e-5)
