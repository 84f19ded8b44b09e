"""The run settings of ``train``: one dataclass, the one source of truth.

``TrainConfig`` is what a run is given and what it records (``train_config.json`` in the run
directory). The command line is generated from its fields (``add_arguments`` / ``from_args``):
each field's help, flag and group live in its metadata, so the CLI's defaults are the
dataclass's. ``reproduce`` extends it, and evaluation reads a run's settings back with
``TrainConfig.load`` (runs written by earlier versions included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .data.corpus import DEFAULT_SOURCES, TEST_FRACTION, default_data_dir
from .runtime import DTYPES

TRAIN_CONFIG_NAME = "train_config.json"
# Runs from before the pinned corpus recorded no sources; this was the default then.
LEGACY_SOURCES = ("stdlib", "site-packages", "shakespeare", "debian")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, group: str, flag: Optional[str] = None,
            shown: Optional[str] = None, default_factory: Any = dataclasses.MISSING, **argparse_kw: Any) -> Any:
    """A ``TrainConfig`` field with its command-line option: ``help`` text, argparse ``group``,
    ``flag`` (default: ``--field-name``), ``shown`` (how --help states the default, when the value
    alone would not say it) and any other ``add_argument`` keywords."""
    meta = {"help": help, "group": group, "flag": flag, "shown": shown, "argparse": argparse_kw}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


MODEL, BUDGET, DATA, RECIPE, RUN, LAYOUT = (
    "model", "budget (one of; steps win over tokens, tokens over minutes)", "data",
    "optimisation (defaults: the paper's recipe)", "run",
    "layout (launch with torchrun --nproc_per_node N -m deepseek_moe train ...)")


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``train_config.json`` in the output directory."""

    preset: str = setting("deepseekmoe-tiny", "a preset name (see `presets`)", group=MODEL)
    model_overrides: dict[str, Any] = setting(
        help="override a model config field, e.g. --set num_hidden_layers=2 (repeatable)", group=MODEL,
        flag="--set", default_factory=dict, metavar="FIELD=VALUE", shown="none")
    # budget
    steps: Optional[int] = setting(None, "optimizer steps", group=BUDGET)
    tokens: Optional[int] = setting(None, "training tokens", group=BUDGET)
    minutes: Optional[float] = setting(None, "wall-clock minutes", group=BUDGET)
    # data
    data_dir: Optional[str] = setting(
        None, "pinned sources, tokenizers and token caches", group=DATA,
        shown="$XDG_CACHE_HOME/deepseek-moe/data, else ~/.cache/deepseek-moe/data")
    sources: tuple[str, ...] = setting(
        DEFAULT_SOURCES, "built-in sources: the pinned default; also site-packages and debian "
        "(fortunes, dictionary, wordnet), which read what this machine has", group=DATA)
    paths: tuple[str, ...] = setting(
        (), "your own text: a file, a folder, or JSONL with a 'text' field (repeatable)", group=DATA,
        flag="--text", metavar="PATH", shown="none")
    tokenizer: Optional[str] = setting(None, "use this tokenizer.json instead of training one", group=DATA,
                                       shown="train one")
    vocab_size: Optional[int] = setting(None, "BPE vocabulary to train", group=DATA, shown="the model's vocab_size")
    validation_fraction: float = setting(0.005, "share of documents held out for validation (chosen by "
                                         "content hash)", group=DATA)
    test_fraction: Optional[float] = setting(None, "share of documents held out for test", group=DATA,
                                             shown="the validation fraction")
    # batch and the recipe
    seq_len: int = setting(256, "tokens per sequence", group=RECIPE)
    batch_size: int = setting(16, "sequences per micro-batch, over all processes", group=RECIPE)
    grad_accum: int = setting(1, "micro-batches per optimizer step", group=RECIPE)
    lr: float = setting(1.08e-3, "peak learning rate", group=RECIPE)
    warmup_steps: Optional[int] = setting(None, "linear warmup steps", group=RECIPE,
                                          shown="min(2000, 10%% of steps)")
    schedule: str = setting("paper", "learning-rate schedule: paper (warmup, then x0.316 at 80%% and 90%% of "
                            "the steps) or constant", group=RECIPE, choices=["paper", "constant"])
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices", group=RECIPE)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas", group=RECIPE, metavar=("B1", "B2"))
    eps: float = setting(1e-8, "AdamW epsilon", group=RECIPE)
    grad_clip: float = setting(1.0, "gradient-norm clipping", group=RECIPE)
    seed: int = setting(0, "initialisation and data order", group=RECIPE)
    # the run
    out: str = setting("runs/train", "output directory", group=RUN)
    stop_after: Optional[int] = setting(None, "stop this invocation at this step (the schedule still spans "
                                        "the budget)", group=RUN)
    ckpt_every: int = setting(200, "steps between checkpoints", group=RUN)
    keep: int = setting(3, "checkpoints to keep", group=RUN)
    eval_every: int = setting(0, "steps between validation (0: at the end only)", group=RUN)
    eval_sequences: int = setting(64, "validation sequences per evaluation", group=RUN)
    device: str = setting("cpu", "cpu or cuda", group=RUN)
    dtype: str = setting("auto", "arithmetic: bf16 autocast or plain fp32; auto: where this CPU multiplies "
                         "bf16 fast, times this model's step in both and takes the faster (bf16 on GPUs); a "
                         "resumed run keeps its own unless forced", group=RUN, choices=list(DTYPES))
    bf16_autocast: bool = setting(False, "the same as --dtype bfloat16", group=RUN, flag="--bf16")
    compile: bool = setting(False, "torch.compile the model (fullgraph, grouped_mm experts; bf16)", group=RUN)
    progress: bool = setting(True, "progress bars (this flag turns them off)", group=RUN, flag="--no-progress")
    # layout (torchrun): batch_size is the global batch, split evenly over the processes
    expert_parallel: int = setting(1, "processes per expert-parallel group: each holds 1/E of the routed "
                                   "experts", group=LAYOUT, metavar="E")
    fsdp: bool = setting(False, "shard the dense parameters over all processes with FSDP2", group=LAYOUT)

    def __post_init__(self) -> None:
        if self.test_fraction is None:
            self.test_fraction = self.validation_fraction
        self.sources, self.paths = tuple(self.sources), tuple(self.paths)
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "ckpt_every", "eval_sequences"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps is None and self.tokens is None and self.minutes is None:
            raise ValueError("give a budget: steps, tokens or minutes")
        for name in ("steps", "tokens", "minutes", "warmup_steps", "stop_after"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.expert_parallel < 1:
            raise ValueError(f"expert_parallel must be >= 1, got {self.expert_parallel}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def dtype_choice(self) -> str:
        return "bfloat16" if self.bf16_autocast else self.dtype

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def data_path(self) -> Path:
        """The data folder: ``data_dir``, else the default one."""
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From a recorded ``train_config.json``: fields it lacks take what runs of its time used
        (runs from before the pinned corpus: ``LEGACY_SOURCES``; before a test fraction was
        recorded: ``TEST_FRACTION``); fields this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("sources", LEGACY_SOURCES)
        kw.setdefault("test_fraction", TEST_FRACTION)  # before it was recorded: the fixed default
        return cls(**kw)

    @classmethod
    def load(cls, run_dir: Path) -> "TrainConfig":
        """The settings a run directory recorded; ``ValueError`` naming the file when unreadable."""
        path = Path(run_dir) / TRAIN_CONFIG_NAME
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            return cls.from_dict(d)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from None


# --- the command line, generated from the fields -------------------------------------------------
def _kind(tp: Any) -> tuple[Any, bool]:
    """(the field's scalar type, whether it may be None)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs -> config overrides; values parsed as JSON when they parse."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig,
                  shown_defaults: Optional[dict[str, str]] = None, **defaults: Any) -> None:
    """One option per field of ``cls`` (a ``TrainConfig``), in argparse groups; ``defaults``
    replace a field's default for this command (e.g. ``main``'s minutes), ``shown_defaults`` how
    --help states them."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "group" not in meta:
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        g = groups[meta["group"]]
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        default = defaults[f.name] if f.name in defaults else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        tp, optional = _kind(hints[f.name])
        kw = dict(meta["argparse"])
        if tp is bool:
            kw["action"] = "store_false" if default else "store_true"
            shown = "on" if default else "off"
        elif f.name == "model_overrides":
            kw.update(action="append", default=[])
            shown = meta["shown"]
        elif typing.get_origin(tp) is tuple:
            item, *rest = typing.get_args(tp)
            if rest and rest[0] is Ellipsis:
                if flag == "--text":
                    kw.update(action="append", default=list(default))
                else:
                    kw.update(nargs="*", default=list(default))
            else:
                kw.update(nargs=len(typing.get_args(tp)), default=list(default))
            kw["type"] = item
            shown = meta["shown"] or " ".join(map(str, default))
        else:
            kw.update(type=tp, default=default)
            shown = meta["shown"] if meta["shown"] and f.name not in defaults else (
                "none" if default is None else str(default))
        if shown_here := (shown_defaults or {}).get(f.name):
            shown = shown_here
        help_text = f"{meta['help']} (default: {shown})"
        g.add_argument(flag, dest=f.name, help=help_text, **kw)


def from_args(args: argparse.Namespace, cls: type = TrainConfig, **extra: Any) -> Any:
    """The ``cls`` the options of ``add_arguments`` describe. Of the budgets, only the one that
    wins is kept (steps, else tokens, else minutes), as the run will use it."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw["model_overrides"] = parse_overrides(kw.get("model_overrides") or [])
    for name in ("sources", "paths", "betas"):
        if name in kw:
            kw[name] = tuple(kw[name])
    if kw.get("steps") is not None:
        kw["tokens"] = kw["minutes"] = None
    elif kw.get("tokens") is not None:
        kw["minutes"] = None
    kw.update(extra)
    return cls(**kw)
