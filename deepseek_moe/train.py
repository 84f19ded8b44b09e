"""The training loop with the paper's recipe (SPEC section 4), checkpoints and exact resume.

Recipe: AdamW (beta 0.9 / 0.95, weight decay 0.1 on matrices), linear warmup, then the learning
rate times 0.316 at 80% and again at 90% of the steps; gradient clipping at 1.0; init std 0.006;
the balance losses weighted by the config's alphas are part of the model's loss.

Exact resume: the data order is a pure function of (seed, sequences consumed); the checkpoint
holds the weights, AdamW's moments, the step, the data position and the RNG state, so a resumed
run reproduces the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import CheckpointError, load_pretrained
from .model import DeepseekForCausalLM
from .parallel.mesh import Layout, ParallelPlan, env_world_size
from .presets import get_config
from .runtime import (AUTO_DTYPE_ENV, DTYPES, compile_model, configure_process, cpu_matmul_speeds, dtype_name,
                      resolve_dtype)
from .runtime import autocast as runtime_autocast
from .data.corpus import DEFAULT_SOURCES, default_data_dir
from .train_state import (
    complete_checkpoints,
    load_training_state,
    pick_checkpoint,
    read_trainer_state,
    save_training_checkpoint,
    write_text_atomic,
)

DECAY_MULTIPLIER = 0.316
DECAY_AT = (0.8, 0.9)
REPLAN_AT = 10  # a wall-clock budget is re-planned after this many timed steps (and half way)
REPLAN_WINDOW = 50  # ... from the mean time of at most this many of the latest steps


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``train_config.json`` in the output directory."""

    preset: str = "deepseekmoe-tiny"
    out: str = "runs/tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data
    data_dir: Optional[str] = None  # default: $XDG_CACHE_HOME/deepseek-moe/data
    sources: tuple[str, ...] = DEFAULT_SOURCES
    paths: tuple[str, ...] = ()
    tokenizer: Optional[str] = None  # an existing tokenizer.json; else one is trained
    vocab_size: Optional[int] = None  # BPE size to train (default: the model's vocab_size)
    validation_fraction: float = 0.005  # of documents, chosen by content hash
    test_fraction: float = 0.005
    # batch and budget (exactly one of steps / tokens / minutes; steps wins)
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: Optional[int] = None
    tokens: Optional[int] = None
    minutes: Optional[float] = None
    stop_after: Optional[int] = None  # stop this invocation at this step (schedule unchanged)
    # the recipe
    lr: float = 1.08e-3
    warmup_steps: Optional[int] = None  # default min(2000, 10% of steps)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    # bookkeeping
    ckpt_every: int = 200
    keep: int = 3
    eval_every: int = 0  # 0: only at the end
    eval_sequences: int = 64
    device: str = "cpu"
    dtype: str = "auto"  # autocast: auto (the faster on this CPU, bf16 on GPUs), float32, bfloat16
    bf16_autocast: bool = False  # the same as dtype="bfloat16" (the --bf16 of earlier versions)
    compile: bool = False  # torch.compile the model (fullgraph; the grouped_mm experts backend)
    progress: bool = True
    # layout (torchrun): batch_size is the global batch, split evenly over the processes
    expert_parallel: int = 1  # processes per expert-parallel group
    fsdp: bool = False  # FSDP2 for the dense parameters

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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


# --- the recipe -----------------------------------------------------------------------------------
def default_warmup(total_steps: int) -> int:
    """The paper warms up over 2K of 25K+ steps; short runs warm up over 10% of their steps."""
    return max(1, min(2000, total_steps // 10))


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``peak`` over
    ``warmup`` steps, then x0.316 from 80% of ``total`` and x0.316 again from 90%."""
    if step < warmup:
        return peak * (step + 1) / warmup
    lr = peak
    for frac in DECAY_AT:
        if step >= frac * total:
            lr *= DECAY_MULTIPLIER
    return lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear, expert, router and embedding weights), none on norm
    weights and biases: the usual split for AdamW in LLM training."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        foreach=False,  # the same kernel path on every run keeps resume bit-exact
    )


# --- expert-load statistics -------------------------------------------------------------------
def load_stats(tokens_per_expert_LE: torch.Tensor) -> dict[str, list[float]]:
    """Per MoE layer: coefficient of variation, max/mean of the token counts, idle experts."""
    if tokens_per_expert_LE.numel() == 0:
        return {"load_cv": [], "load_max_over_mean": [], "idle_experts": []}
    load = tokens_per_expert_LE.double()
    mean = load.mean(-1)
    return {
        "load_cv": (load.std(-1, unbiased=False) / mean).tolist(),
        "load_max_over_mean": (load.max(-1).values / mean).tolist(),
        "idle_experts": (load == 0).sum(-1).tolist(),
    }


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(model: DeepseekForCausalLM, dataset, n_sequences: int, batch_size: int,
                  device: torch.device) -> float:
    """Mean next-token loss over ``n_sequences`` sequences spread evenly over ``dataset`` (the
    split is stored document by document, so its first sequences would all be one domain)."""
    n = min(n_sequences, len(dataset))
    if n == 0:
        raise ValueError("the validation split holds no complete sequence; use a larger corpus "
                         "or a shorter seq_len")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    picks = [i * len(dataset) // n for i in range(n)]
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i] for i in picks[start:start + batch_size]]).to(device)
        out = model(x, labels=x)
        k = x.shape[0] * (x.shape[1] - 1)
        total += out.lm_loss.item() * k
        count += k
    model.train(was_training)
    return total / count


# --- the run --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: Path
    step: int
    total_steps: int
    tokens: int
    val_loss: Optional[float]
    checkpoint: Optional[Path]
    interrupted: bool
    seconds: float
    plots: list[Path] = field(default_factory=list)
    train_seconds: float = 0.0  # in the training loop (no data preparation, final eval or save)
    budget_seconds: Optional[float] = None  # a wall-clock budget, when the run had one


class _StopFlag:
    """Ctrl-C sets a flag; the loop finishes its step, saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.stop = False
        self._old = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupt: finishing this step, saving a checkpoint ...", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# What ``train`` writes into its output directory; ``--force`` deletes these, and only these.
RUN_FILES = ("train_config.json", "model_config.json", "metrics.jsonl", "loss_curve.png",
             "expert_load.png", "checkpoints")


@dataclass
class _RunPlan:
    ckpt: Optional[Path]  # the checkpoint to resume from
    state: Optional[dict[str, Any]]  # its trainer state
    delete: list[Path]  # the previous run's files, removed before starting over


def _describe(out: Path, names: list[str]) -> str:
    parts = []
    for n in names:
        if n == "checkpoints":
            done = complete_checkpoints(out / n)
            parts.append(f"checkpoints/ ({len(done)} complete" + (f", newest {done[-1].name})" if done else ")"))
        else:
            parts.append(n + ("/" if (out / n).is_dir() else ""))
    return ", ".join(parts)


def plan_run(out: Path, resume: bool, force: bool, say=print) -> _RunPlan:
    """Decide what a ``train`` into ``out`` does, before any work, refusing what would lose data.

    - no ``resume``: ``out`` must be empty (hidden entries aside) unless ``force``, which deletes
      the previous run's own files (``RUN_FILES``) and keeps everything else;
    - ``resume``: the newest checkpoint that is whole (``pick_checkpoint``), saying which newer
      ones it skipped; with none, an error unless ``force`` (start over as above).
    """
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    ours = [n for n in entries if n in RUN_FILES]
    if resume:
        ckpt, skipped = pick_checkpoint(out / "checkpoints")
        for bad, why in skipped:
            say(f"--resume: skipping {bad}: {why}")
        if ckpt is not None:
            return _RunPlan(ckpt, read_trainer_state(ckpt), [])
        if not force:
            found = f" ({_describe(out, ours)})" if ours else ""
            raise ValueError(f"--resume: no complete checkpoint to resume under {out / 'checkpoints'}{found}; "
                             "add --force to start over instead")
        say(f"--resume --force: no complete checkpoint under {out / 'checkpoints'}; starting over")
    elif entries and not force:
        others = [n for n in entries if n not in RUN_FILES]
        what = _describe(out, ours) if ours else ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        hint = ("--resume continues that run, --force starts over (deleting "
                + ", ".join(ours) + ")") if ours else "choose an empty --out, or --force to train beside them"
        raise ValueError(f"refusing to start a new run in {out}: it already holds {what}; {hint}")
    if ours:
        say(f"--force: deleting the previous run's {_describe(out, ours)} in {out}")
    return _RunPlan(None, None, [out / n for n in ours])


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output directory {out} is not writable: {e}") from None


def _read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Per-step rows up to the checkpoint; end-of-invocation summaries are written again.
    return [r for r in rows if r.get("step", 0) <= upto_step and not r.get("final")]


_PROBED: dict[tuple, tuple[Optional[torch.dtype], str]] = {}  # one probe per model and batch shape


def _choose_dtype(choice: str, device: torch.device, model: torch.nn.Module, model_cfg, train_set, sampler,
                  cfg: TrainConfig, layout: "Layout") -> tuple[Optional[torch.dtype], str]:
    """The autocast dtype of this run (None: plain fp32) and why.

    ``auto`` on a CPU whose matmul runs bf16 clearly faster (``runtime.fastest_cpu_dtype``) times
    this model's own training step (forward and backward of the first micro-batch, best of two,
    the slowest rank's time) in fp32 and in bf16 autocast and takes the faster: small layers can
    be slower in bf16 even where big GEMMs are several times faster. The probe changes no weight,
    gradient, data position or random state.
    """
    from .data import batch

    dtype = resolve_dtype(choice, device)
    if choice != "auto" or device.type != "cpu" or dtype is None:
        return dtype, ""
    if os.environ.get(AUTO_DTYPE_ENV):
        return dtype, f"${AUTO_DTYPE_ENV}"
    local_b = cfg.batch_size // layout.world
    key = (json.dumps(dataclasses.asdict(model_cfg), sort_keys=True, default=str), local_b, cfg.seq_len,
           layout.world)
    if key in _PROBED:
        return _PROBED[key]
    x = batch(train_set, sampler, layout.rank * local_b, local_b).to(device)
    rng = torch.get_rng_state()

    def seconds(dt: Optional[torch.dtype]) -> float:
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            with runtime_autocast(dt, device):
                out = model(x, labels=x)
            out.loss.backward()
            best = min(best, time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        return layout.max(best)

    t32, t16 = seconds(None), seconds(torch.bfloat16)
    torch.set_rng_state(rng)
    speeds = cpu_matmul_speeds()
    chosen = torch.bfloat16 if t16 < t32 else None
    why = (f"--dtype auto: this CPU's matmul runs bf16 at {speeds['bfloat16'] / speeds['float32']:.1f}x fp32; "
           f"this model's step took {t32:.3f} s in fp32, {t16:.3f} s in bf16")
    _PROBED[key] = (chosen, why)
    return chosen, why


def _resume(ckpt: Path, cfg: TrainConfig, model_cfg, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, layout: "Layout", device: torch.device) -> dict[str, Any]:
    """Load ``ckpt`` into the model and optimizer, whatever layout either was saved or is now in;
    returns the trainer state."""
    from .config import DeepseekMoEConfig
    from .parallel.checkpoint import is_distributed_checkpoint, load_distributed_state, load_full_state
    from .train_state import read_trainer_state

    state = read_trainer_state(ckpt)
    saved_cfg = DeepseekMoEConfig.load(ckpt / "config.json")
    if saved_cfg.replace(name="", dispatch="fast") != model_cfg.replace(name="", dispatch="fast"):
        raise CheckpointError(f"{ckpt}: its model config differs from this run's preset "
                              f"{cfg.preset!r} with overrides {cfg.model_overrides}")
    if is_distributed_checkpoint(ckpt):  # sharded state: DCP reshards it to this layout
        load_distributed_state(ckpt, model, optimizer)
        return state
    _, opt_sd = load_training_state(ckpt)
    loaded = load_pretrained(ckpt, device=device)
    if not layout.active:
        model.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(opt_sd)
    else:  # a single-process checkpoint: every rank takes its slice of the full state
        full_opt = build_optimizer(loaded, cfg)
        full_opt.load_state_dict(opt_sd)
        load_full_state(model, optimizer, loaded, full_opt)
    return state


def train(cfg: TrainConfig, resume: bool = False, force: bool = False) -> TrainResult:
    """Train ``cfg.preset`` on the prepared corpus; returns where everything was written.

    A new run needs an empty ``cfg.out``; ``resume`` continues the newest whole checkpoint there;
    ``force`` starts over, deleting the previous run's files (see ``plan_run``).

    Under torchrun (or with ``fsdp``) the run is laid out over the processes (see
    ``deepseek_moe.parallel``); rank 0 writes the metrics, plots and checkpoint files.
    """
    cfg.validate()
    configure_process()  # as every command does (a no-op when the CLI did it already)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    device = torch.device(cfg.device)
    t_start = time.perf_counter()

    # ---- model config and layout: every check before any work ----
    model_cfg = get_config(cfg.preset, **cfg.model_overrides)
    if model_cfg.max_position_embeddings < cfg.seq_len:
        model_cfg = model_cfg.replace(max_position_embeddings=cfg.seq_len)
    plan = ParallelPlan(world=env_world_size(), ep=cfg.expert_parallel, fsdp=cfg.fsdp)
    plan.validate(model_cfg)
    if cfg.batch_size % plan.world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) does not split evenly over "
                         f"{plan.world} processes")
    layout = Layout(plan, device)
    try:
        say = print if layout.is_main else (lambda *a, **k: None)
        run_plan = plan_run(out, resume, force, say)  # every rank decides alike, before any deletion
        layout.barrier()
        return _train(cfg, run_plan, out, ckpt_root, device, t_start, model_cfg, layout)
    finally:
        layout.close()


def _train(cfg: TrainConfig, run_plan: _RunPlan, out: Path, ckpt_root: Path, device: torch.device,
           t_start: float, model_cfg, layout: "Layout") -> TrainResult:
    from .data import PackedSequences, SequenceSampler, batch, check_corpus, corpus_record, prepare_data

    main = layout.is_main
    say = print if main else (lambda *a, **k: None)
    ckpt = run_plan.ckpt
    if main:
        for p in run_plan.delete:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        _check_writable(out)
    # ---- data: rank 0 builds the cache, the others then open it ----
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    # A resumed run keeps its token ids: the checkpoint's own tokenizer, whatever data_dir holds now.
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else None
    if ckpt is not None and (ckpt / "tokenizer.json").is_file():
        tok_path = ckpt / "tokenizer.json"

    def prepare(progress: bool):
        return prepare_data(
            data_dir, vocab_size=cfg.vocab_size or model_cfg.vocab_size, sources=cfg.sources,
            paths=cfg.paths, tokenizer_path=tok_path, progress=progress,
            validation_fraction=cfg.validation_fraction, test_fraction=cfg.test_fraction,
        )

    if main:
        tokenizer, cache = prepare(cfg.progress)
        layout.barrier()
    else:
        import contextlib
        import io

        layout.barrier()
        with contextlib.redirect_stdout(io.StringIO()):
            tokenizer, cache = prepare(False)
    corpus = corpus_record(cache)
    if ckpt is not None:
        if run_plan.state.get("corpus"):
            check_corpus(run_plan.state["corpus"], cache, f"--resume from {ckpt}")
        else:
            say(f"note: {ckpt} records no corpus fingerprint (an older run); it cannot be checked")
    vocab = tokenizer.get_vocab_size()
    if vocab > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}: train a smaller tokenizer or raise vocab_size"
        )
    train_set = PackedSequences(cache.tokens("train"), cfg.seq_len)
    val_set = PackedSequences(cache.tokens("validation"), cfg.seq_len)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"the training split holds {len(train_set)} sequences of {cfg.seq_len} "
                         f"tokens, fewer than one batch of {cfg.batch_size}")
    sampler = SequenceSampler(len(train_set), cfg.seed)

    # ---- model, layout, optimizer, resume ----
    torch.manual_seed(cfg.seed)
    model = DeepseekForCausalLM(model_cfg).to(device)
    if layout.active:
        from .parallel.data_parallel import apply_fsdp
        from .parallel.expert_parallel import apply_expert_parallel

        if cfg.expert_parallel > 1 and model_cfg.n_device_groups != cfg.expert_parallel:
            say(f"device-level balance loss: experts grouped by their {cfg.expert_parallel} "
                f"expert-parallel ranks (the config says n_device_groups={model_cfg.n_device_groups})")
        apply_expert_parallel(model, layout.mesh)
        if cfg.fsdp:
            apply_fsdp(model, layout.world_mesh)
        say(f"layout: {layout.world} processes, mesh dp={layout.plan.dp} x ep={layout.plan.ep}"
            f"{', FSDP2 for dense parameters' if cfg.fsdp else ''}")
    optimizer = build_optimizer(model, cfg)  # FSDP2: before any forward (sharded parameters)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    start_step, position, total_steps, metrics = 0, 0, None, []
    warmup_saved = None  # a resumed run keeps the schedule it started with
    if ckpt is not None:
        state = _resume(ckpt, cfg, model_cfg, model, optimizer, layout, device)
        start_step, position, total_steps = state["step"], state["position"], state["total_steps"]
        warmup_saved = state.get("warmup_steps")
        torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
        metrics = _read_metrics(out / "metrics.jsonl", start_step)
        say(f"resumed from {ckpt} at step {start_step} ({position * cfg.seq_len:,} tokens)")
    elif cfg.steps is not None:
        total_steps = cfg.steps
    elif cfg.tokens is not None:
        total_steps = math.ceil(cfg.tokens / cfg.tokens_per_step)
    warmup = warmup_saved if warmup_saved is not None else cfg.warmup_steps

    # Arithmetic: a resumed run keeps the dtype it was started with (exact resume), unless forced.
    # (checkpoints from before the choice existed were trained in fp32 unless --bf16)
    saved_dtype = run_plan.state.get("dtype", "float32") if ckpt is not None else None
    choice = saved_dtype if saved_dtype is not None and cfg.dtype_choice == "auto" else cfg.dtype_choice
    if saved_dtype is not None and choice != saved_dtype:
        say(f"note: the run was started in {saved_dtype}; it continues in {choice}")
    compute_dtype, why = _choose_dtype(choice, device, model, model_cfg, train_set, sampler, cfg, layout)
    say(f"arithmetic: {dtype_name(compute_dtype)}{' autocast' if compute_dtype is not None else ''}"
        + (f" ({why})" if why else ""))
    autocast = runtime_autocast(compute_dtype, device)
    step_model = model
    if cfg.compile:
        if compute_dtype != torch.bfloat16:
            raise ValueError("--compile runs the experts on grouped_mm, which torch.compile takes in bf16 "
                             f"only, but this run computes in {dtype_name(compute_dtype)}: add --dtype bfloat16")
        step_model = compile_model(model)

    def train_step(position: int) -> tuple[dict[str, Any], int]:
        """One optimizer step's forward/backward over ``grad_accum`` micro-batches."""
        sums: dict[str, Any] = {"loss": 0.0, "lm_loss": 0.0, "tpe": None, "dropped": None,
                                "exp": None, "dev": None}
        local_b = cfg.batch_size // layout.world  # this rank's share of the global batch
        for _ in range(cfg.grad_accum):
            x = batch(train_set, sampler, position + layout.rank * local_b, local_b).to(device)
            position += cfg.batch_size
            with autocast:
                o = step_model(x, labels=x)
            # One process stops at once; ranks decide together after the reduction below.
            if not layout.active and not torch.isfinite(o.loss):
                raise FloatingPointError(f"the loss is {o.loss.item()} at data position {position}")
            (o.loss / cfg.grad_accum).backward()
            sums["loss"] += o.loss.item() / cfg.grad_accum
            sums["lm_loss"] += o.lm_loss.item() / cfg.grad_accum
            for key, val in (("tpe", o.tokens_per_expert), ("dropped", o.dropped_tokens),
                             ("exp", o.expert_balance_loss.detach() / cfg.grad_accum),
                             ("dev", o.device_balance_loss.detach() / cfg.grad_accum)):
                sums[key] = val if sums[key] is None else sums[key] + val
        if layout.active:
            from .parallel.data_parallel import sync_gradients

            sync_gradients(model, layout.mesh, cfg.fsdp)
            sums["loss"], sums["lm_loss"] = layout.mean([sums["loss"], sums["lm_loss"]])
            if sums["tpe"] is not None and sums["tpe"].numel():
                sums["tpe"], sums["dropped"] = layout.sum_(sums["tpe"]), layout.sum_(sums["dropped"])
                sums["exp"] = layout.sum_(sums["exp"].float()) / layout.world
                sums["dev"] = layout.sum_(sums["dev"].float()) / layout.world
            if not math.isfinite(sums["loss"]):
                raise FloatingPointError(f"the loss is {sums['loss']} at data position {position}")
        return sums, position

    # ---- a wall-clock budget becomes a step count, planned from the run's own steps: a first
    # (dropped) step gives a provisional plan, then the timed training steps re-plan it at
    # REPLAN_AT steps (warmup included) and again half way (the decay steps come after) ----
    budget_s = None
    if total_steps is None:
        budget_s = cfg.minutes * 60
        t0 = time.perf_counter()
        train_step(0)
        optimizer.zero_grad(set_to_none=True)
        first = layout.max(time.perf_counter() - t0)  # every rank must plan the same steps
        total_steps = max(1, int(budget_s / first))
        say(f"budget {cfg.minutes} min: {total_steps} steps provisionally ({first:.2f} s for a "
            f"first step of {cfg.tokens_per_step:,} tokens); re-planned from the timed steps")
    warmup_fixed = warmup is not None
    warmup = default_warmup(total_steps) if warmup is None else warmup
    train_tokens = len(train_set) * cfg.seq_len
    planned = total_steps * cfg.tokens_per_step
    if planned > train_tokens:
        say(f"warning: {planned:,} tokens planned but the training split holds "
              f"{train_tokens:,}: data will repeat ({planned / train_tokens:.2f} epochs)")
    if main:
        write_text_atomic(out / "train_config.json", cfg.to_json())
        model_cfg.save(out / "model_config.json")

    # ---- the loop ----
    from tqdm.auto import tqdm

    metrics_path = out / "metrics.jsonl"
    if main:
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in metrics))
    end_step = total_steps if cfg.stop_after is None else min(total_steps, cfg.stop_after)
    bar = tqdm(total=end_step, initial=start_step, disable=not (cfg.progress and main), unit="step",
               dynamic_ncols=True)
    model.train()
    step = start_step
    last_ckpt: Optional[Path] = None
    val_loss: Optional[float] = None
    interrupted = False

    def checkpoint() -> Path:
        state = {"position": position, "total_steps": total_steps, "warmup_steps": warmup,
                 "seed": cfg.seed, "preset": cfg.preset, "val_loss": val_loss, "corpus": corpus,
                 "dtype": dtype_name(compute_dtype)}
        extra = {"tokenizer.json": tokenizer.to_str()}
        if layout.active:
            from .parallel.checkpoint import save_distributed_checkpoint

            return save_distributed_checkpoint(ckpt_root, step, model, optimizer, model_cfg, state,
                                               keep=cfg.keep, extra_files=extra)
        return save_training_checkpoint(ckpt_root, step, model, optimizer, state, keep=cfg.keep,
                                        extra_files=extra)

    def evaluate() -> float:
        # Every rank runs the same sequences: expert parallelism and FSDP need them all.
        loss = evaluate_loss(model, val_set, cfg.eval_sequences, cfg.batch_size, device)
        if layout.active and cfg.fsdp:
            from .parallel.data_parallel import reshard

            reshard(model)
        return loss

    # A wall-clock budget is also a hard limit, should the machine slow down after calibration.
    deadline = None if cfg.minutes is None or cfg.steps or cfg.tokens else (
        time.perf_counter() + 1.5 * cfg.minutes * 60)
    import contextlib

    t_loop = time.perf_counter()
    step_times: list[float] = []
    replans = 0

    def replan_due() -> bool:
        if budget_s is None or replans >= 2:
            return False
        return step >= (min(REPLAN_AT, max(1, total_steps - 1)) if replans == 0 else total_steps // 2)

    def replan() -> None:
        """Set the step count that fills the wall-clock budget from the mean of the latest timed
        steps (the first two, slower while buffers are allocated, left out)."""
        nonlocal total_steps, end_step, warmup, replans
        timed = (step_times[2:] or step_times)[-REPLAN_WINDOW:]
        per_step = layout.max(sum(timed) / len(timed))
        left = budget_s - (time.perf_counter() - t_loop)
        total_steps = max(step, step + int(left / per_step))
        if not warmup_fixed and replans == 0:
            warmup = default_warmup(total_steps)
        replans += 1
        end_step = total_steps if cfg.stop_after is None else min(total_steps, cfg.stop_after)
        bar.total = end_step
        bar.refresh()
        say(f"\nbudget {cfg.minutes} min: {total_steps} steps at {per_step:.3f} s/step "
            f"(mean of the last {len(timed)} timed steps)")

    with _StopFlag() as flag, (open(metrics_path, "a") if main else contextlib.nullcontext()) as log:
        while step < end_step:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, warmup, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            sums, position = train_step(position)
            if layout.active:
                from .parallel.data_parallel import clip_grad_norm_

                grad_norm = clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            step_times.append(dt)
            row: dict[str, Any] = {
                "step": step, "tokens": step * cfg.tokens_per_step, "loss": sums["loss"],
                "lm_loss": sums["lm_loss"], "lr": lr, "grad_norm": grad_norm.item(),
                "tokens_per_s": cfg.tokens_per_step / dt, "epoch": position / len(train_set),
            }
            if sums["tpe"] is not None and sums["tpe"].numel():
                row["expert_balance_loss"] = sums["exp"].tolist()
                row["device_balance_loss"] = sums["dev"].tolist()
                row["dropped_tokens"] = sums["dropped"].tolist()
                row["tokens_per_expert"] = sums["tpe"].tolist()
                row.update(load_stats(sums["tpe"]))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < end_step:
                row["val_loss"] = evaluate()
            if main:
                log.write(json.dumps(row) + "\n")
                log.flush()
            metrics.append(row)
            post = {"loss": f"{row['lm_loss']:.3f}", "lr": f"{lr:.2e}",
                    "tok/s": f"{row['tokens_per_s']:,.0f}"}
            if "load_cv" in row:
                post["cv"] = f"{sum(row['load_cv']) / len(row['load_cv']):.2f}"
            bar.set_postfix(post)
            bar.update(1)
            if layout.any(flag.stop):
                interrupted = True
                break
            if deadline is not None and layout.any(time.perf_counter() > deadline):
                say(f"\nstopping at step {step}: 1.5x the {cfg.minutes} min budget has passed "
                      "(the machine slowed down); --resume finishes the schedule")
                interrupted = True
                break
            if replan_due():
                replan()
                if step >= end_step:
                    break
            if step % cfg.ckpt_every == 0 and step < end_step:
                last_ckpt = checkpoint()
        bar.close()
        train_seconds = time.perf_counter() - t_loop
        val_loss = evaluate()
        final = {"step": step, "tokens": step * cfg.tokens_per_step, "val_loss": val_loss,
                 "final": True}
        if main:
            log.write(json.dumps(final) + "\n")
        metrics.append(final)
        last_ckpt = checkpoint()

    plots: list[Path] = []
    if not main:
        return TrainResult(out, step, total_steps, step * cfg.tokens_per_step, val_loss, last_ckpt,
                           interrupted, time.perf_counter() - t_start, plots, train_seconds, budget_s)
    try:
        from .plots import plot_expert_load, plot_loss_curve

        title = f"{cfg.preset}: {model_cfg.num_hidden_layers} layers, hidden {model_cfg.hidden_size}"
        plots = [plot_loss_curve(metrics, out / "loss_curve.png", title),
                 plot_expert_load(metrics, model_cfg, out / "expert_load.png")]
        plots = [p for p in plots if p is not None]
    except ImportError as e:  # matplotlib is a runtime dependency; say so if it is missing
        say(f"plots skipped: {e}")
    return TrainResult(out, step, total_steps, step * cfg.tokens_per_step, val_loss, last_ckpt,
                       interrupted, time.perf_counter() - t_start, plots, train_seconds, budget_s)
