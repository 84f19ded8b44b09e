"""The MoE layer: fast dispatch vs the reference loop, degenerate cases, losses, routers, capacity."""

from __future__ import annotations

import itertools

import pytest
import torch

from deepseek_moe.config import DeepseekMoEConfig
from deepseek_moe.ffn import SwiGLU
from deepseek_moe.moe import (
    DeepseekMoE,
    GroupedExperts,
    HashRouter,
    balance_losses,
    combine,
    dispatch,
    dispatch_reference,
    permute,
)


def moe_config(**kw) -> DeepseekMoEConfig:
    base = dict(
        vocab_size=64, hidden_size=100, intermediate_size=64, moe_intermediate_size=36,
        num_hidden_layers=1, num_attention_heads=2, n_shared_experts=1, n_routed_experts=7,
        num_experts_per_tok=2, first_k_dense_replace=0, bos_token_id=None, eos_token_id=None,
    )
    base.update(kw)
    return DeepseekMoEConfig(**base)


def init_(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


BACKENDS = ["reference", "loop", "loop-unfused", "padded", "padded-unfused", "threaded", "threaded-unfused",
            "grouped_mm"]
# The backends whose autograd function also runs the gather and the combine on the CPU.
FUSED = ("loop", "padded", "threaded")


@pytest.fixture(autouse=True)
def _threaded_needs_the_kernels(request):
    """The ``threaded`` backend runs the package's compiled kernel: skipped where it cannot load."""
    from deepseek_moe import kernels

    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend")
    if backend and backend.startswith("threaded") and kernels.library_reason() is not None:
        pytest.skip(f"no kernel library here: {kernels.library_reason()}")


def pipeline(layer: DeepseekMoE, x: torch.Tensor, backend: str):
    """The layer's routed output through the three stages with the chosen experts backend.
    ``loop-unfused`` / ``padded-unfused``: a CPU backend behind the plain stage interface (as
    expert parallelism calls it), instead of its fused gather/experts/combine."""
    x_TD = x.view(-1, x.shape[-1])
    r = layer.gate(x_TD)
    cap = layer.capacity(x_TD.shape[0])
    layer.experts.backend = backend.removesuffix("-unfused")
    if backend.endswith("-unfused"):
        perm = permute(r.topk_ids_TK, r.topk_weights_TK, layer.n_routed_experts, cap)
        y = combine(layer.experts(x_TD.index_select(0, perm.token_M), perm.counts_E, perm.gate_M), perm)
    else:
        assert layer.experts.fuses_dispatch(x_TD) == (backend in FUSED)
        y, _ = dispatch(x_TD, r.topk_ids_TK, r.topk_weights_TK, layer.experts, cap)
    layer.experts.backend = "auto"
    y = y.view_as(x)
    return y + (layer.shared_experts(x) if layer.shared_experts is not None else 0)


def run_layer(layer: DeepseekMoE, x: torch.Tensor, dispatch_: str, backend: str = "auto"):
    layer.dispatch = dispatch_
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    if dispatch_ == "fast" and backend != "auto":
        y = pipeline(layer, x, backend)
    else:
        y, _ = layer(x)
    # A non-uniform upstream gradient, so that every output element matters.
    w = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("k,shared,backend,capacity", [
    (k, shared, backend, cap) for k, shared, backend, cap
    in itertools.product([1, 2, 3], [0, 2], BACKENDS, [None, 0.6])])
def test_every_backend_matches_reference(k, shared, backend, capacity):
    """Outputs and gradients (input, router, experts, shared) equal the readable per-expert loop,
    on odd sizes, with and without a capacity."""
    torch.manual_seed(k)
    layer = DeepseekMoE(moe_config(num_experts_per_tok=k, n_shared_experts=shared, capacity_factor=capacity))
    init_(layer, seed=k + 10 * shared)
    x = torch.randn(3, 11, 100)
    if capacity is not None:
        _, aux = layer(x)
        assert aux.dropped_tokens.item() > 0  # the capacity bites
    y_ref, gx_ref, g_ref = run_layer(layer, x, "reference")
    y_fast, gx_fast, g_fast = run_layer(layer, x, "fast", backend)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-5, atol=1e-5)
    assert g_ref.keys() == g_fast.keys()
    for name in g_ref:
        assert g_ref[name].abs().sum() > 0, name  # every parameter gets a gradient
        # 1e-5 relative to the gradient's scale: the router's gradient sums hundreds of products
        # of size ~30, whose fp32 rounding differs with the summation order.
        scale = max(1.0, g_ref[name].abs().max().item())
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("min_block", [2, 4])
@pytest.mark.parametrize("backend", ["loop", "loop-unfused", "padded", "padded-unfused", "threaded",
                                     "threaded-unfused"])
def test_loop_with_row_blocks_matches_reference(monkeypatch, min_block, backend):
    """The loop, padded and threaded backends round GEMM row counts up to blocks in bf16 (stable oneDNN
    shapes): the same rounding forced on fp32 leaves outputs and every gradient equal to the
    reference."""
    from deepseek_moe.moe import experts as experts_mod

    monkeypatch.setattr(experts_mod, "ROUNDED_DTYPES", (torch.float32,))
    monkeypatch.setattr(experts_mod, "MIN_ROW_BLOCK", min_block)
    monkeypatch.setattr(experts_mod, "SUM_BLOCK", 4)  # weight gradients: 4-row blocks + remainder
    assert experts_mod._rounded(37, torch.float32, 100) == (40 if min_block == 4 else 38)
    torch.manual_seed(3)
    layer = DeepseekMoE(moe_config(num_experts_per_tok=3, n_shared_experts=1, capacity_factor=0.7))
    init_(layer, seed=5)
    x = torch.randn(3, 13, 100)
    y_ref, gx_ref, g_ref = run_layer(layer, x, "reference")
    y_fast, gx_fast, g_fast = run_layer(layer, x, "fast", backend)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        scale = max(1.0, g_ref[name].abs().max().item())
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backend", ["loop", "loop-unfused", "padded", "padded-unfused", "threaded",
                                     "threaded-unfused", "grouped_mm"])
def test_bf16_backends_match_reference(backend, autocast):
    """In bf16 (row blocks of 32 in the loop backend) every backend stays within bf16 rounding of
    the fp32 reference, outputs and gradients: a bf16 layer, and an fp32 layer under bf16 autocast
    (where ``threaded`` casts w1 and w3 into one fused tensor)."""
    torch.manual_seed(4)
    # grouped_mm needs rows of a multiple of 16 bytes: widths of multiples of 8 in bf16
    layer = DeepseekMoE(moe_config(num_experts_per_tok=3, n_shared_experts=1, hidden_size=96,
                                   moe_intermediate_size=40))
    init_(layer, seed=6)
    x = torch.randn(3, 37, 96)
    y_ref, gx_ref, g_ref = run_layer(layer, x, "reference")
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, gx16, g16 = run_layer(layer, x, "fast", backend)
        assert all(g.dtype == torch.float32 for g in g16.values())
        assert (y16 - y_ref).abs().max() > 1e-3  # bf16 arithmetic, not fp32
    else:
        layer16 = DeepseekMoE(layer.config).to(torch.bfloat16)
        layer16.load_state_dict(layer.state_dict())
        y16, gx16, g16 = run_layer(layer16, x.to(torch.bfloat16), "fast", backend)

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(y16, y_ref) < 2e-2 and rel(gx16, gx_ref) < 2e-2
    for name in g_ref:
        assert rel(g16[name], g_ref[name]) < 3e-2, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_dispatch_with_idle_experts(backend):
    """Experts that receive no token get an exact zero gradient, and nothing breaks."""
    experts = GroupedExperts(5, 8, 12)  # grouped_mm needs rows of a multiple of 16 bytes
    init_(experts)
    x = torch.randn(4, 8, requires_grad=True)
    ids = torch.tensor([[0], [0], [3], [3]])
    w = torch.rand(4, 1)
    experts.backend = backend.removesuffix("-unfused")
    if backend.endswith("-unfused"):
        perm = permute(ids, w, 5)
        y = combine(experts(x.index_select(0, perm.token_M), perm.counts_E, perm.gate_M), perm)
    else:
        y, _ = dispatch(x, ids, w, experts)
    y.sum().backward()
    assert experts.w1.grad[[1, 2, 4]].abs().sum() == 0
    assert experts.w1.grad[[0, 3]].abs().sum() > 0
    y_ref, _ = dispatch_reference(x, ids, w, experts)
    torch.testing.assert_close(y, y_ref)


def test_permute_states_the_order_and_the_capacity_rule():
    """Rows sorted by expert, k-major within an expert (first choices first); over capacity, the
    tail of each expert's rows gets a zero gate."""
    ids = torch.tensor([[2, 0], [0, 1], [0, 2]])  # T=3, K=2
    w = torch.tensor([[0.5, 0.4], [0.6, 0.3], [0.7, 0.2]])
    perm = permute(ids, w, 3)
    # assignments a = k*T + t: (t0,k0)=0->e2, (t1,k0)=1->e0, (t2,k0)=2->e0, (t0,k1)=3->e0, ...
    assert perm.order_M.tolist() == [1, 2, 3, 4, 0, 5]
    assert perm.token_M.tolist() == [1, 2, 0, 1, 0, 2]
    assert perm.counts_E.tolist() == [3, 1, 2]
    capped = permute(ids, w, 3, capacity=2)
    # expert 0 keeps its two first choices (tokens 1, 2) and drops token 0's second choice
    torch.testing.assert_close(capped.gate_M, torch.tensor([0.6, 0.7, 0.0, 0.3, 0.5, 0.2]))
    assert capped.dropped.item() == 1


def test_combine_is_deterministic_and_sums_in_fp32():
    torch.manual_seed(0)
    T, K, D = 7, 3, 5
    ids = torch.stack([torch.randperm(4)[:K] for _ in range(T)])
    perm = permute(ids, torch.rand(T, K), 4)
    y = torch.randn(T * K, D, dtype=torch.bfloat16)
    out = combine(y, perm)
    assert out.dtype == torch.float32
    want = torch.zeros(T, D)
    for m in range(T * K):
        want[perm.token_M[m]] += y[m].float()
    torch.testing.assert_close(out, want)
    assert torch.equal(combine(y, perm), out)


def test_one_expert_top1_equals_dense_ffn():
    cfg = moe_config(n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=0)
    for dispatch in ("fast", "reference"):
        layer = DeepseekMoE(cfg.replace(dispatch=dispatch))
        init_(layer)
        dense = SwiGLU(100, 36)
        with torch.no_grad():
            dense.gate_proj.weight.copy_(layer.experts.w1[0])
            dense.up_proj.weight.copy_(layer.experts.w3[0])
            dense.down_proj.weight.copy_(layer.experts.w2[0])
        x = torch.randn(2, 9, 100)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_moe, _ = layer(x1)
        y_dense = dense(x2)
        torch.testing.assert_close(y_moe, y_dense, rtol=1e-5, atol=1e-5)
        w = torch.linspace(-1, 1, y_moe.numel()).view_as(y_moe)
        (y_moe * w).sum().backward()
        (y_dense * w).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.experts.w1.grad[0], dense.gate_proj.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.experts.w2.grad[0], dense.down_proj.weight.grad, rtol=1e-5, atol=1e-5)


def test_shared_experts_are_always_on_and_ungated():
    """With the routed experts zeroed, the layer is exactly the shared SwiGLU (weight 1)."""
    layer = DeepseekMoE(moe_config(n_shared_experts=2))
    init_(layer)
    with torch.no_grad():
        layer.experts.w2.zero_()
    x = torch.randn(2, 5, 100)
    y, _ = layer(x)
    torch.testing.assert_close(y, layer.shared_experts(x))
    assert layer.shared_experts.gate_proj.weight.shape == (2 * 36, 100)


def test_topk_weights_not_renormalised_unless_asked():
    layer = DeepseekMoE(moe_config(num_experts_per_tok=3))
    init_(layer)
    x = torch.randn(10, 100)
    r = layer.gate(x)
    probs = torch.softmax(x @ layer.gate.weight.t(), -1)
    torch.testing.assert_close(r.topk_weights_TK, probs.topk(3, -1).values)
    assert (r.topk_weights_TK.sum(-1) < 1).all()
    layer.gate.norm_topk_prob = True
    torch.testing.assert_close(layer.gate(x).topk_weights_TK.sum(-1), torch.ones(10))



@pytest.mark.parametrize("norm", [False, True])
def test_routed_scaling_factor_scales_the_routed_path_only(norm):
    """routed_scaling_factor s multiplies each token's top-k gates (after any renormalisation):
    the same experts are chosen, the routed output is s times as large, the shared experts' output
    and the balance losses (which use the scores, not the gates) are unchanged; gradients too."""
    base = DeepseekMoE(moe_config(num_experts_per_tok=3, norm_topk_prob=norm))
    init_(base)
    scaled = DeepseekMoE(moe_config(num_experts_per_tok=3, norm_topk_prob=norm, routed_scaling_factor=2.5))
    scaled.load_state_dict(base.state_dict())
    x = torch.randn(2, 5, 100, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    r1, r2 = base.gate(x.reshape(10, 100)), scaled.gate(x.reshape(10, 100))
    assert torch.equal(r1.topk_ids_TK, r2.topk_ids_TK)
    torch.testing.assert_close(r2.topk_weights_TK, 2.5 * r1.topk_weights_TK)
    y1, a1 = base(x)
    y2, a2 = scaled(x2)
    shared = base.shared_experts(x)
    torch.testing.assert_close(y2 - shared, 2.5 * (y1 - shared), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a2.expert_balance_loss, a1.expert_balance_loss)
    (y1 - shared).sum().backward()
    (y2 - shared.detach()).sum().backward()
    torch.testing.assert_close(scaled.experts.w1.grad, 2.5 * base.experts.w1.grad, rtol=1e-5, atol=1e-5)
    assert "routed_scaling_factor=2.5" in repr(scaled.gate) and "routed_scaling" not in repr(base.gate)


# --- balance losses ---------------------------------------------------------------------------

def hand_losses(scores, ids, groups, seq_aux):
    """Eq. 12-17 written out with Python loops."""
    B, S, E = scores.shape
    K = ids.shape[-1]
    seqs = [(scores[b], ids[b]) for b in range(B)] if seq_aux else [
        (scores.reshape(B * S, E), ids.reshape(B * S, K))]
    exp_total, dev_total = 0.0, 0.0
    for s, i in seqs:
        T = s.shape[0]
        f = [E / (K * T) * sum(int(e in i[t].tolist()) for t in range(T)) for e in range(E)]
        P = [sum(s[t, e].item() for t in range(T)) / T for e in range(E)]
        exp_total += sum(f[e] * P[e] for e in range(E))
        size = E // groups
        dev = 0.0
        for g in range(groups):
            members = range(g * size, (g + 1) * size)
            fg = sum(f[j] for j in members) / size
            Pg = sum(P[j] for j in members)
            dev += fg * Pg
        dev_total += dev
    return exp_total / len(seqs), dev_total / len(seqs)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_losses_match_hand_computation(seq_aux):
    scores = torch.tensor([
        [[0.50, 0.25, 0.15, 0.10], [0.10, 0.60, 0.20, 0.10], [0.25, 0.20, 0.45, 0.10]],
        [[0.70, 0.05, 0.15, 0.10], [0.40, 0.30, 0.20, 0.10], [0.05, 0.10, 0.05, 0.80]],
    ])
    ids = scores.topk(2, -1).indices
    exp_loss, dev_loss = balance_losses(scores, ids, n_groups=2, seq_aux=seq_aux)
    want_exp, want_dev = hand_losses(scores, ids, 2, seq_aux)
    assert exp_loss.item() == pytest.approx(want_exp, abs=1e-6)
    assert dev_loss.item() == pytest.approx(want_dev, abs=1e-6)
    if not seq_aux:
        # Worked on paper: counts (4, 4, 3, 1) so f = counts / 3; P = (2.0, 1.5, 1.2, 1.3) / 6;
        # eq. 12: 18.9 / 18. Groups {0,1},{2,3}: f' = (4/3, 2/3), P' = (3.5, 2.5) / 6; eq. 15: 19/18.
        assert exp_loss.item() == pytest.approx(18.9 / 18, abs=1e-6)
        assert dev_loss.item() == pytest.approx(19 / 18, abs=1e-6)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_losses_are_one_under_uniform_routing(seq_aux):
    E, K, B, S = 8, 2, 2, 8
    scores = torch.full((B, S, E), 1.0 / E)
    # Each expert picked exactly K*S/E times per sequence.
    ids = torch.stack([torch.arange(S * K).view(S, K) % E for _ in range(B)])
    for groups in (1, 2, 4, 8):
        exp_loss, dev_loss = balance_losses(scores, ids, n_groups=groups, seq_aux=seq_aux)
        assert exp_loss.item() == pytest.approx(1.0)
        assert dev_loss.item() == pytest.approx(1.0)


def test_balance_loss_gradient_reaches_router_only_through_P():
    layer = DeepseekMoE(moe_config())
    init_(layer)
    x = torch.randn(2, 6, 100)
    _, aux = layer(x)
    aux.expert_balance_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.w1.grad is None


def test_layer_reports_counts_and_losses():
    layer = DeepseekMoE(moe_config(n_device_groups=7, num_experts_per_tok=3))
    init_(layer)
    _, aux = layer(torch.randn(2, 5, 100))
    assert aux.tokens_per_expert.shape == (7,)
    assert aux.tokens_per_expert.sum().item() == 2 * 5 * 3
    assert aux.dropped_tokens.item() == 0
    assert aux.expert_balance_loss.item() > 0 and aux.device_balance_loss.item() > 0


def test_routing_entropy_is_the_mean_entropy_of_the_scores():
    layer = DeepseekMoE(moe_config(num_experts_per_tok=3))
    init_(layer)
    x = torch.randn(2, 5, 100)
    _, aux = layer(x)
    s = layer.gate(x.reshape(10, 100)).scores_TE.double()
    want = -(s * s.log()).sum(-1).mean()
    assert abs(aux.routing_entropy.item() - want.item()) < 1e-5
    # scores that underflow to exactly 0 (a very confident router) count 0, not NaN
    with torch.no_grad():
        layer.gate.weight.mul_(1e4)
    _, aux = layer(x)
    assert (layer.gate(x.reshape(10, 100)).scores_TE == 0).any()
    assert 0 <= aux.routing_entropy.item() < 1e-3


# --- hash routing -----------------------------------------------------------------------------

def test_hash_routing_is_a_fixed_function_of_the_token_id():
    cfg = moe_config(router="hash", n_routed_experts=16, num_experts_per_tok=1, n_shared_experts=0)
    layer = DeepseekMoE(cfg, layer_idx=3)
    assert not list(layer.gate.parameters())
    ids = torch.randint(0, 64, (2, 30))
    r1 = layer.gate(torch.randn(60, 100), ids.view(-1))
    r2 = layer.gate(torch.randn(60, 100), ids.view(-1))  # other hidden states, same ids
    assert torch.equal(r1.topk_ids_TK, r2.topk_ids_TK)
    assert torch.equal(r1.topk_weights_TK, torch.ones(60, 1))
    # The same token id always lands on the same expert, wherever it appears.
    table = HashRouter(16, layer_idx=3).expert_of(torch.arange(64))
    assert torch.equal(r1.topk_ids_TK.view(-1), table[ids.view(-1)])
    # Spread over the experts, and different layers hash differently.
    assert len(set(table.tolist())) >= 12
    assert not torch.equal(table, HashRouter(16, layer_idx=4).expert_of(torch.arange(64)))
    _, aux = layer(torch.randn(2, 30, 100), ids)
    assert aux.expert_balance_loss.item() == 0.0
    with pytest.raises(ValueError, match="token ids"):
        layer(torch.randn(2, 30, 100))


# --- capacity ---------------------------------------------------------------------------------

def test_capacity_drops_exactly_the_overflow():
    T, D, E, K = 12, 8, 4, 2
    experts = GroupedExperts(E, D, 6)
    init_(experts)
    x = torch.randn(T, D)
    # Expert 0 gets the first choice of tokens 0-5 and the second choice of tokens 6-11.
    ids = torch.tensor([[0, 1 + t % 3] if t < 6 else [1 + t % 3, 0] for t in range(T)])
    w = torch.rand(T, K)
    counts = torch.bincount(ids.view(-1), minlength=E)
    for capacity in (1, 3, 5, 100):
        want = int((counts - capacity).clamp(min=0).sum())
        y_ref, d_ref = dispatch_reference(x, ids, w, experts, capacity)
        y_fast, d_fast = dispatch(x, ids, w, experts, capacity)
        assert d_ref.item() == want and d_fast.item() == want
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    # First choices have priority: at capacity 6 expert 0 keeps its six first choices.
    cap = 6
    y_cap, _ = dispatch(x, ids, w, experts, cap)
    keep = torch.ones(T, K, dtype=torch.bool)
    second_to_0 = (ids[:, 1] == 0).nonzero().view(-1)
    keep[second_to_0, 1] = False  # all of expert 0's second choices overflow
    y_kept, _ = dispatch(x, ids, w * keep, experts, None)
    torch.testing.assert_close(y_cap, y_kept, rtol=1e-5, atol=1e-6)


def test_layer_capacity_factor_reports_drops():
    cfg = moe_config(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0,
                     capacity_factor=0.5, norm_topk_prob=True)
    layer = DeepseekMoE(cfg)
    init_(layer)
    x = torch.randn(2, 16, 100)
    assert layer.capacity(32) == 8  # ceil(0.5 * 32 * 2 / 4)
    _, aux = layer(x)
    want = int((aux.tokens_per_expert - 8).clamp(min=0).sum())
    assert aux.dropped_tokens.item() == want >= 32  # at most 4*8 of the 64 assignments fit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_buckets_bound_the_padding(dtype):
    """The padded backend's layout gives every expert with rows its own slots, at least its count,
    without overlap, and pads at most BUCKET_TOLERANCE (plus the bf16 row rounding, 1/16)."""
    from deepseek_moe.moe import experts as experts_mod

    g = torch.Generator().manual_seed(0)
    counts = (torch.rand(63, generator=g) ** 3 * 900).long().tolist() + [0, 0]
    buckets, first_E, P = experts_mod._buckets(counts, dtype)
    slots = torch.zeros(P, dtype=torch.long)
    for p0, C, experts in buckets:
        assert all(counts[e] <= C for e in experts)
        for i, e in enumerate(experts):
            assert first_E[e] == p0 + i * C
            slots[first_E[e]:first_E[e] + C] += 1
    assert slots.eq(1).all()  # the buckets tile the layout
    assert sorted(e for _, _, ex in buckets for e in ex) == [e for e, n in enumerate(counts) if n]
    rounding = 1 + (1 / 16 if dtype == torch.bfloat16 else 0)
    assert P <= sum(counts) / (1 - experts_mod.BUCKET_TOLERANCE) * rounding + 8 * len(counts)


def test_router_keeps_bf16_centroids_in_fp32_only_while_they_stay_the_same():
    """Without gradients a bf16 router converts its centroids once; an in-place write or a new
    tensor is seen at the next call, and training converts (and differentiates) every call."""
    from deepseek_moe.moe.router import TopKRouter

    torch.manual_seed(0)
    r = TopKRouter(32, 8, 2, norm_topk_prob=False)
    r.weight.data = torch.randn(8, 32).to(torch.bfloat16)
    x = torch.randn(5, 32)

    def expected():
        return torch.nn.functional.linear(x, r.weight.detach().float()).softmax(-1)

    with torch.no_grad():
        assert torch.equal(r(x).scores_TE, expected())
        kept = r._fp32[2]
        assert torch.equal(r(x).scores_TE, expected()) and r._fp32[2] is kept  # not converted again
        r.weight.mul_(-1)  # in place
        assert torch.equal(r(x).scores_TE, expected()) and r._fp32[2] is not kept
        r.weight.data = torch.randn(8, 32).to(torch.bfloat16)  # another tensor
        assert torch.equal(r(x).scores_TE, expected())
    with torch.inference_mode():
        assert torch.equal(r(x).scores_TE, expected())
    r.weight.requires_grad_(True)
    r(x).topk_weights_TK.sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", [True, False])
def test_router_computes_in_fp32_under_bf16_autocast(monkeypatch, kernel):
    """Logits, softmax, top-k and gates in fp32 whatever autocast says (eq. 10-11 as written, not
    at bf16's rounding), with the package's top-k kernel and with torch.topk."""
    from deepseek_moe import kernels
    from deepseek_moe.moe.router import TopKRouter

    if kernel and kernels.library_reason() is not None:
        pytest.skip(f"no kernel library here: {kernels.library_reason()}")
    monkeypatch.setattr(kernels, "cpu_routing_kernels", lambda x: kernel)
    torch.manual_seed(0)
    r = TopKRouter(32, 8, 3, norm_topk_prob=False)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(20, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    scores = torch.nn.functional.linear(x, r.weight.detach()).softmax(-1)
    assert out.scores_TE.dtype == torch.float32 and out.topk_weights_TK.dtype == torch.float32
    torch.testing.assert_close(out.scores_TE, scores)
    values, ids = torch.topk(scores, 3)
    assert torch.equal(out.topk_ids_TK, ids)
    torch.testing.assert_close(out.topk_weights_TK, values)
