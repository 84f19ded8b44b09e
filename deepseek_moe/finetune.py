"""Supervised fine-tuning of a checkpoint: full, or LoRA on attention and every expert.

``finetune`` is ``train`` from a checkpoint's weights on conversations or prompt/completion pairs
(``data.sft``): the same run directory, checkpoints, exact resume, metrics, plots and layouts. The
loss counts the assistant (completion) tokens only; examples are packed into rows without attention
across their boundaries, or padded one per row.

Defaults are the paper's alignment recipe for DeepSeekMoE 16B Chat (section 6.1): AdamW, a
constant learning rate of 1e-5 (no schedule), 8 epochs, no dropout (the model has none), examples
packed as densely as possible into rows of 4K tokens, and a batch of 1024. The paper counts that
batch in examples; here a batch is counted in rows, which hold one example or more when packed,
so 1024 rows see at least 1024 examples. For the 16B that is 8 rows per micro-batch times 128
accumulated; a smaller model takes rows of min(4096, its context) and a batch of 8 rows. The
paper states no balance-loss weight for fine-tuning; the checkpoint's own is kept (0.001 for the
16B, eq. 12's alpha_1), stated at the start of the run and changed with ``--balance-alpha``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import load_pretrained
from .config import DeepseekMoEConfig
from .data.packing import SequenceSampler
from .data.sft import (FORMATS, SFTRows, collate, file_sha256, read_examples, split_examples)
from .lora import (TARGETS, TRAIN_ALSO, LoRAConfig, add_lora, merge, save_adapter, save_adapter_checkpoint,
                   trainable_counts)
from .parallel.mesh import Layout, ParallelPlan, env_world_size
from .runtime import configure_process
from .train import TrainResult, assemble_run, mean_loss, plan_run, run_to_end, spread, start_dir
from .train_config import BUDGET, RECIPE, RUN, TrainConfig, setting

PAPER_LR = 1e-5
PAPER_EPOCHS = 8.0
PAPER_SEQ_LEN = 4096
PAPER_BATCH = 1024  # rows per optimizer step (the paper: examples)
PAPER_MICRO_BATCH = 8
SMALL_BATCH = 8
SFT, LORA = "fine-tuning data", "LoRA (default: full fine-tuning)"
MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"


def _hidden(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A ``TrainConfig`` field that ``finetune`` sets itself (no command-line option)."""
    if "default_factory" in kw:
        return dataclasses.field(default_factory=kw["default_factory"])
    return dataclasses.field(default=default)


@dataclass
class FinetuneConfig(TrainConfig):
    """``TrainConfig`` for fine-tuning: the model comes from ``checkpoint``, the data from
    ``data``; ``None`` for seq_len, batch_size and grad_accum means the recipe's (see the module)."""

    # set from the checkpoint, not by options
    preset: str = _hidden("")
    model_overrides: dict[str, Any] = _hidden(default_factory=dict)
    data_dir: Optional[str] = _hidden(None)
    sources: tuple[str, ...] = _hidden(())
    paths: tuple[str, ...] = _hidden(())
    tokenizer: Optional[str] = _hidden(None)
    vocab_size: Optional[int] = _hidden(None)
    test_fraction: Optional[float] = _hidden(0.0)
    # the recipe (section 6.1)
    lr: float = setting(PAPER_LR, "learning rate", group=RECIPE)
    schedule: str = setting("constant", "learning-rate schedule: constant (the paper's for fine-tuning) or "
                            "paper (warmup and step decay, as pre-training)", group=RECIPE,
                            choices=["paper", "constant"])
    seq_len: Optional[int] = setting(None, "tokens per row", group=RECIPE,
                                     shown="4096; a smaller model: min(4096, its context)")
    batch_size: Optional[int] = setting(None, "rows per micro-batch, over all processes", group=RECIPE,
                                        shown=str(SMALL_BATCH))
    grad_accum: Optional[int] = setting(None, "micro-batches per optimizer step", group=RECIPE,
                                        shown=f"{PAPER_BATCH // PAPER_MICRO_BATCH} for the 16B (a batch of "
                                        f"{PAPER_BATCH} rows), else 1")
    balance_alpha: Optional[float] = setting(None, "expert-level balance-loss weight (alpha_1, eq. 12)",
                                             group=RECIPE, shown="the checkpoint's")
    epochs: float = setting(PAPER_EPOCHS, "passes over the training rows", group=BUDGET)
    validation_fraction: float = setting(0.0, "share of examples held out for validation, by content hash "
                                         "(0: evaluate on training rows)", group=SFT)
    # the data
    checkpoint: str = _hidden("")
    data: str = setting("", "JSONL: {\"messages\": [{\"role\", \"content\"}, ...]} or {\"prompt\", "
                        "\"completion\"} per line", group=SFT, metavar="FILE", shown="required")
    format: str = setting("auto", "the examples' form (auto: by each line's keys)", group=SFT,
                          choices=list(FORMATS))
    template: Optional[str] = setting(None, "a jinja chat template file, or `released`", group=SFT,
                                      shown="the checkpoint's, else the released one")
    packing: bool = setting(True, "pad each example in its own row instead of packing rows", group=SFT,
                            flag="--no-packing")
    skip_bad: bool = setting(False, "leave out bad examples (reported by line) instead of stopping",
                             group=SFT)
    # LoRA
    lora_rank: int = setting(0, "LoRA rank r (0: full fine-tuning)", group=LORA, metavar="R")
    lora_alpha: Optional[float] = setting(None, "LoRA alpha (the update is alpha/r * B A)", group=LORA,
                                          shown="2 x rank")
    lora_targets: tuple[str, ...] = setting(TARGETS, "layers that get adapters", group=LORA,
                                            choices=list(TARGETS))
    lora_train: tuple[str, ...] = setting((), "also train these whole, saved with the adapters (small "
                                          "models learn much faster with embeddings and head)", group=LORA,
                                          choices=list(TRAIN_ALSO), shown="none")
    merge: bool = setting(False, "also write the model with the adapters merged (OUT/merged)", group=LORA)
    out: str = setting("runs/finetune", "output directory", group=RUN)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lora_targets = tuple(self.lora_targets)
        self.lora_train = tuple(self.lora_train)

    def validate(self) -> None:
        if not self.checkpoint:
            raise ValueError("give the checkpoint to fine-tune")
        if not self.data:
            raise ValueError("give the examples: --data FILE.jsonl")
        if self.epochs <= 0 and self.steps is None and self.tokens is None and self.minutes is None:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_train and not self.lora_rank:
            raise ValueError("--lora-train is for LoRA runs (--lora-rank R); full fine-tuning trains everything")
        if self.merge and not self.lora_rank:
            raise ValueError("--merge is for LoRA runs (--lora-rank R); a full fine-tuning run's "
                             "checkpoints are whole models already")
        if self.steps is None and self.tokens is None and self.minutes is None:
            self.steps = 0  # a placeholder past TrainConfig's check; the epochs set it
            try:
                super().validate()
            finally:
                self.steps = None
        else:
            super().validate()

    def apply_recipe(self, model_cfg: DeepseekMoEConfig) -> None:
        """Fill the fields left to the recipe, for this model."""
        big = is_16b(model_cfg)
        if self.seq_len is None:
            self.seq_len = min(PAPER_SEQ_LEN, model_cfg.max_position_embeddings)
        if self.batch_size is None:
            self.batch_size = PAPER_MICRO_BATCH if big else SMALL_BATCH
        if self.grad_accum is None:
            self.grad_accum = PAPER_BATCH // self.batch_size if big else 1
        if self.lora_rank and self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank


def is_16b(cfg: DeepseekMoEConfig) -> bool:
    """The DeepSeekMoE 16B shape (the released model): 28 layers of width 2048, 64 routed experts."""
    return (cfg.num_hidden_layers, cfg.hidden_size, cfg.n_routed_experts) == (28, 2048, 64)


class SFTData:
    """Fine-tuning rows for the training loop: ``batch(position, n)`` in the sampler's order,
    ``evaluate`` over validation rows."""

    def __init__(self, train: SFTRows, val: SFTRows, seed: int) -> None:
        self.train, self.val = train, val
        self.sampler = SequenceSampler(len(train), seed)
        self.targets = [train.targets(i) for i in range(len(train))]

    def __len__(self) -> int:
        return len(self.train)

    def batch(self, position: int, n: int) -> dict[str, torch.Tensor]:
        return collate([self.train[i] for i in self.sampler.indices(position, n)])

    def loss_scale(self, position: int, local_b: int, rank: int, world: int) -> float:
        """Rows hold different numbers of target tokens: this rank's mean loss, times its share
        of the global micro-batch's targets times ``world``, averages over the ranks to the mean
        over all of them, as one process computes it."""
        if world == 1:
            return 1.0
        counts = [self.targets[i] for i in self.sampler.indices(position, local_b * world)]
        return sum(counts[rank * local_b:(rank + 1) * local_b]) * world / sum(counts)

    def evaluate(self, model, n_rows: int, batch_size: int, device: torch.device) -> float:
        picks = spread(len(self.val), n_rows)
        batches = (collate([self.val[i] for i in picks[s:s + batch_size]]) for s in range(0, len(picks), batch_size))
        return mean_loss(model, batches, device)


def chat_template_for(ckpt: Path, template: Optional[str], tokenizer, say=print):
    """The template that renders the conversations: ``template`` (a file or ``released``), else
    the checkpoint's, else the released one; bound to the tokenizer's bos / eos."""
    from .chat import RELEASED, load_chat_template

    try:
        tpl = load_chat_template(ckpt, template)
    except ValueError:
        if template is not None:
            raise
        say(f"{ckpt} has no chat template: conversations are rendered with the released one")
        tpl = load_chat_template(ckpt, RELEASED)
    return tpl.bind(tokenizer)


def tokenizer_config_text(template) -> str:
    """A ``tokenizer_config.json`` carrying the chat template, so the fine-tuned checkpoint chats
    (``deepseek-moe chat``) in the format it was trained on."""
    import json

    return json.dumps({"bos_token": template.bos_token or None, "eos_token": template.eos_token or None,
                       "chat_template": template.source}, indent=1)


def finetune(cfg: FinetuneConfig, resume: bool = False, force: bool = False, say=print) -> TrainResult:
    """Fine-tune ``cfg.checkpoint`` on ``cfg.data`` into ``cfg.out`` (see the module)."""
    from .data.tokenizer import load_tokenizer
    from .runs import resolve_checkpoint

    if not cfg.checkpoint:
        raise ValueError("give the checkpoint to fine-tune")
    configure_process()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt, _ = resolve_checkpoint(cfg.checkpoint)
    ckpt = ckpt.resolve()
    model_cfg = DeepseekMoEConfig.load(ckpt / "config.json")
    if cfg.balance_alpha is not None:
        model_cfg = model_cfg.replace(aux_loss_alpha=cfg.balance_alpha)
    cfg.apply_recipe(model_cfg)
    cfg.validate()
    cfg.preset = model_cfg.name or ckpt.name
    cfg.checkpoint = str(ckpt)
    plan = ParallelPlan(world=env_world_size(), ep=cfg.expert_parallel, fsdp=cfg.fsdp)
    plan.validate(model_cfg)
    if cfg.lora_rank and plan.world > 1:
        raise ValueError("LoRA runs in one process; full fine-tuning takes torchrun's layouts")
    if cfg.batch_size % plan.world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over {plan.world} processes")
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context of {model_cfg.max_position_embeddings}")
    if not (ckpt / "tokenizer.json").is_file():
        raise ValueError(f"{ckpt} has no tokenizer.json: fine-tuning needs the checkpoint's tokenizer")
    layout = Layout(plan, torch.device(cfg.device))
    try:
        say = say if layout.is_main else (lambda *a, **k: None)
        tokenizer = load_tokenizer(ckpt / "tokenizer.json")
        template = chat_template_for(ckpt, cfg.template, tokenizer, say)
        examples = read_examples(cfg.data, tokenizer, template, cfg.seq_len, cfg.format, cfg.skip_bad, say)
        train_ex, val_ex = split_examples(examples, cfg.validation_fraction)
        pad_id = template.eos_id(tokenizer) or 0
        data = SFTData(SFTRows(train_ex, cfg.seq_len, cfg.packing, pad_id),
                       SFTRows(val_ex, cfg.seq_len, cfg.packing, pad_id), cfg.seed)
        corpus = {"sft_data": str(Path(cfg.data).resolve()), "sha256": file_sha256(cfg.data),
                  "examples": len(examples), "base": str(ckpt)}
        run_plan = plan_run(out, resume, force, say)
        if run_plan.ckpt is not None and (run_plan.state or {}).get("corpus", {}).get("sha256") not in (None, corpus["sha256"]):
            raise ValueError(f"--resume: {cfg.data} has changed since the run started (its sha256 differs)")
        layout.barrier()
        rows = data.train
        say(f"data: {len(examples)} examples ({len(train_ex)} training, "
            f"{'validation: the training rows' if val_ex is train_ex or cfg.validation_fraction <= 0 else f'{len(val_ex)} validation'}) "
            f"-> {len(rows)} rows of {cfg.seq_len} tokens ({'packed' if cfg.packing else 'padded'}, "
            f"{rows.fill:.0%} filled), {rows.target_tokens:,} target tokens")
        if cfg.steps is None and cfg.tokens is None and cfg.minutes is None:
            cfg.steps = max(1, math.ceil(cfg.epochs * len(rows) / (cfg.batch_size * cfg.grad_accum)))
            say(f"budget: {cfg.epochs:g} epochs = {cfg.steps} steps of {cfg.batch_size * cfg.grad_accum} rows")
        start_dir(run_plan, out, layout)
        model = load_pretrained(ckpt, device=layout.device, experts="stacked", aux_loss_alpha=model_cfg.aux_loss_alpha)
        model.train()
        torch.manual_seed(cfg.seed)  # the adapters' initialisation, and anything random after it
        how = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full"
        run_fields: dict[str, Any] = {
            "extra_files": {"tokenizer_config.json": tokenizer_config_text(template)},
            "title": f"fine-tuning ({how}) of {ckpt.parent.parent.name if ckpt.parent.name == 'checkpoints' else ckpt.name}"
                     f" ({cfg.preset}) on {Path(cfg.data).name}",
            "loss_label": "loss on the assistant tokens (nats)"}
        if cfg.lora_rank:
            lcfg = LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_train, str(ckpt),
                              dataclasses.asdict(model.config))
            add_lora(model, lcfg)
            run_fields["save_weights"] = save_adapter_checkpoint
        trainable, total = trainable_counts(model)
        also = f"; {', '.join(cfg.lora_train)} trained whole" if cfg.lora_rank and cfg.lora_train else ""
        say(f"fine-tuning {ckpt}: {'LoRA rank %d (alpha %g) on %s' % (cfg.lora_rank, cfg.lora_alpha, ', '.join(cfg.lora_targets)) if cfg.lora_rank else 'all weights'}{also}; "
            f"trainable parameters {trainable:,} of {total:,} ({trainable / total:.2%}); lr {cfg.lr:g} {cfg.schedule}; "
            f"balance-loss weight alpha_1 = {model_cfg.aux_loss_alpha:g}")
        run = assemble_run(cfg, run_plan, out, model.config, layout, model, data, tokenizer, corpus, **run_fields)
        result = run_to_end(run, t_start)
        if run.main and cfg.lora_rank:
            save_adapter(run.model, out / ADAPTER_DIR)
            say(f"adapter: {out / ADAPTER_DIR}")
        if run.main and cfg.merge and not result.interrupted:
            merge(run.model)
            run.model.save_pretrained(out / MERGED_DIR)
            (out / MERGED_DIR / "tokenizer.json").write_text(tokenizer.to_str())
            (out / MERGED_DIR / "tokenizer_config.json").write_text(tokenizer_config_text(template))
            say(f"merged model: {out / MERGED_DIR}")
        return result
    finally:
        layout.close()


def lora_parameter_count(cfg: DeepseekMoEConfig, rank: int, targets=TARGETS) -> dict[str, int]:
    """Trainable parameters of LoRA rank ``rank`` on a model of ``cfg``, per target, computed
    from the shapes alone (the model is built on the meta device)."""
    from .checkpoint import meta_model

    model = meta_model(cfg)
    counts = {}
    for t in targets:
        m = meta_model(cfg)
        counts[t] = add_lora(m, LoRAConfig(rank, 2.0 * rank, (t,)))
    counts["total"] = sum(counts.values())
    counts["model"] = sum(p.numel() for p in model.parameters())
    return counts
