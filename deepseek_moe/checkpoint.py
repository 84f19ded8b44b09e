"""The layout of the released deepseek-moe-16b checkpoint (HuggingFace): one key map, load and save.

Our module names already mirror the released names, so the only difference between the two
layouts is the routed experts: we store each layer's experts stacked, the release stores one
tensor per expert. ``KEY_MAP`` states that once and both directions are derived from it.

Shape legend: E routed experts of a layer, D hidden size, I expert intermediate size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import fsync_path, normal_mode, replace_dir, write_json
from .config import DeepseekMoEConfig
from .memory import Size, budget_bytes, check_budget, parse_size
from .model import DeepseekForCausalLM
from .moe.layer import use_expert_list
from .quant import quantize_modules, quantized_layers, scheme_of

# The one key map. Names not listed here are identical in both layouts.
#   ours (stacked over experts)      HF (one tensor per expert e)
KEY_MAP: dict[str, str] = {
    "mlp.experts.w1": "mlp.experts.{e}.gate_proj.weight",  # [E, I, D] <-> E x [I, D]
    "mlp.experts.w3": "mlp.experts.{e}.up_proj.weight",  # [E, I, D] <-> E x [I, D]
    "mlp.experts.w2": "mlp.experts.{e}.down_proj.weight",  # [E, D, I] <-> E x [D, I]
}
# HF -> ours: each template turned into a regex capturing the layer prefix and the expert index.
_HF_PATTERNS = [
    (re.compile(r"^(.*\.)?" + re.escape(hf).replace(r"\{e\}", r"(\d+)") + "$"), ours)
    for ours, hf in KEY_MAP.items()
]

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TIED_NAME = "lm_head.weight"  # HF writes only model.embed_tokens.weight when tied


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file or tensor."""


def _stacked_key(name: str) -> Optional[str]:
    return next((k for k in KEY_MAP if name == k or name.endswith("." + k)), None)


def to_hf_names(name: str, n_experts: int) -> list[str]:
    """HF names of our tensor ``name`` (``n_experts`` of them for a stacked expert tensor)."""
    key = _stacked_key(name)
    if key is None:
        return [name]
    prefix = name[: len(name) - len(key)]
    return [prefix + KEY_MAP[key].format(e=e) for e in range(n_experts)]


def from_hf_name(hf_name: str) -> tuple[str, Optional[int]]:
    """Our name of the HF tensor ``hf_name`` and its expert index (None when not per-expert)."""
    for pattern, ours in _HF_PATTERNS:
        m = pattern.match(hf_name)
        if m:
            return (m.group(1) or "") + ours, int(m.group(2))
    return hf_name, None


def _hf_layout(
    ours: Mapping[str, torch.Tensor], tied: bool
) -> Iterator[tuple[str, str, Optional[int]]]:
    """(hf_name, our_name, expert index or None), in state_dict order; a tied lm_head skipped."""
    for name, t in ours.items():
        if tied and name == TIED_NAME:
            continue
        stacked = _stacked_key(name) is not None
        for e, hf in enumerate(to_hf_names(name, t.shape[0] if stacked else 1)):
            yield hf, name, (e if stacked else None)


def hf_state_dict(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """Our model's tensors under the released names; per-expert entries are views [I, D] / [D, I]
    of the stacked [E, ...] parameters, so nothing is copied."""
    sd = model.state_dict()
    return {
        hf: sd[n] if e is None else sd[n][e]
        for hf, n, e in _hf_layout(sd, model.config.tie_word_embeddings)
    }


def _check_tensors(
    expected: Mapping[str, torch.Tensor], config: DeepseekMoEConfig,
    found: Mapping[str, Sequence[int]], where: str,
) -> None:
    """Compare HF names and shapes ``found`` with what ``config`` needs (``expected``: our names
    -> meta tensors); raise a CheckpointError naming the first offending tensors."""
    tied = config.tie_word_embeddings
    want = {hf: (expected[n].shape if e is None else expected[n].shape[1:])
            for hf, n, e in _hf_layout(expected, tied)}
    # A tied checkpoint written by other tools may carry lm_head.weight too; embed wins, as in HF.
    extra = [n for n in found if n not in want and not (tied and n == TIED_NAME)]
    for n in extra:
        ours, e = from_hf_name(n)
        if e is not None and ours in expected:
            raise CheckpointError(f"{where}: tensor {n}: expert index {e} out of range, layer "
                                  f"has {expected[ours].shape[0]} routed experts")
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor(s) {_few(extra)} for this config")
    missing = [n for n in want if n not in found]
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {_few(missing)}")
    for n, shape in want.items():
        if tuple(found[n]) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {n} has shape {list(found[n])}, the config "
                                  f"expects {list(shape)}")


def _few(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _convert(
    expected: Mapping[str, torch.Tensor], config: DeepseekMoEConfig,
    read: Callable[[str], torch.Tensor], dtype: Optional[torch.dtype],
    device: Optional[torch.device],
) -> dict[str, torch.Tensor]:
    """Our state_dict from HF tensors fetched one at a time by ``read``. Each stacked [E, ...]
    tensor is allocated once and filled per expert, so peak memory is one copy of the weights.
    ``dtype``/``device`` None keep what is stored."""
    out: dict[str, torch.Tensor] = {}
    tied = config.tie_word_embeddings
    for name, ref in expected.items():
        if tied and name == TIED_NAME:
            continue
        if _stacked_key(name) is None:
            t = read(name)
            cast = dtype is not None and t.is_floating_point() and t.dtype != dtype
            out[name] = t.to(device=device or t.device, dtype=dtype if cast else t.dtype)
            continue
        hf_names = to_hf_names(name, ref.shape[0])
        t = read(hf_names[0])  # the first expert fixes the stored dtype and device
        stacked = torch.empty(ref.shape, dtype=dtype or t.dtype, device=device or t.device)
        for e, hf in enumerate(hf_names):
            stacked[e].copy_(t if e == 0 else read(hf))  # copy_ also casts
        out[name] = stacked
    if tied:
        out[TIED_NAME] = out["model.embed_tokens.weight"]
    return out


def meta_model(config: DeepseekMoEConfig) -> DeepseekForCausalLM:
    with torch.device("meta"):  # shapes only: no memory, no init
        return DeepseekForCausalLM(config)


def from_hf_state_dict(
    tensors: Mapping[str, torch.Tensor], config: DeepseekMoEConfig
) -> dict[str, torch.Tensor]:
    """Released names -> our state_dict for ``config`` (per-expert [I, D] stacked into
    [E, I, D]); names and shapes are checked first. Dtype and device are kept."""
    expected = meta_model(config).state_dict()
    _check_tensors(expected, config, {n: t.shape for n, t in tensors.items()}, "state dict")
    return _convert(expected, config, lambda n: tensors[n], None, None)


# --- save -----------------------------------------------------------------------------------------
def remove_stale(parent: Path, pattern: "re.Pattern[str]") -> None:
    """Remove the entries of ``parent`` whose whole name matches ``pattern``: what an
    interrupted atomic write left behind (only names of our own temporary form)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        if not pattern.fullmatch(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def check_target(out: Path, force: bool) -> None:
    """Refuse to write a new checkpoint into ``out`` unless it is new or empty, or ``force`` and
    it holds a checkpoint (a directory with ``config.json``), which the write then replaces."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise CheckpointError(f"refusing to write into {out}: not empty (force replaces a "
                              f"checkpoint there)")
    if not (out / CONFIG_NAME).is_file():
        raise CheckpointError(f"refusing to replace {out}: a non-empty directory that is not a "
                              f"checkpoint (no {CONFIG_NAME})")


@contextlib.contextmanager
def new_checkpoint_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write a checkpoint into: when the block ends it replaces
    ``out`` (``replace_dir``), and if the block fails it is removed, leaving ``out`` as it was.
    Leftovers of an interrupted write of the same name are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, re.compile(re.escape(f".{out.name}.tmp-") + r"[a-z0-9_]{8}"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, normal_mode(directory=True))
        yield tmp
        fsync_path(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Files of a checkpoint that travel with its weights when they are converted: the tokenizer, its
# chat template, the generation defaults.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def copy_companions(src: Path, dst: Path) -> None:
    """Copy the ``COMPANION_FILES`` that ``src`` has into ``dst`` (durably, with a plain file's mode)."""
    for name in COMPANION_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            os.chmod(dst / name, normal_mode())
            fsync_path(dst / name)


def plan_shards(sizes: Sequence[tuple[str, int]], limit: int) -> list[list[str]]:
    """Tensor names in order, grouped into shards of at most ``limit`` bytes (a new shard whenever
    the next tensor would take this one past it; a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    """The released naming: ``model.safetensors`` alone, else ``model-0000k-of-0000N.safetensors``."""
    return [SINGLE_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def save_pretrained(
    model: DeepseekForCausalLM, path: Union[str, os.PathLike],
    max_shard_size: Union[int, str] = "5GB", dtype: Optional[torch.dtype] = None,
    extra_files: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
) -> None:
    """Write ``model`` to ``path`` in the released layout: ``config.json`` and either
    ``model.safetensors`` or ``model-0000k-of-0000N.safetensors`` shards of at most
    ``max_shard_size`` plus ``model.safetensors.index.json``. Floating tensors are cast to
    ``dtype`` if given. ``extra_files`` maps file names (such as ``tokenizer.json``) to files
    copied in beside the weights, as part of the same atomic write.

    Atomic: everything is written and fsynced in a temporary sibling directory that then
    replaces ``path``; an existing checkpoint there is removed only after that, and any failure
    leaves it untouched. A non-empty ``path`` that is not a checkpoint is refused.
    """
    if quantized_layers(model):
        raise CheckpointError("cannot save a quantized model in the released layout (its config would not "
                              "say so): save or export the checkpoint it was quantized from, then quantize it")
    limit = parse_size(max_shard_size, "max_shard_size")
    path = Path(path).absolute()
    extra = {name: Path(src) for name, src in (extra_files or {}).items()}
    for name, src in extra.items():
        if not name or Path(name).name != name or name in (".", "..") or name == CONFIG_NAME \
                or name.endswith(".safetensors") or name == INDEX_NAME:
            raise CheckpointError(f"cannot add {name!r} to a checkpoint: not a plain file name "
                                  f"beside the weights")
        if not src.is_file():
            raise CheckpointError(f"cannot add {name} to a checkpoint: {src} is not a file")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"refusing to overwrite {path}: a non-empty directory that is not "
                              f"a checkpoint (no {CONFIG_NAME})")
    # Leftovers of an interrupted save of the same name: ``.old-*`` only while ``path`` exists
    # (between replace_dir's two renames the old copy is the only one).
    stale_tmp = re.compile(re.escape(f".{path.name}.tmp-") + r"[a-z0-9_]{8}")
    stale_old = re.compile(re.escape(f".{path.name}.old-") + r"[0-9a-f]{8}")
    remove_stale(path.parent, stale_tmp)
    if path.exists():
        remove_stale(path.parent, stale_old)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint under {path.parent}: {e}") from e
    try:
        os.chmod(tmp, normal_mode(directory=True))
        _write_checkpoint(model, tmp, limit, dtype)
        for name, src in extra.items():
            try:
                shutil.copyfile(src, tmp / name)
            except OSError as e:
                raise CheckpointError(f"cannot copy {src} into the checkpoint: {e}") from e
            os.chmod(tmp / name, normal_mode())
            fsync_path(tmp / name)
        if extra:
            fsync_path(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale(path.parent, stale_old)


def _write_checkpoint(
    model: DeepseekForCausalLM, out: Path, limit: int, dtype: Optional[torch.dtype]
) -> None:
    write_shards(out, list(hf_state_dict(model).items()), limit, dtype)  # views only
    stored = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()),
                           torch.float32)
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(stored).removeprefix("torch.")
    write_json(out / CONFIG_NAME, cfg)
    fsync_path(out)


def write_shards(out: Path, entries: Sequence[tuple[str, torch.Tensor]], limit: int,
                 dtype: Optional[torch.dtype] = None) -> None:
    """``entries`` (name, tensor) as safetensors shards of at most ``limit`` bytes in ``out``
    (``shard_file_names``), with the index when there are several; floating tensors cast to
    ``dtype`` if given. One shard's tensors are materialised at a time."""

    def target(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    def prepare(t: torch.Tensor) -> torch.Tensor:
        # Per-expert rows of a contiguous stack are contiguous: written without a copy.
        return t.detach().to("cpu", dtype=target(t)).contiguous()

    tensors = dict(entries)
    sizes = [(n, t.numel() * target(t).itemsize) for n, t in entries]
    shards = plan_shards(sizes, limit)  # from sizes alone: the shard count is known before any file is named
    weight_map = {}
    for fname, names in zip(shard_file_names(len(shards)), shards):
        save_file({n: prepare(tensors[n]) for n in names}, out / fname, metadata={"format": "pt"})
        os.chmod(out / fname, normal_mode())  # safetensors writes 0o600 (a temporary file)
        fsync_path(out / fname)
        weight_map.update({n: fname for n in names})
    if len(shards) > 1:
        write_json(out / INDEX_NAME, {"metadata": {"total_size": sum(b for _, b in sizes)},
                                      "weight_map": weight_map})


# --- load -----------------------------------------------------------------------------------------
def _load_adapted(path: Path, device, dtype, max_memory, experts: str, **config_overrides: object) -> DeepseekForCausalLM:
    """The base checkpoint a LoRA adapter names, with the adapter merged into its weights."""
    from .lora import LoRAError, load_adapter, read_adapter_config

    base = read_adapter_config(path).base_model
    if not base or not (Path(base) / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} holds LoRA adapters whose base checkpoint {base!r} is not there: "
                              "load the base and the adapter with lora.load_adapter")
    model = load_pretrained(base, device, dtype, max_memory, "stacked" if experts == "auto" else experts,
                            **config_overrides)
    try:
        load_adapter(model, path, merge_weights=True)
    except LoRAError as e:
        raise CheckpointError(str(e)) from None
    return model


def load_pretrained(
    path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None, max_memory: Optional[Size] = None, experts: str = "auto",
    **config_overrides: object,
) -> DeepseekForCausalLM:
    """Load a checkpoint in the released layout (single file or sharded).

    The model is built on the meta device and the mmap'ed tensors are assigned to it, so only
    one copy of the weights is ever held. ``dtype`` None means float32 on CPU and the stored
    dtype elsewhere. ``config_overrides`` replace config fields (e.g. ``dispatch="reference"``).
    On the CPU the memory a load allocates must fit the budget (``max_memory``, else what the
    machine has available), checked from the files' headers before any tensor is read: a
    ``MemoryBudgetError`` rather than the OOM killer. Tensors kept in their stored dtype stay
    memory-mapped from the file and allocate nothing; stacking the routed experts copies them.
    ``experts``: ``"stacked"`` (``GroupedExperts``, the training layout), ``"per-expert"``
    (``ExpertList``: the checkpoint's per-expert tensors as they are) or ``"auto"``, which on the
    CPU with ``dtype`` None takes float32 and stacked experts when they fit the budget (exactly as
    a small model always loaded) and otherwise the stored dtype with per-expert tensors, which
    copies nothing.
    """
    path = Path(path)
    if not path.is_dir() or not (path / CONFIG_NAME).is_file():
        what = "does not exist" if not path.exists() else "is not a checkpoint directory"
        raise CheckpointError(f"{path} {what} (expected a directory with {CONFIG_NAME})")
    if (path / "adapter_config.json").is_file():  # a LoRA run's checkpoint: its base, adapted
        return _load_adapted(path, device, dtype, max_memory, experts, **config_overrides)
    try:
        cfg = DeepseekMoEConfig.load(path / CONFIG_NAME)
        scheme = scheme_of(json.loads((path / CONFIG_NAME).read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: invalid config: {e}") from e
    if scheme is not None and (dtype not in (None, torch.bfloat16) or experts == "stacked"):
        raise ValueError(f"{path} is quantized (int{scheme[0]}): it computes in bf16 with one tensor "
                         "per expert (no --dtype float32, no stacked experts)")
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    device = torch.device(device)
    if experts not in EXPERT_LAYOUTS:
        raise ValueError(f"experts must be one of {', '.join(EXPERT_LAYOUTS)}, got {experts!r}")
    files, weight_map = weight_files(path)
    model = meta_model(cfg)
    if scheme is not None:
        use_expert_list(model)
        quantize_modules(model, *scheme)
        experts, dtype = "per-expert", torch.bfloat16
    expected = model.state_dict()
    with contextlib.ExitStack() as stack:
        owner: dict[str, Path] = {}
        shapes: dict[str, list[int]] = {}
        handles = {}
        for f in files:
            try:
                h = handles[f] = stack.enter_context(safe_open(str(f), framework="pt",
                                                               device=str(device)))
                for n in h.keys():
                    if n in owner:
                        raise CheckpointError(f"tensor {n} is stored in both {owner[n]} and {f}")
                    owner[n], shapes[n] = f, h.get_slice(n).get_shape()
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: corrupt or unreadable safetensors file: {e}") from e
        for n, f in (weight_map or {}).items():
            if owner.get(n) != path / f:
                raise CheckpointError(f"{path / INDEX_NAME}: maps tensor {n} to {f}, which "
                                      "does not hold it")
        _check_tensors(expected, cfg, shapes, str(path))
        stored = {n: handles[owner[n]].get_slice(n).get_dtype() for n in shapes}
        dtype, experts = _plan_load(shapes, stored, dtype, experts, device, max_memory, f"loading {path}")
        if experts == "per-expert" and cfg.has_moe and scheme is None:
            use_expert_list(model)
            expected = model.state_dict()

        def read(name: str) -> torch.Tensor:
            try:
                return handles[owner[name]].get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{owner[name]}: cannot read tensor {name}: {e}") from e

        sd = _convert(expected, cfg, read, dtype, device)
    model.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_word_embeddings:  # assign gave lm_head its own Parameter object: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # e.g. a non-persistent buffer no checkpoint can provide
        raise CheckpointError(f"{path}: still on the meta device after loading: {_few(left)}")
    if device.type == "cpu" and experts == "per-expert":  # weights mapped from the files, not copied
        from .mapped import RESIDENT_FRACTION, ResidentLimit

        model._resident_limit = ResidentLimit(model, files, RESIDENT_FRACTION * budget_bytes(max_memory))
        model._resident_limit.check()  # what loading touched
    return model


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
EXPERT_LAYOUTS = ("auto", "stacked", "per-expert")


def _allocated_bytes(shapes: Mapping[str, Sequence[int]], stored: Mapping[str, str],
                     dtype: Optional[torch.dtype], experts: str) -> int:
    """Bytes a load allocates: tensors cast to ``dtype``, with stacked experts every routed
    expert's (stacking copies them), and int4 weights (repacked for the CPU kernel on first use).
    The rest stays memory-mapped in the file."""
    total = 0
    for n, shape in shapes.items():
        if n.endswith(".weight_packed"):
            total += math.prod(shape)
            continue
        have = SAFETENSORS_DTYPES.get(stored[n], torch.float32)
        cast = dtype is not None and have.is_floating_point and have != dtype
        stacked = experts == "stacked" and from_hf_name(n)[1] is not None
        if cast or stacked:
            total += math.prod(shape) * (dtype if cast else have).itemsize
    return total


def _plan_load(shapes: Mapping[str, Sequence[int]], stored: Mapping[str, str], dtype: Optional[torch.dtype],
               experts: str, device: torch.device, max_memory: Optional[Size],
               what: str) -> tuple[Optional[torch.dtype], str]:
    """The dtype and expert layout of a load (see ``load_pretrained``), checked against the budget."""
    if device.type != "cpu":  # accelerator memory is not budgeted here; the stored dtype unless told
        return dtype, "stacked" if experts == "auto" else experts
    if experts == "auto":  # None: the stored dtype
        plans = [(dtype or torch.float32, "stacked"), (dtype, "per-expert")]
    else:
        plans = [(dtype or torch.float32, experts)] + ([(None, experts)] if dtype is None else [])
    budget = budget_bytes(max_memory)
    needs = [_allocated_bytes(shapes, stored, dt, layout) for dt, layout in plans]
    for (dt, layout), need in zip(plans, needs):
        if need <= budget:
            return dt, layout
    check_budget(min(needs), what, max_memory, budget)  # raises, naming the smallest need
    raise AssertionError("unreachable")


def weight_files(path: Path) -> tuple[list[Path], Optional[dict[str, str]]]:
    """The safetensors files of a checkpoint (the index's shards, else the single file) and the
    index's weight map (None without an index)."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(k, str) and isinstance(v, str) and Path(v).name == v
                       for k, v in weight_map.items()):  # also keeps shards inside the checkpoint
                raise TypeError("weight_map must map tensor names to plain file names")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid index ({e!r})") from e
        lost = [n for n in names if not (path / n).is_file()]
        if lost:
            raise CheckpointError(f"{index} references missing shard file(s): {_few(lost)}")
        return [path / n for n in names], weight_map
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME], None
    pickles = _pickleweight_files(path)
    if pickles:
        raise CheckpointError(
            f"{path}: the weights are pickle files ({_few(pickles)}), which this project never "
            f"opens (unpickling runs code); convert them to safetensors with a trusted tool, on a "
            f"machine where you trust the files, e.g. python -c \"import torch; from "
            f"safetensors.torch import save_file; sd = torch.load('pytorch_model.bin', "
            f"weights_only=True); save_file({{k: v.contiguous() for k, v in sd.items()}}, "
            f"'model.safetensors', metadata={{'format': 'pt'}})\" (each shard likewise, then an "
            f"index {INDEX_NAME})")
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")


def _pickleweight_files(path: Path) -> list[str]:
    """Names of the pickle weight files in ``path`` (``pytorch_model*.bin``, ``*.pt``, ``*.pth``
    and a ``pytorch_model.bin.index.json``): found by name only, never opened."""
    patterns = ("pytorch_model*.bin", "pytorch_model*.bin.index.json", "*.pt", "*.pth")
    return sorted({p.name for pattern in patterns for p in path.glob(pattern) if p.is_file()})


__all__ = [
    "COMPANION_FILES", "CheckpointError", "KEY_MAP", "check_target", "copy_companions", "from_hf_name", "from_hf_state_dict", "hf_state_dict",
    "load_pretrained", "meta_model", "new_checkpoint_dir", "parse_size", "plan_shards", "save_pretrained",
    "shard_file_names", "to_hf_names", "weight_files", "write_shards",
]
