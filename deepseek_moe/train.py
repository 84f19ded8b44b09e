"""The training loop with the paper's recipe (section 4.1 and Appendix A), checkpoints and exact
resume.

Recipe: AdamW (beta 0.9 / 0.95, weight decay 0.1 on matrices), linear warmup, then the learning
rate times 0.316 at 80% and again at 90% of the steps; gradient clipping at 1.0; init std 0.006;
the balance losses (eq. 12 and 15) weighted by the config's alphas are part of the model's loss.

Exact resume: the data order is a pure function of (seed, sequences consumed); the checkpoint
holds the weights, AdamW's moments, the step, the data position and the RNG state, so a resumed
run reproduces the uninterrupted one bit for bit on CPU.

The run in four named steps: ``_build_run`` (data, model, layout, optimizer, resume, arithmetic),
``_train_step`` (one optimizer step's forward and backward), ``_Budget`` (a wall-clock budget as a
step count, calibrated from the run's own steps) and ``_loop``. What differs under
torch.distributed sits behind ``Layout``'s methods, which are plain calls for one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_pretrained
from .config import DeepseekMoEConfig
from .data import PackedSequences, SequenceSampler, batch, check_corpus, corpus_record, prepare_data
from .model import DeepseekForCausalLM
from .parallel.mesh import Layout, ParallelPlan, env_world_size
from .presets import get_config
from .runtime import AUTO_DTYPE_ENV, compile_model, configure_process, cpu_matmul_speeds, dtype_name, resolve_dtype
from .runtime import autocast as runtime_autocast
from .train_config import TRAIN_CONFIG_NAME, TrainConfig
from .train_state import complete_checkpoints, load_training_state, pick_checkpoint, read_trainer_state
from .atomic import write_text_atomic

__all__ = ["TrainConfig", "TrainResult", "train", "build_optimizer", "param_groups", "lr_at",
           "default_warmup", "load_stats", "evaluate_loss", "plan_run", "RUN_FILES"]

DECAY_MULTIPLIER = 0.316
DECAY_AT = (0.8, 0.9)
REPLAN_AT = 10  # a wall-clock budget is re-planned after this many timed steps (and half way)
REPLAN_WINDOW = 50  # ... from the mean time of at most this many of the latest steps


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


def fused_adamw_serves(params: Iterable[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel (one operation per parameter) can update ``params``: plain
    CPU or CUDA tensors. Sharded parameters (FSDP2's DTensors) take the per-operation loop."""
    dtensor = None
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor as dtensor
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
               and not (dtensor is not None and isinstance(p, dtensor)) for p in params)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW of the paper's recipe. Where it serves (``fused_adamw_serves``), the fused kernel:
    on the CPU one pass per parameter instead of a dozen, measured 4.8x faster a step on the
    tiny MoE preset (11M parameters: 43 -> 9 ms, a twentieth of its training step). Either way the
    same kernel path on every run, so a resumed run stays bit-exact."""
    groups = param_groups(model, cfg.weight_decay)
    fused = fused_adamw_serves(p for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": False}))


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
def spread(n_rows: int, n: int) -> list[int]:
    """``n`` row indices spread evenly over ``n_rows`` (a split is stored document by document,
    so its first rows would all be one domain)."""
    n = min(n, n_rows)
    return [i * n_rows // n for i in range(n)]


@torch.no_grad()
def mean_loss(model: DeepseekForCausalLM, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Mean next-token loss over every target token (label not -100) of ``batches``, each the
    keyword arguments of the model's forward."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        out = model(**b)
        k = int((b["labels"][:, 1:] != -100).sum())
        if k:
            total += out.lm_loss.item() * k
            count += k
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation rows hold no target token")
    return total / count


def evaluate_loss(model: DeepseekForCausalLM, dataset, n_sequences: int, batch_size: int,
                  device: torch.device) -> float:
    """Mean next-token loss over ``n_sequences`` sequences of ``dataset`` (``spread``)."""
    if min(n_sequences, len(dataset)) == 0:
        raise ValueError("the validation split holds no complete sequence; use a larger corpus "
                         "or a shorter seq_len")
    picks = spread(len(dataset), n_sequences)
    batches = ({"input_ids": x, "labels": x} for x in
               (torch.stack([dataset[i] for i in picks[s:s + batch_size]]) for s in range(0, len(picks), batch_size)))
    return mean_loss(model, batches, device)


class LMData:
    """Pre-training data: windows of the token cache in the sampler's order; labels = inputs."""

    def __init__(self, train_set: PackedSequences, val_set: PackedSequences, seed: int) -> None:
        self.train_set, self.val_set = train_set, val_set
        self.sampler = SequenceSampler(len(train_set), seed)

    def __len__(self) -> int:
        return len(self.train_set)

    def batch(self, position: int, n: int) -> dict[str, torch.Tensor]:
        x = batch(self.train_set, self.sampler, position, n)
        return {"input_ids": x, "labels": x}

    def evaluate(self, model: DeepseekForCausalLM, n_sequences: int, batch_size: int, device: torch.device) -> float:
        return evaluate_loss(model, self.val_set, n_sequences, batch_size, device)

    def loss_scale(self, position: int, local_b: int, rank: int, world: int) -> float:
        return 1.0  # every row has seq_len - 1 targets


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
             "expert_load.png", "checkpoints", "adapter", "merged")  # the last two: finetune's


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



# --- building the run -----------------------------------------------------------------------------
@dataclass
class _Run:
    """A run in progress: what ``_build_run`` made once, and the state the loop advances."""

    cfg: TrainConfig
    model_cfg: DeepseekMoEConfig
    layout: Layout
    out: Path
    device: torch.device
    tokenizer: Any
    corpus: dict[str, Any]  # what the data is, checked on resume
    data: Any  # LMData, or fine-tuning's rows: len(), batch(position, n), evaluate(...)
    model: DeepseekForCausalLM
    step_model: torch.nn.Module  # the model, or its compiled form
    optimizer: torch.optim.Optimizer
    compute_dtype: Optional[torch.dtype]  # autocast's dtype; None: plain fp32
    # advanced by the loop
    step: int
    position: int  # sequences consumed (all ranks)
    total_steps: Optional[int]
    warmup: Optional[int]
    metrics: list[dict[str, Any]]
    val_loss: Optional[float] = None  # the final validation loss, once evaluated
    checkpoint: Optional[Path] = None  # the newest checkpoint this invocation wrote
    extra_files: dict[str, str] = field(default_factory=dict)  # name -> text, into every checkpoint
    save_weights: Optional[Any] = None  # (model, folder) -> None: how a checkpoint holds the weights
    title: Optional[str] = None  # of the plots (default: the preset and its size)
    loss_label: str = "next-token loss (nats)"  # what the loss curve's loss is

    @property
    def main(self) -> bool:
        return self.layout.is_main

    def say(self, *args: Any, **kw: Any) -> None:
        if self.main:
            print(*args, **kw)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def micro_batch(self, position: int) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's share of the global micro-batch at data ``position``: the model's forward
        arguments (input_ids, labels, ...), and the factor that makes this rank's mean LM loss
        its share of the global micro-batch's mean once the ranks' gradients are averaged (1 when
        every row has as many target tokens, as in pre-training)."""
        local_b, rank, world = self.cfg.batch_size // self.layout.world, self.layout.rank, self.layout.world
        b = self.data.batch(position + rank * local_b, local_b)
        return {k: v.to(self.device) for k, v in b.items()}, self.data.loss_scale(position, local_b, rank, world)

    def evaluate(self) -> float:
        # Every rank runs the same sequences: expert parallelism and FSDP need them all.
        loss = self.data.evaluate(self.model, self.cfg.eval_sequences, self.cfg.batch_size, self.device)
        self.layout.after_evaluation(self.model)
        return loss

    def save_checkpoint(self) -> Path:
        state = {"position": self.position, "total_steps": self.total_steps, "warmup_steps": self.warmup,
                 "seed": self.cfg.seed, "preset": self.cfg.preset, "val_loss": self.val_loss,
                 "corpus": self.corpus, "dtype": dtype_name(self.compute_dtype)}
        self.checkpoint = self.layout.save_checkpoint(
            self.out / "checkpoints", self.step, self.model, self.optimizer, state, keep=self.cfg.keep,
            extra_files={"tokenizer.json": self.tokenizer.to_str(), **self.extra_files},
            save_weights=self.save_weights)
        return self.checkpoint


def _prepare_data(cfg: TrainConfig, model_cfg: DeepseekMoEConfig, layout: Layout, run_plan: _RunPlan):
    """(tokenizer, token cache, corpus record): rank 0 builds the cache, the others then open it.
    A resumed run keeps its token ids: the checkpoint's own tokenizer, whatever the data folder
    holds now, and the corpus it recorded."""
    ckpt = run_plan.ckpt
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else None
    if ckpt is not None and (ckpt / "tokenizer.json").is_file():
        tok_path = ckpt / "tokenizer.json"

    def prepare(progress: bool):
        return prepare_data(
            cfg.data_path, vocab_size=cfg.vocab_size or model_cfg.vocab_size, sources=cfg.sources,
            paths=cfg.paths, tokenizer_path=tok_path, progress=progress,
            validation_fraction=cfg.validation_fraction, test_fraction=cfg.test_fraction,
        )

    if layout.is_main:
        tokenizer, cache = prepare(cfg.progress)
        layout.barrier()
    else:
        layout.barrier()
        with contextlib.redirect_stdout(io.StringIO()):
            tokenizer, cache = prepare(False)
    corpus = corpus_record(cache)
    if ckpt is not None:
        if run_plan.state.get("corpus"):
            check_corpus(run_plan.state["corpus"], cache, f"--resume from {ckpt}")
        elif layout.is_main:
            print(f"note: {ckpt} records no corpus fingerprint (an older run); it cannot be checked")
    vocab = tokenizer.get_vocab_size()
    if vocab > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}: train a smaller tokenizer or raise vocab_size"
        )
    return tokenizer, cache, corpus


def _build_run(cfg: TrainConfig, run_plan: _RunPlan, out: Path, model_cfg: DeepseekMoEConfig,
               layout: Layout) -> _Run:
    """Data, model, layout, optimizer, the resumed state and the arithmetic: everything the loop
    needs, every check done."""
    start_dir(run_plan, out, layout)
    tokenizer, cache, corpus = _prepare_data(cfg, model_cfg, layout, run_plan)
    train_set = PackedSequences(cache.tokens("train"), cfg.seq_len)
    val_set = PackedSequences(cache.tokens("validation"), cfg.seq_len)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"the training split holds {len(train_set)} sequences of {cfg.seq_len} "
                         f"tokens, fewer than one batch of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    model = DeepseekForCausalLM(model_cfg).to(layout.device)
    return assemble_run(cfg, run_plan, out, model_cfg, layout, model, LMData(train_set, val_set, cfg.seed),
                        tokenizer, corpus)


def start_dir(run_plan: _RunPlan, out: Path, layout: Layout) -> None:
    """Delete what ``plan_run`` said to delete, and check ``out`` is writable (the main rank)."""
    if layout.is_main:
        for p in run_plan.delete:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        _check_writable(out)


def assemble_run(cfg: TrainConfig, run_plan: _RunPlan, out: Path, model_cfg: DeepseekMoEConfig, layout: Layout,
                 model: DeepseekForCausalLM, data: Any, tokenizer: Any, corpus: dict[str, Any],
                 **run_fields: Any) -> _Run:
    """The run of ``model`` (initialised or loaded, its trainable parameters those with
    ``requires_grad``) on ``data``: laid out, its optimizer built, the checkpoint of ``run_plan``
    resumed, its arithmetic chosen. ``run_fields``: ``_Run``'s optional fields."""
    device = layout.device
    say = print if layout.is_main else (lambda *a, **k: None)
    layout.parallelize(model, say)
    optimizer = build_optimizer(model, cfg)  # FSDP2: before any forward (sharded parameters)
    step, position, total_steps, metrics, warmup = 0, 0, None, [], cfg.warmup_steps
    ckpt = run_plan.ckpt
    if ckpt is not None:
        state = _resume(ckpt, cfg, model_cfg, model, optimizer, layout, device)
        step, position, total_steps = state["step"], state["position"], state["total_steps"]
        if state.get("warmup_steps") is not None:  # a resumed run keeps the schedule it started with
            warmup = state["warmup_steps"]
        torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
        metrics = _read_metrics(out / "metrics.jsonl", step)
        say(f"resumed from {ckpt} at step {step} ({position * cfg.seq_len:,} tokens)")
    elif cfg.steps is not None:
        total_steps = cfg.steps
    elif cfg.tokens is not None:
        total_steps = math.ceil(cfg.tokens / cfg.tokens_per_step)

    run = _Run(cfg, model_cfg, layout, out, device, tokenizer, corpus, data,
               model, model, optimizer, None, step, position, total_steps, warmup, metrics, **run_fields)
    # Arithmetic: a resumed run keeps the dtype it was started with (exact resume), unless forced.
    # (checkpoints from before the choice existed were trained in fp32 unless --bf16)
    saved_dtype = run_plan.state.get("dtype", "float32") if ckpt is not None else None
    choice = saved_dtype if saved_dtype is not None and cfg.dtype_choice == "auto" else cfg.dtype_choice
    if saved_dtype is not None and choice != saved_dtype:
        say(f"note: the run was started in {saved_dtype}; it continues in {choice}")
    run.compute_dtype, why = _choose_dtype(choice, run)
    say(f"arithmetic: {dtype_name(run.compute_dtype)}{' autocast' if run.compute_dtype is not None else ''}"
        + (f" ({why})" if why else ""))
    if cfg.compile:
        if run.compute_dtype != torch.bfloat16:
            raise ValueError("--compile runs the experts on grouped_mm, which torch.compile takes in bf16 "
                             f"only, but this run computes in {dtype_name(run.compute_dtype)}: add --dtype bfloat16")
        if run.device.type == "cpu":
            say("note: --compile runs the experts on grouped_mm, which on the CPU is slower than "
                "the default eager experts (it is for GPUs)")
        run.step_model = compile_model(model)
    return run


_PROBED: dict[tuple, tuple[Optional[torch.dtype], str]] = {}  # one probe per model and batch shape


def _choose_dtype(choice: str, run: _Run) -> tuple[Optional[torch.dtype], str]:
    """The autocast dtype of this run (None: plain fp32) and why.

    ``auto`` on a CPU whose matmul runs bf16 clearly faster (``runtime.fastest_cpu_dtype``) times
    this model's own training step (forward and backward of the first micro-batch, best of two,
    the slowest rank's time) in fp32 and in bf16 autocast and takes the faster: small layers can
    be slower in bf16 even where big GEMMs are several times faster. The probe changes no weight,
    gradient, data position or random state.
    """
    dtype = resolve_dtype(choice, run.device)
    if choice != "auto" or run.device.type != "cpu" or dtype is None:
        return dtype, ""
    if os.environ.get(AUTO_DTYPE_ENV):
        return dtype, f"${AUTO_DTYPE_ENV}"
    layout, cfg = run.layout, run.cfg
    key = (json.dumps(dataclasses.asdict(run.model_cfg), sort_keys=True, default=str),
           cfg.batch_size // layout.world, cfg.seq_len, layout.world)
    if key in _PROBED:
        return _PROBED[key]
    b = {k: v.to(run.device) for k, v in run.data.batch(layout.rank * key[1], key[1]).items()}
    rng = torch.get_rng_state()

    def seconds(dt: Optional[torch.dtype]) -> float:
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            with runtime_autocast(dt, run.device):
                out = run.model(**b)
            out.loss.backward()
            best = min(best, time.perf_counter() - t0)
        run.model.zero_grad(set_to_none=True)
        return layout.max(best)

    t32, t16 = seconds(None), seconds(torch.bfloat16)
    torch.set_rng_state(rng)
    speeds = cpu_matmul_speeds()
    chosen = torch.bfloat16 if t16 < t32 else None
    why = (f"--dtype auto: this CPU's matmul runs bf16 at {speeds['bfloat16'] / speeds['float32']:.1f}x fp32; "
           f"this model's step took {t32:.3f} s in fp32, {t16:.3f} s in bf16")
    _PROBED[key] = (chosen, why)
    return chosen, why


def _resume(ckpt: Path, cfg: TrainConfig, model_cfg: DeepseekMoEConfig, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, layout: Layout, device: torch.device) -> dict[str, Any]:
    """Load ``ckpt`` into the model and optimizer, whatever layout either was saved or is now in;
    returns the trainer state."""
    from .parallel.checkpoint import is_distributed_checkpoint, load_distributed_state, load_full_state

    from .lora import is_adapter_dir, load_adapter_weights

    state = read_trainer_state(ckpt)
    if is_adapter_dir(ckpt):  # a LoRA run's checkpoint: its adapters and their optimizer state
        load_adapter_weights(model, ckpt)
        optimizer.load_state_dict(load_training_state(ckpt)[1])
        return state
    saved_cfg = DeepseekMoEConfig.load(ckpt / "config.json")
    if saved_cfg.replace(name="", dispatch="fast") != model_cfg.replace(name="", dispatch="fast"):
        raise CheckpointError(f"{ckpt}: its model config differs from this run's preset "
                              f"{cfg.preset!r} with overrides {cfg.model_overrides}")
    if is_distributed_checkpoint(ckpt):  # sharded state: DCP reshards it to this layout
        load_distributed_state(ckpt, model, optimizer)
        return state
    _, opt_sd = load_training_state(ckpt)
    loaded = load_pretrained(ckpt, device=device, experts="stacked")  # the training layout
    if not layout.active:
        model.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(opt_sd)
    else:  # a single-process checkpoint: every rank takes its slice of the full state
        full_opt = build_optimizer(loaded, cfg)
        full_opt.load_state_dict(opt_sd)
        load_full_state(model, optimizer, loaded, full_opt)
    return state


# --- one training step --------------------------------------------------------------------------
@dataclass
class _StepStats:
    """One optimizer step's losses (means over the global batch) and expert-load sums."""

    loss: float = 0.0
    lm_loss: float = 0.0
    tokens_per_expert: Optional[torch.Tensor] = None  # [L, E] summed over micro-batches and ranks
    dropped: Optional[torch.Tensor] = None
    expert_balance: Optional[torch.Tensor] = None
    device_balance: Optional[torch.Tensor] = None

    def add(self, o: Any, loss: torch.Tensor, share: float, lm_scale: float = 1.0) -> None:
        """One micro-batch's output ``o``, the ``loss`` it backpropagated, its ``share`` of the
        step and its LM loss's factor (``_Run.micro_batch``)."""
        self.loss += loss.item() * share
        self.lm_loss += o.lm_loss.item() * lm_scale * share
        for name, val in (("tokens_per_expert", o.tokens_per_expert), ("dropped", o.dropped_tokens),
                          ("expert_balance", o.expert_balance_loss.detach() * share),
                          ("device_balance", o.device_balance_loss.detach() * share)):
            have = getattr(self, name)
            setattr(self, name, val if have is None else have + val)

    @property
    def has_moe(self) -> bool:
        return self.tokens_per_expert is not None and self.tokens_per_expert.numel() > 0


def _train_step(run: _Run, position: int) -> tuple[_StepStats, int]:
    """Forward and backward of one optimizer step (``grad_accum`` micro-batches from data
    ``position``), gradients synchronised over the layout; returns the step's statistics and the
    data position after it. A non-finite loss stops the run with the position where it appeared."""
    cfg, layout = run.cfg, run.layout
    stats = _StepStats()
    share = 1.0 / cfg.grad_accum
    for _ in range(cfg.grad_accum):
        b, lm_scale = run.micro_batch(position)
        position += cfg.batch_size
        with runtime_autocast(run.compute_dtype, run.device):
            o = run.step_model(**b)
        loss = o.loss if lm_scale == 1.0 else o.lm_loss * lm_scale + o.aux_loss
        (loss / cfg.grad_accum).backward()
        stats.add(o, loss, share, lm_scale)
    layout.sync_gradients(run.model)
    stats.loss, stats.lm_loss = layout.mean([stats.loss, stats.lm_loss])
    if stats.has_moe:  # ranks agree on the global batch's statistics
        stats.tokens_per_expert = layout.sum_(stats.tokens_per_expert)
        stats.dropped = layout.sum_(stats.dropped)
        stats.expert_balance = layout.sum_(stats.expert_balance.float()) / layout.world
        stats.device_balance = layout.sum_(stats.device_balance.float()) / layout.world
    if not math.isfinite(stats.loss):
        raise FloatingPointError(f"the loss is {stats.loss} at data position {position}")
    return stats, position


def _metrics_row(run: _Run, stats: _StepStats, lr: float, grad_norm: torch.Tensor, seconds: float) -> dict[str, Any]:
    cfg = run.cfg
    row: dict[str, Any] = {
        "step": run.step, "tokens": run.step * cfg.tokens_per_step, "loss": stats.loss,
        "lm_loss": stats.lm_loss, "lr": lr, "grad_norm": grad_norm.item(),
        "tokens_per_s": cfg.tokens_per_step / seconds, "epoch": run.position / len(run.data),
    }
    if stats.has_moe:
        row["expert_balance_loss"] = stats.expert_balance.tolist()
        row["device_balance_loss"] = stats.device_balance.tolist()
        row["dropped_tokens"] = stats.dropped.tolist()
        row["tokens_per_expert"] = stats.tokens_per_expert.tolist()
        row.update(load_stats(stats.tokens_per_expert))
    return row


# --- a wall-clock budget as a step count -----------------------------------------------------------
class _Budget:
    """A run given minutes instead of steps. A first (dropped) step gives a provisional step count;
    the timed training steps re-plan it at ``REPLAN_AT`` steps (warmup included) and again half way
    (the decay steps come after). It is also a hard limit: 1.5x the budget stops the run, should
    the machine slow down after calibration (``--resume`` finishes the schedule)."""

    def __init__(self, run: _Run) -> None:
        cfg = run.cfg
        self.minutes = cfg.minutes
        self.seconds: Optional[float] = None  # the budget to plan, when the step count is not known
        self.hard_limit = cfg.minutes is not None and not cfg.steps and not cfg.tokens
        self.deadline: Optional[float] = None
        self.warmup_fixed = run.warmup is not None
        self.replans = 0
        self.step_times: list[float] = []
        self.t_loop = 0.0
        self.train_seconds = 0.0  # in the loop: no data preparation, final evaluation or save

    def start(self) -> None:
        """The loop starts: the clock of the re-plans and of the hard limit."""
        self.t_loop = time.perf_counter()
        if self.hard_limit:
            self.deadline = self.t_loop + 1.5 * self.minutes * 60

    def calibrate(self, run: _Run) -> None:
        """A provisional ``run.total_steps`` from one untimed step (no update, no data consumed)."""
        if run.total_steps is not None:
            return
        self.seconds = self.minutes * 60
        t0 = time.perf_counter()
        _train_step(run, 0)
        run.optimizer.zero_grad(set_to_none=True)
        first = run.layout.max(time.perf_counter() - t0)  # every rank must plan the same steps
        run.total_steps = max(1, int(self.seconds / first))
        run.say(f"budget {self.minutes} min: {run.total_steps} steps provisionally ({first:.2f} s for a "
                f"first step of {run.cfg.tokens_per_step:,} tokens); re-planned from the timed steps")

    def overrun(self, run: _Run) -> bool:
        if self.deadline is None or not run.layout.any(time.perf_counter() > self.deadline):
            return False
        run.say(f"\nstopping at step {run.step}: 1.5x the {self.minutes} min budget has passed "
                "(the machine slowed down); --resume finishes the schedule")
        return True

    def replan_due(self, step: int, total_steps: int) -> bool:
        if self.seconds is None or self.replans >= 2:
            return False
        return step >= (min(REPLAN_AT, max(1, total_steps - 1)) if self.replans == 0 else total_steps // 2)

    def replan(self, run: _Run) -> None:
        """Set the step count that fills the budget from the mean of the latest timed steps (the
        first two, slower while buffers are allocated, left out)."""
        timed = (self.step_times[2:] or self.step_times)[-REPLAN_WINDOW:]
        per_step = run.layout.max(sum(timed) / len(timed))
        left = self.seconds - (time.perf_counter() - self.t_loop)
        run.total_steps = max(run.step, run.step + int(left / per_step))
        if not self.warmup_fixed and self.replans == 0:
            run.warmup = default_warmup(run.total_steps)
        self.replans += 1
        run.say(f"\nbudget {self.minutes} min: {run.total_steps} steps at {per_step:.3f} s/step "
                f"(mean of the last {len(timed)} timed steps)")


# --- the loop --------------------------------------------------------------------------------------
def _end_step(run: _Run) -> int:
    stop = run.cfg.stop_after
    return run.total_steps if stop is None else min(run.total_steps, stop)


def _loop(run: _Run, budget: _Budget) -> bool:
    """Optimizer steps until the end step, a checkpoint every ``ckpt_every``, then the final
    validation and checkpoint; returns whether the run was interrupted (Ctrl-C or the deadline)."""
    cfg, layout = run.cfg, run.layout
    metrics_path = run.out / "metrics.jsonl"
    if run.main:
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in run.metrics))
    end_step = _end_step(run)
    bar = tqdm(total=end_step, initial=run.step, disable=not (cfg.progress and run.main), unit="step",
               dynamic_ncols=True)
    run.model.train()
    interrupted = False
    budget.start()
    with _StopFlag() as flag, (open(metrics_path, "a") if run.main else contextlib.nullcontext()) as log:
        while run.step < end_step:
            t0 = time.perf_counter()
            lr = lr_at(run.step, cfg.lr, run.warmup, run.total_steps) if cfg.schedule == "paper" else cfg.lr
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            stats, run.position = _train_step(run, run.position)
            grad_norm = layout.clip_grad_norm_(run.model, run.params, cfg.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            dt = time.perf_counter() - t0
            budget.step_times.append(dt)
            row = _metrics_row(run, stats, lr, grad_norm, dt)
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < end_step:
                row["val_loss"] = run.evaluate()
            if run.main:
                log.write(json.dumps(row) + "\n")
                log.flush()
            run.metrics.append(row)
            _show(bar, row)
            if layout.any(flag.stop) or budget.overrun(run):
                interrupted = True
                break
            if budget.replan_due(run.step, run.total_steps):
                budget.replan(run)
                end_step = bar.total = _end_step(run)
                bar.refresh()
                if run.step >= end_step:
                    break
            if run.step % cfg.ckpt_every == 0 and run.step < end_step:
                run.save_checkpoint()
        bar.close()
        budget.train_seconds = time.perf_counter() - budget.t_loop
        run.val_loss = run.evaluate()
        final = {"step": run.step, "tokens": run.step * cfg.tokens_per_step, "val_loss": run.val_loss,
                 "final": True}
        if run.main:
            log.write(json.dumps(final) + "\n")
        run.metrics.append(final)
        run.save_checkpoint()
    return interrupted


def _show(bar: Any, row: dict[str, Any]) -> None:
    post = {"loss": f"{row['lm_loss']:.3f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
    if "load_cv" in row:
        post["cv"] = f"{sum(row['load_cv']) / len(row['load_cv']):.2f}"
    bar.set_postfix(post)
    bar.update(1)


def _plots(run: _Run) -> list[Path]:
    try:
        from .plots import plot_expert_load, plot_loss_curve

        title = run.title or (f"{run.cfg.preset}: {run.model_cfg.num_hidden_layers} layers, "
                              f"hidden {run.model_cfg.hidden_size}")
        plots = [plot_loss_curve(run.metrics, run.out / "loss_curve.png", title, run.loss_label),
                 plot_expert_load(run.metrics, run.model_cfg, run.out / "expert_load.png")]
        return [p for p in plots if p is not None]
    except ImportError as e:  # matplotlib is a runtime dependency; say so if it is missing
        run.say(f"plots skipped: {e}")
        return []


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
    t_start = time.perf_counter()

    # model config and layout: every check before any work
    model_cfg = get_config(cfg.preset, **cfg.model_overrides)
    if model_cfg.max_position_embeddings < cfg.seq_len:
        model_cfg = model_cfg.replace(max_position_embeddings=cfg.seq_len)
    plan = ParallelPlan(world=env_world_size(), ep=cfg.expert_parallel, fsdp=cfg.fsdp)
    plan.validate(model_cfg)
    if cfg.batch_size % plan.world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) does not split evenly over "
                         f"{plan.world} processes")
    layout = Layout(plan, torch.device(cfg.device))
    try:
        say = print if layout.is_main else (lambda *a, **k: None)
        run_plan = plan_run(out, resume, force, say)  # every rank decides alike, before any deletion
        layout.barrier()
        run = _build_run(cfg, run_plan, out, model_cfg, layout)
        return run_to_end(run, t_start, warn_repeats=True)
    finally:
        layout.close()


def run_to_end(run: _Run, t_start: float, warn_repeats: bool = False) -> TrainResult:
    """Plan the budget, record the run's settings, train to the end step, plot; the result."""
    cfg, out = run.cfg, run.out
    budget = _Budget(run)
    budget.calibrate(run)
    if run.warmup is None:
        run.warmup = default_warmup(run.total_steps)
    planned, held = run.total_steps * cfg.tokens_per_step, len(run.data) * cfg.seq_len
    if warn_repeats and planned > held:
        run.say(f"warning: {planned:,} tokens planned but the training split holds "
                f"{held:,}: data will repeat ({planned / held:.2f} epochs)")
    if run.main:
        write_text_atomic(out / TRAIN_CONFIG_NAME, cfg.to_json())
        run.model_cfg.save(out / "model_config.json")
    interrupted = _loop(run, budget)
    plots = _plots(run) if run.main else []
    return TrainResult(out, run.step, run.total_steps, run.step * cfg.tokens_per_step, run.val_loss,
                       run.checkpoint, interrupted, time.perf_counter() - t_start, plots,
                       budget.train_seconds, budget.seconds)
