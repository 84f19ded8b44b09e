"""LoRA: low-rank adapters on the model's projections, the routed experts' stacked weights included.

A weight W [out, in] (or stacked experts' [E, out, in]) computes as ``W + (alpha / r) B A`` with
A [.., r, in] and B [.., out, r] trained and W frozen; B starts at zero, so an adapted model starts
as the model it adapts. Targets, by name:

- ``attention``: q_proj, k_proj, v_proj, o_proj;
- ``experts``: the routed experts' w1 / w3 / w2 (gate, up, down), one adapter per expert, stacked
  like the weights ([E, r, D] and [E, I, r] for w1);
- ``shared``: the shared experts' gate_proj, up_proj, down_proj;
- ``mlp``: the dense layers' gate_proj, up_proj, down_proj.

The router gate, norms, embeddings and output head stay frozen unless ``train_also`` names them
(``embeddings``, ``head``, ``norms``, ``router``): those train whole and are saved whole with the
adapters (peft's ``modules_to_save``). On a small model the frozen embeddings and head are what
limits LoRA most: on the main job's 11M-parameter model, full fine-tuning with only them, the
norms and the router frozen learns as slowly as LoRA does. A linear layer adds the low-rank
path to its output (``x A^T B^T``, never forming B A); stacked experts add B A to the weights
once per forward (their grouped kernels take whole weights), which for rank r costs an
``E x out x r x in`` product per layer.

Adapters are saved on their own (``save_adapter``: ``adapter_model.safetensors`` with the
parameters under the model's own names, ``adapter_config.json`` with rank, alpha, targets and the
base checkpoint) and loaded onto a base model (``load_adapter``); ``merge`` folds them into the
weights, leaving a plain model.

Why not peft: its linear-layer LoRA would serve attention, but the routed experts are stacked
parameters computed by grouped kernels, which peft reaches only by re-parametrising whole
parameters; one small mechanism serves every target here, keeps the base weights' names (so a
checkpoint stays a checkpoint) and lets the same adapter file resume a run exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
TARGETS = ("attention", "experts", "shared", "mlp")
TRAIN_ALSO = ("embeddings", "head", "norms", "router")


def _trained_whole(name: str, train_also: Sequence[str]) -> bool:
    """Whether parameter ``name`` is one that ``train_also`` trains whole."""
    return (("embeddings" in train_also and name == "model.embed_tokens.weight")
            or ("head" in train_also and name == "lm_head.weight")
            or ("norms" in train_also and name.endswith("norm.weight"))
            or ("router" in train_also and name.endswith(".mlp.gate.weight")))
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_SWIGLU = ("gate_proj", "up_proj", "down_proj")
_STACKED = ("w1", "w3", "w2")


class LoRAError(ValueError):
    """An adapter that does not fit its model, or an unreadable adapter file."""


@dataclass
class LoRAConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS
    train_also: tuple[str, ...] = ()  # trained whole beside the adapters: TRAIN_ALSO
    base_model: Optional[str] = None  # the checkpoint the adapter was trained on, as given
    base_config: dict[str, Any] = field(default_factory=dict)  # its model config, to check a match

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.train_also = tuple(self.train_also)
        odd = [t for t in self.train_also if t not in TRAIN_ALSO]
        if odd:
            raise LoRAError(f"cannot train {', '.join(odd)} beside LoRA; choose from {', '.join(TRAIN_ALSO)}")
        if self.rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be positive, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise LoRAError(f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRA(nn.Module):
    """The low-rank update ``scale * B A`` of one weight of shape [..., out, in]."""

    def __init__(self, shape: Sequence[int], rank: int, scale: float, device=None) -> None:
        super().__init__()
        *lead, n_out, n_in = shape
        self.scale = scale
        self.A = nn.Parameter(torch.empty(*lead, rank, n_in, device=device))
        self.B = nn.Parameter(torch.zeros(*lead, n_out, rank, device=device))
        # A as nn.Linear initialises its weight (kaiming-uniform, a=sqrt(5)); B at zero
        bound = 1.0 / math.sqrt(n_in)
        with torch.no_grad():
            self.A.uniform_(-bound, bound)

    def delta(self) -> torch.Tensor:
        """scale * B A, shaped like the weight."""
        return torch.matmul(self.B, self.A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank path of a linear layer: ``scale * x A^T B^T``."""
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[-2]}, scale={self.scale:g}"


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a ``lora`` adapter: y = x W^T + b + scale * x A^T B^T. Made from an
    existing layer by ``add_lora``, whose weight and bias it keeps under their names."""

    lora: LoRA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora(x)


def _targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Module, Optional[str]]]:
    """(module name, module, stacked parameter name or None for a linear layer) of each target."""
    from .moe.experts import GroupedExperts

    found = []
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if "attention" in targets and isinstance(m, nn.Linear) and leaf in _ATTENTION and ".self_attn." in f".{name}":
            found.append((name, m, None))
        elif isinstance(m, nn.Linear) and leaf in _SWIGLU:
            where = "shared" if ".shared_experts." in name else ("experts" if ".experts." in name else "mlp")
            if where in targets:
                found.append((name, m, None))
        elif "experts" in targets and isinstance(m, GroupedExperts):
            found.extend((name, m, p) for p in _STACKED)
    return found


def add_lora(model: nn.Module, config: LoRAConfig) -> int:
    """Freeze every parameter of ``model`` and add adapters to the targets of ``config``; returns
    the number of trainable (adapter) parameters. Calling it on an adapted model is an error."""
    from .quant import quantized_layers

    if lora_modules(model):
        raise LoRAError("the model already has LoRA adapters")
    if quantized_layers(model):
        raise LoRAError("LoRA on quantized weights is not supported: adapt the unquantized checkpoint")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = _targets(model, config.targets)
    if not targets:
        raise LoRAError(f"the model has no layer of the LoRA targets {', '.join(config.targets)}")
    for _, m, stacked in targets:
        if stacked is None:
            w = m.weight
            m.__class__ = LoRALinear  # the same module, its weight and bias kept, plus the adapter
            m.add_module("lora", LoRA(w.shape, config.rank, config.scale, device=w.device))
        else:
            if not hasattr(m, "adapters"):
                m.add_module("adapters", nn.ModuleDict())
            w = getattr(m, stacked)
            m.adapters[stacked] = LoRA(w.shape, config.rank, config.scale, device=w.device)
    for name, p in model.named_parameters():
        if _trained_whole(name, config.train_also):
            p.requires_grad_(True)
    model.lora_config = config  # type: ignore[assignment]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_modules(model: nn.Module) -> dict[str, LoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRA)}


def lora_config_of(model: nn.Module) -> Optional[LoRAConfig]:
    return getattr(model, "lora_config", None)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters under the model's names (``...q_proj.lora.A``,
    ``...experts.adapters.w1.B``), and the parameters trained whole beside them."""
    out = {f"{name}.{p}": t.detach() for name, m in lora_modules(model).items()
           for p, t in (("A", m.A), ("B", m.B))}
    config = lora_config_of(model)
    if config is not None and config.train_also:
        out.update({n: p.detach() for n, p in model.named_parameters() if _trained_whole(n, config.train_also)})
    return out


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Fold every adapter into its weight (W += scale * B A) and remove it; the model is a plain
    model again, every parameter trainable. Returns the number of weights merged."""
    from .moe.experts import GroupedExperts

    n = 0
    for m in list(model.modules()):
        if isinstance(m, LoRALinear):
            m.weight += m.lora.delta().to(m.weight.dtype)
            del m.lora
            m.__class__ = nn.Linear
            n += 1
        elif isinstance(m, GroupedExperts) and hasattr(m, "adapters"):
            for name, a in m.adapters.items():
                w = getattr(m, name)
                w += a.delta().to(w.dtype)
                n += 1
            del m.adapters
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return n


def save_adapter(model: nn.Module, folder: PathLike) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder`` (created;
    files replaced atomically)."""
    from safetensors.torch import save_file

    from .atomic import fsync_path, normal_mode, write_json_atomic

    config = lora_config_of(model)
    if config is None:
        raise LoRAError("the model has no LoRA adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (ADAPTER_WEIGHTS_NAME + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}, str(tmp))
    os.chmod(tmp, normal_mode())
    fsync_path(tmp)
    os.replace(tmp, folder / ADAPTER_WEIGHTS_NAME)
    write_json_atomic(folder / ADAPTER_CONFIG_NAME, asdict(config))
    return folder


def read_adapter_config(folder: PathLike) -> LoRAConfig:
    path = Path(folder) / ADAPTER_CONFIG_NAME
    try:
        d = json.loads(path.read_text())
        return LoRAConfig(**{k: v for k, v in d.items() if k in LoRAConfig.__dataclass_fields__})
    except (OSError, ValueError, TypeError) as e:
        raise LoRAError(f"{path}: unreadable adapter config ({e})") from None


def is_adapter_dir(folder: PathLike) -> bool:
    return (Path(folder) / ADAPTER_CONFIG_NAME).is_file()


def save_adapter_checkpoint(model: nn.Module, folder: PathLike) -> None:
    """The weights of a LoRA run's training checkpoint: the adapters and the model's
    ``config.json`` (the base's), no base weights."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.config.save(Path(folder) / "config.json")
    save_adapter(model, folder)


def load_adapter(model: nn.Module, folder: PathLike, merge_weights: bool = False) -> LoRAConfig:
    """Add the adapter saved in ``folder`` to ``model`` (a base model without adapters), or with
    ``merge_weights`` fold it into the weights. A config that is not the adapter's base, or a
    tensor missing, extra or of the wrong shape, is an error naming it."""
    config = read_adapter_config(folder)
    if config.base_config:
        mine = asdict(model.config) if hasattr(model, "config") else {}
        differ = sorted(k for k, v in config.base_config.items()
                        if k not in ("name", "dispatch") and k in mine and mine[k] != v)
        if differ:
            raise LoRAError(f"{folder}: the adapter was trained on a model with other "
                            f"{', '.join(differ)} than this one ({config.base_model})")
    add_lora(model, config)
    load_adapter_weights(model, folder)
    if merge_weights:
        merge(model)
    return config


def load_adapter_weights(model: nn.Module, folder: PathLike) -> None:
    """Copy the adapter tensors saved in ``folder`` into the adapters ``model`` already has."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(Path(folder) / ADAPTER_WEIGHTS_NAME))
    except (OSError, SafetensorError) as e:
        raise LoRAError(f"{Path(folder) / ADAPTER_WEIGHTS_NAME}: unreadable ({e})") from None
    own = dict(model.named_parameters())
    expected = set(adapter_state_dict(model))
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise LoRAError(f"{folder}: the adapter does not fit this model (missing {missing[:3]}, "
                        f"unexpected {extra[:3]})")
    with torch.no_grad():
        for k, t in tensors.items():
            if own[k].shape != t.shape:
                raise LoRAError(f"{folder}: {k} has shape {tuple(t.shape)}, the model's is {tuple(own[k].shape)}")
            own[k].copy_(t)


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
