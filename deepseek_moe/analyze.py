"""The paper's expert-specialisation analyses (section 4.5) on any MoE checkpoint.

* ``disable_top``: mask each token's highest-scoring fraction r of routed experts and route to the
  top-k of the rest (Fig. 4); a model whose experts are specialised suffers more.
* ``top_k``: evaluate with k routed experts per token instead of the trained k (Fig. 5).
* ``shared``: drop the shared expert(s) and route one more expert instead (section 4.5).
* ``load``: which experts each domain's tokens go to, the load balance and the routing entropy.
* ``paths``: how much each MoE layer adds to the residual stream through its shared experts and
  through its gated routed experts (eq. 9's two sums, root mean square over tokens), beside the
  stream itself, the top-k gate values (eq. 10-11) and the size of the router's centroids e_i.
  Not one of the paper's analyses: it shows whether the shared path or the routed path carries
  the layer, which the gate scale decides (raw softmax scores sum to about K/E at the start).

All of them are the unmodified model evaluated under ``routing_options``, which sets the MoE
layers' inference options (``moe.layer.RoutingOptions``); with the defaults it is plain evaluation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from .evaluate import EvalStats, evaluate_tokens, windows
from .model import DeepseekForCausalLM
from .moe.layer import DeepseekMoE, RoutingOptions, moe_layers
from .tables import format_table

DISABLE_RATIOS = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)  # the x axis of the paper's Fig. 4
ANALYSES = ("disable_top", "top_k", "shared", "load", "paths")


def check_moe(model: DeepseekForCausalLM) -> list[DeepseekMoE]:
    layers = moe_layers(model)
    if not layers:
        name = model.config.name or "this model"
        raise ValueError(f"{name} is dense (no MoE layers): there are no experts to analyse")
    return layers


@contextlib.contextmanager
def routing_options(model: DeepseekForCausalLM, *, top_k: Optional[int] = None,
                    disable_top: int = 0, disable_shared: bool = False) -> Iterator[RoutingOptions]:
    """Evaluate ``model`` with changed routing inside the block; restored on exit.

    ``top_k``: routed experts per token; ``disable_top``: how many of each token's best experts to
    mask; ``disable_shared``: skip the shared experts. Errors name what the model cannot do.
    """
    layers = check_moe(model)
    cfg = model.config
    E = cfg.n_routed_experts
    if cfg.router == "hash" and (top_k not in (None, 1) or disable_top):
        raise ValueError("hash routing sends each token to one fixed expert: it has no scores to "
                         "rank experts by, so experts cannot be disabled by rank nor k changed")
    if top_k is not None and not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E} (the routed experts), got {top_k}")
    k = cfg.num_experts_per_tok if top_k is None else top_k
    if not 0 <= disable_top <= E - k:
        raise ValueError(f"cannot disable {disable_top} of {E} routed experts and still route "
                         f"to {k}")
    if disable_shared and cfg.n_shared_experts == 0:
        raise ValueError(f"{cfg.name or 'this model'} has no shared experts to disable")
    opts = RoutingOptions(top_k=top_k, disable_top=disable_top, disable_shared=disable_shared)
    saved = [layer.routing for layer in layers]
    try:
        for layer in layers:
            layer.routing = opts
        yield opts
    finally:
        for layer, old in zip(layers, saved):
            layer.routing = old


def disabled_count(ratio: float, n_experts: int) -> int:
    """Experts masked for a disable ratio: ``round(ratio * E)`` (63 experts, 1/16 -> 4)."""
    return int(round(ratio * n_experts))


# --- the analyses ---------------------------------------------------------------------------------------
@dataclass
class Analysis:
    model: str
    n_routed: int
    top_k: int
    n_shared: int
    eval_tokens: int
    baseline: float  # plain loss on the analysis sample
    disable_top: list[dict[str, Any]] = field(default_factory=list)
    top_k_sweep: list[dict[str, Any]] = field(default_factory=list)
    shared: Optional[dict[str, Any]] = None
    load: Optional[dict[str, Any]] = None
    paths: Optional[dict[str, Any]] = None
    skipped: dict[str, str] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("model", "n_routed", "top_k", "n_shared", "eval_tokens",
                                               "baseline", "disable_top", "top_k_sweep", "shared",
                                               "load", "paths", "skipped", "plots")}

    def format(self) -> str:
        out = [f"{self.model}: {self.n_shared} shared + top-{self.top_k} of {self.n_routed} routed "
               f"experts; {self.eval_tokens:,} held-out tokens; plain loss {self.baseline:.4f}"]
        if self.disable_top:
            rows = [("disabled ratio", "experts masked", "loss", "vs plain")]
            rows += [(f"{r['ratio']:.4f}", str(r["disabled"]), f"{r['loss']:.4f}",
                      f"{r['loss'] - self.baseline:+.4f}") for r in self.disable_top]
            out.append("disable top routed experts (Fig. 4)\n" + format_table(rows))
        if self.top_k_sweep:
            rows = [("routed k", "loss", "vs plain")]
            rows += [(f"{r['k']}{' (trained)' if r['k'] == self.top_k else ''}", f"{r['loss']:.4f}",
                      f"{r['loss'] - self.baseline:+.4f}") for r in self.top_k_sweep]
            out.append("activated routed experts (Fig. 5)\n" + format_table(rows))
        if self.shared:
            s = self.shared
            rows = [("setting", "loss"), (f"shared on, k={self.top_k}", f"{s['with_shared']:.4f}"),
                    (f"shared off, k={s['k_without']}", f"{s['without_shared']:.4f}")]
            out.append("disable the shared expert(s) (section 4.5)\n" + format_table(rows))
        if self.load:
            ld = self.load
            rows = [("MoE layer", "load CV", "max/mean", "idle experts", "entropy (nats)",
                     "entropy / ln E", "domain JS (bits)")]
            for i, layer in enumerate(ld["layers"]):
                rows.append((str(layer), f"{ld['load_cv'][i]:.3f}", f"{ld['max_over_mean'][i]:.2f}",
                             str(ld["idle_experts"][i]), f"{ld['entropy'][i]:.3f}",
                             f"{ld['entropy'][i] / math.log(self.n_routed):.3f}",
                             f"{ld['domain_js'][i]:.4f}"))
            out.append("expert load and routing entropy per layer (all domains)\n" + format_table(rows))
            rows = [("domain", "tokens", "loss")] + [
                (d, f"{ld['domain_tokens'][d]:,}", f"{ld['domain_loss'][d]:.4f}") for d in ld["domains"]]
            out.append(format_table(rows))
        if self.paths:
            pa = self.paths
            rows = [("MoE layer", "residual rms", "shared out rms", "routed out rms", "routed / shared",
                     "top-k gate sum", "largest gate", "router |e_i|")]
            for i, layer in enumerate(pa["layers"]):
                ratio = pa["routed_rms"][i] / pa["shared_rms"][i] if pa["shared_rms"][i] > 0 else float("inf")
                rows.append((str(layer), f"{pa['residual_rms'][i]:.4f}", f"{pa['shared_rms'][i]:.4f}",
                             f"{pa['routed_rms'][i]:.4f}", "-" if math.isinf(ratio) else f"{ratio:.3f}",
                             f"{pa['gate_sum'][i]:.3f}", f"{pa['gate_max'][i]:.3f}",
                             "-" if pa["router_norm"][i] is None else f"{pa['router_norm'][i]:.3f}"))
            out.append("what each MoE layer adds to the residual stream, shared vs routed (eq. 9)\n"
                       + format_table(rows))
        for name, why in self.skipped.items():
            out.append(f"{name}: skipped ({why})")
        return "\n\n".join(out)


def _sample(cache, split: str, seq_len: int, max_tokens: int) -> np.ndarray:
    """A fixed, evenly spread sample of the split's windows, concatenated (all domains)."""
    toks = cache.tokens(split)
    if len(toks) < 2:
        raise ValueError(f"the {split} split is empty: nothing to analyse")
    spans = [(s, e) for s, e in windows(toks, seq_len, max_tokens) if e - s == seq_len]
    if not spans:
        return np.asarray(toks[: max(2, min(len(toks), seq_len))])
    return np.concatenate([np.asarray(toks[s:e]) for s, e in spans])


def js_divergence_bits(dist_DE: np.ndarray, weights_D: np.ndarray) -> float:
    """Generalised Jensen-Shannon divergence (bits) among the domains' expert distributions:
    0 when every domain uses the experts alike, up to log2(domains) when they share none."""
    p = dist_DE / np.maximum(dist_DE.sum(1, keepdims=True), 1e-12)
    w = weights_D / weights_D.sum()
    mix = (w[:, None] * p).sum(0)

    def h(q: np.ndarray) -> np.ndarray:
        return -(q * np.log2(np.where(q > 0, q, 1.0))).sum(-1)

    return float(h(mix) - (w * h(p)).sum())


def analyze(model: DeepseekForCausalLM, cache, *, analyses: Sequence[str] = ANALYSES,
            split: str = "validation", seq_len: int = 256, batch_size: int = 16,
            max_tokens: int = 32768, ks: Optional[Sequence[int]] = None,
            ratios: Sequence[float] = DISABLE_RATIOS, progress: bool = True) -> Analysis:
    """Run the chosen analyses on ``split`` of ``cache``; see the module docstring.

    The loss analyses use one fixed sample of about ``max_tokens`` tokens spread over the split;
    the load analysis evaluates up to ``max_tokens`` tokens of each domain.
    """
    layers = check_moe(model)
    unknown = set(analyses) - set(ANALYSES)
    if unknown:
        raise ValueError(f"unknown analysis {sorted(unknown)}; choose from {', '.join(ANALYSES)}")
    cfg = model.config
    E, K, Ks = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts
    hashed = cfg.router == "hash"
    sample = _sample(cache, split, seq_len, max_tokens)
    res = Analysis(model=cfg.name or "model", n_routed=E, top_k=K, n_shared=Ks,
                   eval_tokens=len(sample), baseline=float("nan"))

    settings: list[tuple[str, dict[str, Any]]] = [("plain", {})]
    if "disable_top" in analyses:
        if hashed:
            res.skipped["disable_top"] = "hash routing has no expert ranking"
        else:
            for r in ratios:
                n = disabled_count(r, E)
                if n > E - K:
                    raise ValueError(f"disable ratio {r} masks {n} of {E} experts, leaving fewer than k={K}")
                settings.append((f"disable:{r}", {"disable_top": n}))
    if "top_k" in analyses:
        if hashed:
            res.skipped["top_k"] = "hash routing sends each token to exactly one expert"
        else:
            for k in (ks if ks is not None else range(1, min(E, K + 2) + 1)):
                if not 1 <= k <= E:
                    raise ValueError(f"k={k} is outside 1..{E} routed experts")
                settings.append((f"k:{k}", {"top_k": int(k)}))
    if "shared" in analyses:
        if Ks == 0:
            res.skipped["shared"] = "the model has no shared experts"
        elif K + 1 > E:
            res.skipped["shared"] = "no routed expert left to add"
        else:
            settings.append(("noshared", {"disable_shared": True, "top_k": K + 1}))
    n_win = len(sample) // seq_len or 1
    load_plan = []
    if "load" in analyses:
        for d in cache.domains:
            toks = cache.domain_tokens(split, d)
            if len(toks) >= 2:
                load_plan.append((d, toks, len(windows(toks, seq_len, max_tokens))))
    total = n_win * len(settings) + sum(p[2] for p in load_plan)
    bar = tqdm(total=total, unit="seq", desc="analysing", disable=not progress)
    losses: dict[str, float] = {}
    try:
        for name, opts in settings:
            probe = _PathProbe(model) if name == "plain" and "paths" in analyses else contextlib.nullcontext()
            with routing_options(model, **opts), probe:
                losses[name] = evaluate_tokens(model, sample, seq_len, batch_size, None, bar).loss
            if isinstance(probe, _PathProbe):
                res.paths = probe.summary([cfg.moe_layers[i] for i in range(len(layers))])
        per_domain: dict[str, EvalStats] = {}
        for d, toks, _ in load_plan:
            per_domain[d] = evaluate_tokens(model, toks, seq_len, batch_size, max_tokens, bar)
    finally:
        bar.close()

    res.baseline = losses["plain"]
    for r in ratios if "disable_top" in analyses and not hashed else ():
        res.disable_top.append({"ratio": r, "disabled": disabled_count(r, E), "loss": losses[f"disable:{r}"]})
    for name, loss in losses.items():
        if name.startswith("k:"):
            res.top_k_sweep.append({"k": int(name[2:]), "loss": loss})
    if "noshared" in losses:
        res.shared = {"with_shared": res.baseline, "without_shared": losses["noshared"], "k_without": K + 1}
    if per_domain:
        res.load = _load_summary(per_domain, [cfg.moe_layers[i] for i in range(len(layers))])
    return res


class _PathProbe:
    """Forward hooks that measure, per MoE layer and over every token fed, the residual stream
    entering the layer's FFN sublayer, the shared experts' output and the gated routed output
    (the layer's output minus the shared part), the top-k gates' sum and largest value, and the
    mean norm of the router's centroids. A context manager; the model's outputs are unchanged."""

    def __init__(self, model: DeepseekForCausalLM):
        self.model = model
        self.hooks: list[Any] = []
        self.sums: list[dict[str, float]] = []

    def __enter__(self) -> "_PathProbe":
        import torch

        blocks = [b for b in self.model.model.layers if isinstance(b.mlp, DeepseekMoE)]
        for block in blocks:
            acc = dict(n=0.0, resid=0.0, shared=0.0, routed=0.0, gsum=0.0, gmax=0.0)
            self.sums.append(acc)
            seen: dict[str, Any] = {}

            def resid_hook(mod, args, acc=acc):
                x = args[0].detach().float()
                acc["resid"] += float(x.pow(2).mean(-1).sum())

            def moe_pre(mod, args, seen=seen):
                seen["h"], seen["ids"] = args[0], (args[1] if len(args) > 1 else None)

            def moe_post(mod, args, out, acc=acc, seen=seen):
                with torch.no_grad():
                    h = seen.pop("h")
                    ids = seen.pop("ids")
                    h_TD = h.reshape(-1, h.shape[-1])
                    y_TD = out[0].reshape(h_TD.shape).float()
                    shared = (mod.shared_experts(h_TD).float() if mod.shared_experts is not None
                              and not mod.routing.disable_shared else torch.zeros_like(y_TD))
                    r = mod.gate(h_TD, None if ids is None else ids.reshape(-1))
                    acc["n"] += h_TD.shape[0]
                    acc["shared"] += float(shared.pow(2).mean(-1).sum())
                    acc["routed"] += float((y_TD - shared).pow(2).mean(-1).sum())
                    acc["gsum"] += float(r.topk_weights_TK.float().sum(-1).sum())
                    acc["gmax"] += float(r.topk_weights_TK.float().max(-1).values.sum())

            self.hooks += [block.post_attention_layernorm.register_forward_pre_hook(resid_hook),
                           block.mlp.register_forward_pre_hook(moe_pre),
                           block.mlp.register_forward_hook(moe_post)]
        self.layers = [b.mlp for b in blocks]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def summary(self, layer_ids: list[int]) -> dict[str, Any]:
        def rms(key: str) -> list[float]:
            return [math.sqrt(a[key] / max(a["n"], 1)) for a in self.sums]

        norms = [float(m.gate.weight.detach().float().norm(dim=-1).mean()) if hasattr(m.gate, "weight") else None
                 for m in self.layers]
        return {"layers": layer_ids, "residual_rms": rms("resid"), "shared_rms": rms("shared"),
                "routed_rms": rms("routed"), "gate_sum": [a["gsum"] / max(a["n"], 1) for a in self.sums],
                "gate_max": [a["gmax"] / max(a["n"], 1) for a in self.sums], "router_norm": norms}


def _load_summary(per_domain: dict[str, EvalStats], layer_ids: list[int]) -> dict[str, Any]:
    domains = list(per_domain)
    counts = np.stack([per_domain[d].tokens_per_expert.numpy() for d in domains]).astype(float)  # [D, L, E]
    total = counts.sum(0)  # [L, E]
    mean = total.mean(-1)
    fed = np.array([per_domain[d].fed for d in domains], dtype=float)
    ent = sum(per_domain[d].entropy_sum for d in domains).numpy() / fed.sum()
    return {
        "layers": layer_ids,
        "domains": domains,
        "domain_tokens": {d: int(per_domain[d].fed) for d in domains},
        "domain_loss": {d: per_domain[d].loss for d in domains},
        # share of each domain's routed assignments per expert, [D][L][E]
        "domain_share": (counts / np.maximum(counts.sum(-1, keepdims=True), 1)).tolist(),
        "load_cv": (total.std(-1) / np.maximum(mean, 1e-12)).tolist(),
        "max_over_mean": (total.max(-1) / np.maximum(mean, 1e-12)).tolist(),
        "idle_experts": (total == 0).sum(-1).astype(int).tolist(),
        "entropy": ent.tolist(),
        "domain_js": [js_divergence_bits(counts[:, i], fed) for i in range(counts.shape[1])],
    }
