"""`mmtune train`: the training recipe (align / instruct stages) on accelerate; `train(cfg)` runs it.

    mmtune train CONFIG.yaml [--output-dir DIR] [--max-steps N] [--resume-from latest|PATH] [key.sub=value ...]

One process on CPU or one GPU as is; several through `accelerate launch` (or
`torchrun`), each process reading its own share of the data. The recipe:

1. config -> `DIR/run_config.yaml`; a resumed run picks its checkpoint
   (`latest` = the highest complete `DIR/checkpoint-STEP`).
2. model: `build_model` (or `load_model` of the checkpoint), LoRA if asked,
   `set_trainable(stage)`; what trains is printed with parameter counts.
3. data: `ExampleStream` (JSONL and/or webdataset shards, split by rank) ->
   `Batcher` (length grouping / packing), streamed endlessly over epochs; the
   number of steps is `train.max_steps`, or `num_epochs` worth of batches
   counted in one pass before training.
4. loop: gradient accumulation through `accelerator.accumulate`, clipping,
   AdamW + cosine/constant schedule with warmup, one metrics row per
   `log_every` steps, checkpoints every `save_every` steps and at the end.

What stops a run, and what it leaves: SIGTERM/SIGINT -> a checkpoint of the
step just finished, exit code 143; NaN/inf loss -> `NonFiniteLossError`
naming the step, nothing saved for it (the last good checkpoint stays
`latest`); CUDA out of memory -> `TrainingOOMError` naming the batch and the
settings to lower, after saving the last completed step. Resuming restores
weights, optimizer, scheduler, RNG and the data position, so the losses of an
interrupted-and-resumed run equal those of an uninterrupted one. The command
line (flags, overrides, exit codes) is `mmtune/cli/train.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmtune import runs
from mmtune.config import (
    RunConfig,
    check_input_files,
    to_dict,
    validate_config,
)
from mmtune.errors import MMTuneError
from mmtune.train import checkpoint as ckpt
from mmtune.train.guards import (
    FaultInjector,
    NonFiniteLossError,
    StopSignal,
    TrainingOOMError,
    describe_batch,
    free_accelerator_memory,
    oom_message,
)
from mmtune.train.handshake import Processes, save_together
from mmtune.train.metrics import BatchTrace, MetricsLogger, plot_loss_curve
from mmtune.train.optim import build_optimizer, build_scheduler, resolve_mixed_precision
from mmtune.train.param_groups import describe_groups, norm_parameter_names
from mmtune.train.precision import (
    dtype_name,
    keep_trainable_fp32,
    optimizer_state_dtype,
)
from mmtune.train.sharding import (
    fsdp_requested,
    load_sharded,
    save_sharded,
    shard_model,
    wrap_plan,
)

log = logging.getLogger("mmtune.train")

STATE_FORMAT = "mmtune.trainer/1"
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, checkpoint saved


@dataclass
class TrainResult:
    """What a finished (or cleanly stopped) run leaves behind."""

    output_dir: Path
    step: int
    total_steps: int
    last_checkpoint: Path | None
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when stopped early
    last_loss: float | None = None
    skip_counts: dict[str, int] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.stopped_by is None and self.step >= self.total_steps


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #


def train(cfg: RunConfig, *, overwrite: bool = False) -> TrainResult:
    """Run (or resume) training as `cfg` says; see the module docstring.

    A fresh run (no `train.resume_from`) into a folder that already holds
    something is refused, unless `overwrite`: then the old contents are moved
    aside and deleted only once the new run has saved a checkpoint (they are
    put back when it fails before that).
    """
    _check_config(cfg)
    _check_output_dir(cfg, overwrite)
    previous = _move_previous_run(cfg) if overwrite else None
    try:
        result = _train(cfg)
    except BaseException:
        if previous is not None:
            _restore_previous_run(cfg, previous)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return result


def _check_output_dir(cfg: RunConfig, overwrite: bool) -> None:
    """The output rule (mmtune.outputs) for a run folder, and no fresh run over an existing one."""
    from mmtune.outputs import Out, check_outputs

    tc, mc = cfg.train, cfg.model
    out = Path(tc.output_dir)
    inputs = [*(("data.train", p) for p in cfg.data.train_paths()), *(("data.eval", p) for p in cfg.data.eval),
              *(("model.tokenizer.train_files", p) for p in mc.tokenizer.train_files)]
    runs = []
    for what, value in (("model.lm.name_or_path", mc.lm.name_or_path),
                        ("model.tokenizer.name_or_path", mc.tokenizer.name_or_path),
                        ("projector checkpoint (model.projector.checkpoint)", mc.projector.checkpoint)):
        if value and Path(value).exists():
            runs.append((what, value))
    if tc.resume_from and tc.resume_from != "latest" and Path(tc.resume_from).exists():
        start = Path(tc.resume_from).resolve()
        if start != out.resolve() and out.resolve() not in start.parents:  # resuming another run's checkpoint
            runs.append(("checkpoint to resume (train.resume_from)", tc.resume_from))
    check_outputs([Out(out, "train.output_dir", "folder", whole=overwrite)], inputs=inputs, runs=runs)
    if tc.resume_from or overwrite or not out.is_dir():
        return
    held = sorted(p.name for p in out.iterdir())
    if held:
        raise MMTuneError(
            f"{out}: already holds a run ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
            "continue it with --resume-from latest, replace it with --overwrite, or choose another --output-dir")


def _move_previous_run(cfg: RunConfig) -> Path | None:
    """--overwrite: the old run folder goes aside (not deleted) on the main process."""
    from mmtune.fileio import temp_sibling

    out = Path(cfg.train.output_dir)
    if int(os.environ.get("RANK", "0")) != 0 or not out.is_dir() or not any(out.iterdir()):
        return None
    previous = temp_sibling(out, "previous")
    os.replace(out, previous)
    print(f"mmtune train: --overwrite: the previous run is kept in {previous} until this one saves", file=sys.stderr)
    return previous


def _restore_previous_run(cfg: RunConfig, previous: Path) -> None:
    out = Path(cfg.train.output_dir)
    if out.is_dir() and ckpt.latest_checkpoint(out) is not None:
        print(f"mmtune train: the run failed after saving a checkpoint; the previous run is still in {previous}",
              file=sys.stderr)
        return
    shutil.rmtree(out, ignore_errors=True)
    os.replace(previous, out)
    print(f"mmtune train: the run failed before saving; {out} holds the previous run again", file=sys.stderr)


def _train(cfg: RunConfig) -> TrainResult:
    from accelerate import Accelerator

    precision = resolve_mixed_precision(cfg.train.mixed_precision, *_stored_dtype(cfg))
    # Several processes without CUDA (torchrun / accelerate on CPU): accelerate
    # only sets up its gloo process group when told the run is on CPU.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    from mmtune.train.trackers import TRACKERS_DIR, check_trackers

    report_to = check_trackers(cfg.train.report_to)  # before anything is built: a missing package is one line
    accelerator = Accelerator(
        cpu=multi_cpu,
        log_with=report_to or None,
        project_dir=str(Path(cfg.train.output_dir) / TRACKERS_DIR) if report_to else None,
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=precision,
        # The schedule is stepped here once per optimizer step, not by accelerate
        # (which would step it once per process).
        step_scheduler_with_optimizer=False,
    )
    recipe = _Recipe(cfg, accelerator)
    finished = False
    try:
        result = recipe.run()
        finished = True
        return result
    finally:
        recipe.close()
        # After an error that only this process met (out of memory on one GPU) the others are inside a
        # collective of the step, and a closing barrier would wait for them forever. Without one, this
        # process exits and the launcher (torchrun / accelerate) stops the others.
        _release_accelerator(accelerator, barrier=finished)


def _stored_dtype(cfg: RunConfig) -> tuple[torch.dtype | None, str]:
    """The dtype frozen weights are stored in, and the config key that sets it (QLoRA: the compute dtype)."""
    from mmtune.model.build import resolve_dtype

    q = cfg.model.lm.quantization
    key = "model.lm.quantization.compute_dtype" if q.bits else "model.lm.dtype"
    dtype = resolve_dtype(q.compute_dtype if q.bits else cfg.model.lm.dtype)
    return (dtype if isinstance(dtype, torch.dtype) else None), key


def _check_config(cfg: RunConfig) -> None:
    """What loading checked (again, for configs built in code), the input files, and what a run needs."""
    validate_config(cfg)
    check_input_files(cfg)
    if not cfg.data.train:
        raise MMTuneError("data.train is empty: give unified-record JSONL files or shard patterns")
    tc = cfg.train
    if cfg.model.lm.quantization.bits:
        from mmtune.model.build import check_quantization

        check_quantization(cfg.model.lm)  # one line, before anything loads (e.g. no CUDA)
        if not tc.lora.enabled:
            raise MMTuneError("model.lm.quantization (QLoRA) trains a LoRA adapter on the frozen k-bit LM: "
                              "set train.lora.enabled=true")
        if tc.distributed == "fsdp":
            raise MMTuneError("model.lm.quantization with train.distributed=fsdp is not supported: QLoRA runs "
                              "one model copy per GPU (DDP)")
    if (tc.eval_every or tc.save_best) and not cfg.data.eval:
        raise MMTuneError("train.eval_every / train.save_best need data.eval: validation records or shards")


def _release_accelerator(accelerator: Any, *, barrier: bool = True) -> None:
    """End the process group and forget accelerate's singletons (so a second run in-process works).

    `barrier=False` on the error path: the other processes may never reach it.
    """
    from accelerate.state import AcceleratorState, GradientState

    # DDP's reducer (and its gloo work) must be gone before the process group is
    # destroyed, or the interpreter can abort at exit: drop accelerate's references too.
    accelerator.free_memory()
    gc.collect()
    try:
        if barrier and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()
        accelerator.end_training()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# --------------------------------------------------------------------------- #
# The recipe
# --------------------------------------------------------------------------- #


class _Recipe:
    def __init__(self, cfg: RunConfig, accelerator: Any) -> None:
        self.cfg = cfg
        self.tc = cfg.train
        self.acc = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.main = accelerator.is_main_process
        self.out = Path(self.tc.output_dir)
        # One process has nothing to shard (and no process group): it trains unsharded.
        self.fsdp = fsdp_requested(self.tc.distributed) and self.world > 1
        if fsdp_requested(self.tc.distributed) and self.world == 1:
            log.warning("train.distributed=fsdp with one process: nothing to shard, training unsharded")
        self.faults = FaultInjector(rank=self.rank)
        self.metrics: MetricsLogger | None = None
        self.trace: BatchTrace | None = None
        self._log_handlers: list[logging.Handler] = []
        self._log_level = logging.NOTSET
        self.model: Any = None
        self.ddp_model: Any = None
        self.batcher: Any = None
        self._rng_to_restore: dict[str, Any] | None = None
        self.optimizer: Any = None
        self._group_lines = ""
        self.scheduler: Any = None
        self.bundle: Any = None
        self.step = 0
        self.total_steps = 0
        self.tokens = 0
        self.examples = 0
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.last_loss: float | None = None
        self.skip_counts: dict[str, int] = {}
        self.validation: Any = None
        self.best_loss: float | None = None

    # ------------------------------------------------------------------ setup
    def run(self) -> TrainResult:
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            raise MMTuneError(
                "accelerate config uses DeepSpeed; mmtune shards with FSDP2 instead: choose FSDP in `accelerate "
                "config` (or multi-GPU and set train.distributed=fsdp)"
            )
        self._prepare_output_dir()
        self._setup_logging()
        self.resumed_from = ckpt.resolve_resume(self.tc.resume_from, self.out)
        state = ckpt.read_trainer_state(self.resumed_from) if self.resumed_from else None
        if state is not None and int(state.get("world_size", 1)) != self.world:
            raise MMTuneError(
                f"{self.resumed_from} was written by {state.get('world_size')} process(es), this run has "
                f"{self.world}: resume with the same number of processes (the data split depends on it)"
            )
        if state is not None and bool(state.get("sharded", False)) != self.fsdp:
            raise MMTuneError(
                f"{self.resumed_from} was written by a {'sharded (FSDP)' if state.get('sharded') else 'DDP / one-process'} "
                f"run and this run is {'FSDP' if self.fsdp else 'not sharded'}: resume with the same train.distributed "
                "(or consolidate it with `mmtune consolidate` and start from its weights)"
            )
        if state is not None and state.get("stage", self.tc.stage) != self.tc.stage:
            raise MMTuneError(
                f"{self.resumed_from} is a stage {state.get('stage')} checkpoint and this run is stage {self.tc.stage}: "
                f"to start {self.tc.stage} from it, set model.projector.checkpoint={self.resumed_from} instead of "
                "resume_from"
            )
        if self.resumed_from is None and self.tc.resume_from == "latest":
            log.info("resume_from=latest: no checkpoint in %s yet, starting fresh", self.out)

        self._build_model()
        self._build_data()
        if self.cfg.data.eval:
            from mmtune.train.validate import ValidationSet

            self.validation = ValidationSet(self.cfg, self.bundle, rank=self.rank, world_size=self.world)
        self.total_steps = self._count_total_steps()
        norms = norm_parameter_names(self.model)
        if self.fsdp:
            # FSDP2: shard first, then the optimizer over the sharded (DTensor) parameters;
            # accelerate does not wrap the model (it would add DDP on top).
            shard_model(self.model, self.acc.mixed_precision)
            self.optimizer = build_optimizer(self.model.named_parameters(), self.tc, norms)
            self.ddp_model = self.model
        else:
            self.optimizer = build_optimizer(self.model.named_parameters(), self.tc, norms)
        self._group_lines = describe_groups(self.optimizer.param_groups)
        self.scheduler = build_scheduler(self.optimizer, self.tc, self.total_steps)
        if not self.fsdp:
            self.ddp_model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if state is not None:
            self._load_training_state(self.resumed_from, state)
        resume_step = self.step if state is not None else None
        self.best_loss = self._previous_best(resume_step)
        # train.report_to goes through accelerate's trackers; without it, DIR/tb when tensorboard is installed
        self.metrics = MetricsLogger(self.out, enabled=self.main, resume_step=resume_step,
                                     tensorboard=not self.tc.report_to)
        self._init_trackers()
        self.trace = BatchTrace(self.out, self.rank, resume_step=resume_step)
        self._announce()
        with StopSignal() as stop:
            return self._loop(stop)

    def _prepare_output_dir(self) -> None:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in ckpt.remove_stale_temps(self.out):
                print(f"mmtune train: removed {stale}, left by an interrupted save", file=sys.stderr)
            runs.write_run_config(self.cfg, self.out)
        self.acc.wait_for_everyone()

    def _setup_logging(self) -> None:
        """mmtune's log (skipped record ids, checkpoints, stops) goes to DIR/train.log (+ warnings on stderr)."""
        root = logging.getLogger("mmtune")
        self._log_level = root.level
        root.setLevel(logging.INFO)
        name = runs.log_file(self.rank)
        fh = logging.FileHandler(self.out / name, encoding="utf-8")
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers: list[logging.Handler] = [fh]
        if self.main:
            handlers.append(_TqdmHandler(logging.WARNING))
        for h in handlers:
            root.addHandler(h)
        self._log_handlers = handlers

    def _build_model(self) -> None:
        from accelerate.utils import set_seed

        from mmtune.model.build import build_model
        from mmtune.model.io import load_model
        from mmtune.model.lora import apply_lora

        set_seed(self.tc.seed)  # random-init parts are seeded by the caller
        if self.resumed_from is not None:
            # A sharded checkpoint's weights are read after sharding (_load_training_state).
            # Remote code only on the user's word: their own config, never the checkpoint's copy of it.
            mc = self.cfg.model
            bundle = load_model(self.resumed_from, sharded_weights=False,
                                trust_remote_code=mc.lm.trust_remote_code or mc.tokenizer.trust_remote_code)
            if to_dict(bundle.config) != to_dict(self.cfg.model):
                diff = _dict_diff(to_dict(self.cfg.model), to_dict(bundle.config), "model")
                raise MMTuneError(f"cannot resume from {self.resumed_from}: the model config changed ({diff})")
        else:
            bundle = build_model(self.cfg.model, corpus=self._tokenizer_corpus())
            if self.cfg.model.projector.checkpoint:
                log.info("projector initialised from %s", self.cfg.model.projector.checkpoint)
        model = bundle.model
        if self.cfg.model.lm.quantization.bits:
            # QLoRA: peft's k-bit preparation (frozen base, fp32 norms/embeddings, input grads for checkpointing).
            from peft import prepare_model_for_kbit_training

            model.lm = prepare_model_for_kbit_training(
                model.lm, use_gradient_checkpointing=self.tc.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.tc.lora.enabled and not model.has_lora:
            apply_lora(model, self.tc.lora)
        model.set_trainable(self.tc.stage, self.tc.unfreeze_vision, self.tc.unfreeze_lm)
        upcast = keep_trainable_fp32(model)
        if upcast:
            log.info("%d trainable tensor(s) stored in float32 (master weights); frozen ones stay %s",
                     len(upcast), self.cfg.model.lm.dtype)
        if self.tc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.tc.compile:
            from mmtune.train.compiling import compile_blocks

            log.info("torch.compile: %d blocks", compile_blocks(model))
        model.train()
        self.bundle, self.model = bundle, model

    def _tokenizer_corpus(self) -> list[str] | None:
        """Texts for a byte-level BPE trained at build time (when no train_files are named)."""
        tok = self.cfg.model.tokenizer
        if tok.name_or_path or not tok.train_vocab_size or tok.train_files:
            return None
        from mmtune.data.schema import read_records
        from mmtune.data.shards import is_shard_source, iter_records
        from mmtune.data.tokenizer import record_texts

        texts: list[str] = []
        for src in self.cfg.data.train_paths():
            records = iter_records(src) if is_shard_source(src) else read_records(src, strict=False)
            texts.extend(record_texts(records))
        return texts

    def _make_batcher(self, epochs: int | None) -> Any:
        from mmtune.data.batching import Batcher
        from mmtune.data.stream import ExampleStream

        dc = self.cfg.data

        def make(sources: list[str], epochs: int | None) -> ExampleStream:
            return ExampleStream.from_config(
                dc, self.bundle.tokenizer, num_image_tokens=self.bundle.num_image_tokens,
                image_transform=self.bundle.pixel_transform or self.bundle.image_transform, seed=self.tc.seed,
                epochs=epochs,
                rank=self.rank, world_size=self.world, sources=sources, draft_size=self._draft_size(),
            )

        stream: Any
        if dc.is_mixture and epochs is None:  # weighted sources, each endless with its own epochs
            from mmtune.data.mixture import mixture_from_config

            stream = mixture_from_config(dc.train_sources(), lambda path: make([path], None), seed=self.tc.seed,
                                         rank=self.rank)
        else:  # plain sources (or counting num_epochs of a mixture: one pass over all of its sources)
            stream = make(dc.train_paths(), epochs)
        return Batcher.from_config(stream, dc, batch_size=self.tc.batch_size, seed=self.tc.seed,
                                   pad_token_id=self.bundle.tokenizer.pad_token_id,
                                   pin_memory=self.acc.device.type == "cuda")

    def _draft_size(self) -> int | None:
        if not self.cfg.data.jpeg_draft or self.model.vision is None:
            return None
        from mmtune.model.mllm import tower_image_size

        return max(tower_image_size(self.model.vision))

    def _build_data(self) -> None:
        # Endless: epochs follow one another inside the stream, and every rank
        # runs the same number of steps, so no rank ever waits for one that ran dry.
        self.batcher = self._make_batcher(epochs=None)

    def _count_total_steps(self) -> int:
        if self.tc.max_steps > 0:
            return self.tc.max_steps
        from accelerate.utils import gather_object

        counter = self._make_batcher(epochs=1)
        quiet = logging.getLogger("mmtune.data")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # skips are logged once, during training
        try:
            from tqdm.auto import tqdm

            n = 0
            for _ in tqdm(counter, desc="counting batches", unit="batch", disable=not (self.main and self.tc.progress),
                          leave=False):
                n += 1
        finally:
            quiet.setLevel(level)
        per_rank = gather_object([n])
        steps = math.floor(min(per_rank) * self.tc.num_epochs / self.tc.grad_accum)
        if steps < 1:
            raise MMTuneError(f"{min(per_rank)} batch(es) per process x {self.tc.num_epochs} epoch(s) / grad_accum "
                              f"{self.tc.grad_accum} is less than one step; add data or set train.max_steps")
        log.info("num_epochs=%s: %s batches per process per epoch -> %d steps", self.tc.num_epochs, per_rank, steps)
        return steps

    def _load_training_state(self, folder: Path, state: dict[str, Any]) -> None:
        try:
            if self.fsdp:
                load_sharded(folder, self.model, self.optimizer)
            else:
                self.optimizer.load_state_dict(ckpt.load_state_file(folder / runs.OPTIMIZER_FILE))
        except ValueError as exc:  # torch's "parameter group doesn't match the size of optimizer's group"
            raise MMTuneError(f"{folder}: the optimizer state does not fit this run's trainable parameters "
                              f"(train.stage / train.lora / unfreeze_vision changed?): {exc}") from None
        self.scheduler.load_state_dict(ckpt.load_state_file(folder / runs.SCHEDULER_FILE))
        data_states = state.get("data_state") or []
        if len(data_states) != self.world:
            raise MMTuneError(f"{folder}: data position saved for {len(data_states)} process(es), this run has {self.world}")
        self._load_data_state(data_states[self.rank])
        self._rng_to_restore = ckpt.load_state_file(folder / runs.rng_file(self.rank))
        self.step = int(state["step"])
        self.tokens = int(state.get("tokens", 0))
        self.examples = int(state.get("examples", 0))
        self.skip_counts = {str(k): int(v) for k, v in state.get("skip_counts", {}).items()}
        self.last_saved_step = self.step
        self.last_checkpoint = folder
        log.info("resumed from %s at step %d", folder, self.step)

    def _load_data_state(self, data_state: dict[str, Any]) -> None:
        try:
            self.batcher.load_state_dict(data_state)
        except MMTuneError as exc:
            if "cannot resume batching" not in str(exc):
                raise
            # Batch size / grouping changed (e.g. lowered after an OOM): continue from
            # the start of the interrupted buffer; its examples may be seen again.
            self.batcher.stream.load_state_dict(data_state["stream"])
            log.warning("batching settings changed since the checkpoint; the data resumes at the start of the "
                        "interrupted buffer (up to %d examples are seen a second time)", self.batcher.buffer_size)

    def _announce(self) -> None:
        if not self.main:
            return
        tc = self.tc
        tower = self.model.vision is not None and any(p.requires_grad for p in self.model.vision.parameters())
        what = f"stage {tc.stage}" + (", LoRA" if self.model.has_lora else "") + (", vision tower unfrozen" if tower else "")
        lines = [
            f"mmtune train: {self.cfg.model.mode} model, {what}; trainable parameters:",
            self.model.trainable_summary(),
            "optimizer groups (AdamW; weights and moments in float32):" if all(
                p.dtype == torch.float32 for p in self.params) else "optimizer groups (AdamW):",
            self._group_lines,
            (f"  steps {self.step} -> {self.total_steps}, {self.world} process(es){self._sharding_note()} x batch {tc.batch_size} "
             f"x grad_accum {tc.grad_accum}, mixed precision {self.acc.mixed_precision}, device {self.acc.device}"),
            f"  output: {self.out}" + (f" (resumed from {self.resumed_from.name})" if self.resumed_from else ""),
        ]
        print("\n".join(lines), flush=True)
        log.info("\n".join(lines))

    # ------------------------------------------------------------------- loop
    def _loop(self, stop: StopSignal) -> TrainResult:
        from tqdm.auto import tqdm

        tc = self.tc
        if self.step >= self.total_steps:
            if self.main:
                print(f"mmtune train: already at step {self.step} >= {self.total_steps} steps; nothing to do")
            return self._result()
        if self._rng_to_restore is not None:  # last: building and wrapping the model drew random numbers
            ckpt.restore_rng_state(self._rng_to_restore)
        batches = iter(self.batcher)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train ({tc.stage})", unit="step",
                   disable=not (self.main and tc.progress), dynamic_ncols=True)
        window = _Window()
        stop_reason: str | None = None
        try:
            while self.step < self.total_steps:
                out = self._step(self.step + 1, batches, stop)
                self.step += 1
                self.tokens += int(out.tokens)
                self.examples += int(out.examples)
                self.last_loss = out.loss_sum / max(out.n_micro, 1.0)
                window.add(out)
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == self.total_steps or out.stop:
                    self._log_row(window, bar)
                    window = _Window()
                if self.validation is not None and not out.stop and (
                        (tc.eval_every and self.step % tc.eval_every == 0) or self.step == self.total_steps):
                    self._validate(bar)
                if out.stop:
                    stop_reason = stop.name or "a signal to another process"
                    self._save()
                    log.warning("stopped by %s at step %d; checkpoint %s; continue with --resume-from latest",
                                stop_reason, self.step, self.last_checkpoint)
                    break
                if tc.save_every and self.step % tc.save_every == 0 and self.step < self.total_steps:
                    self._save()
            else:
                if self.last_saved_step != self.step:
                    self._save()
        finally:
            bar.close()
        self.acc.wait_for_everyone()
        if self.main:
            png = plot_loss_curve(self.out / runs.METRICS_FILE, self.out / runs.LOSS_PNG, title=f"mmtune train ({tc.stage})")
            if png is not None:
                log.info("loss curve: %s", png)
        return self._result(stop_reason)

    def _step(self, step_no: int, batches: Iterator[dict[str, Any]], stop: StopSignal) -> _StepStats:
        """One optimizer step over grad_accum micro-batches; raises on OOM / non-finite loss.

        Losses stay on the device until one all-reduce per step (sums over
        processes and micro-batches, the stop flag included), so a GPU
        synchronises once per step rather than once per micro-batch.
        """
        tc, device = self.tc, self.acc.device
        # Where this step started, for the checkpoint a one-process run writes after an OOM.
        start_data = self.batcher.state_dict() if self.world == 1 else None
        start_rng = ckpt.capture_rng_state() if self.world == 1 else None
        losses: list[torch.Tensor] = []
        seen: list[dict[str, Any]] = []
        counts = [0.0, 0.0, 0.0, 0.0]  # tokens, slots, examples, images (known on the host)
        for micro in range(tc.grad_accum):
            batch = next(batches)
            seen.append(batch)
            if self.trace is not None:
                self.trace.log(step_no, micro, batch)
            oom: str | None = None
            inputs: dict[str, Any] | None = None
            loss: torch.Tensor | None = None
            try:
                with self.acc.accumulate(self.ddp_model), (self.acc.autocast() if self.fsdp else contextlib.nullcontext()):
                    inputs = _to_device(batch, device)
                    self.faults.maybe_oom(step_no)
                    loss = self.ddp_model(**inputs).loss
                    if loss is None:
                        raise MMTuneError("the model returned no loss (are labels missing from the batch?)")
                    loss = self.faults.maybe_nan(step_no, loss)
                    self.acc.backward(loss)
            except torch.OutOfMemoryError:
                oom = oom_message(step_no, micro + 1, tc.grad_accum, batch, tc, self.cfg.data)
            if oom is not None:
                # Outside the except block, so the traceback (and the activations its
                # frames hold) is gone before memory is freed and the checkpoint written.
                inputs = loss = None
                self._handle_oom(oom, start_data, start_rng)  # raises
            losses.append(loss.detach().float())  # type: ignore[union-attr]
            mask = batch["attention_mask"]
            counts = [counts[0] + float(mask.sum()), counts[1] + mask.numel(),
                      counts[2] + len(batch["ids"]), counts[3] + sum(batch["num_images"])]
        self.faults.maybe_sigterm(step_no)
        stacked = torch.stack(losses)
        finite = torch.isfinite(stacked)
        local = torch.cat([
            torch.where(finite, stacked, torch.zeros_like(stacked)).sum().reshape(1).double(),
            torch.tensor([float(len(losses)), *counts, 1.0 if stop.requested else 0.0], device=stacked.device,
                         dtype=torch.float64),
            (~finite).sum().reshape(1).double(),
        ])
        loss_sum, n_micro, tokens, slots, n_ex, n_img, stop_flag, nonfinite = \
            self.acc.reduce(local.to(device), reduction="sum").cpu().tolist()
        if nonfinite:
            bad = [b for b, ok in zip(seen, finite.cpu().tolist(), strict=True) if not ok]
            here = f" on batch {describe_batch(bad[0])}" if bad else " on another process"
            raise NonFiniteLossError(
                f"loss is NaN/inf at step {step_no}{here}; stopped without saving this step. "
                f"Last good checkpoint: {self._last_good()}. Lower train.lr or check those records, "
                "then resume with --resume-from latest"
            )
        lr = float(self.scheduler.get_last_lr()[0])
        try:
            grad_norm = self._clip()
            if grad_norm is not None and not math.isfinite(grad_norm) and self.acc.mixed_precision != "fp16":
                raise NonFiniteLossError(
                    f"gradient norm is {grad_norm} at step {step_no}; stopped without saving this step. "
                    f"Last good checkpoint: {self._last_good()}. Lower train.lr or train.max_grad_norm"
                )
            self.optimizer.step()
        except torch.OutOfMemoryError:
            # AdamW allocates its two moment buffers at the first step: 2 x the trainable parameters.
            n = sum(p.numel() for p in self.params)
            dtype = optimizer_state_dtype(self.params)
            gb = 2 * n * torch.empty((), dtype=dtype).element_size() / 1e9
            raise TrainingOOMError(
                f"out of memory in the optimizer step of step {step_no} (AdamW keeps 2 states x {n:,} trainable "
                f"parameters in {dtype_name(dtype)}, {gb:.2f} GB{self._per_process_note()}); train fewer parameters "
                f"(train.lora.enabled=true, train.stage=align), shard them (train.distributed=fsdp) "
                f"or use a larger device. Last checkpoint: {self._last_good()}"
            ) from None
        if not self.acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _StepStats(loss_sum, n_micro, tokens, slots, n_ex, n_img, bool(stop_flag), grad_norm, lr)

    def _per_process_note(self) -> str:
        return f" in all, 1/{self.world} of it per process under FSDP" if self.fsdp else ""

    def _sharding_note(self) -> str:
        if not self.fsdp:
            return " (DDP)" if self.world > 1 else ""
        return f" (FSDP2: {len(wrap_plan(self.model))} units + root sharded over {self.world})"

    def _clip(self) -> float | None:
        if self.tc.max_grad_norm and self.tc.max_grad_norm > 0:
            if self.fsdp:  # sharded gradients: torch computes the global norm over the DTensor shards
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.tc.max_grad_norm)
                return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            norm = self.acc.clip_grad_norm_(self.params, self.tc.max_grad_norm)
            return float(norm) if norm is not None else None
        return None

    def _log_row(self, window: _Window, bar: Any) -> None:
        from accelerate.utils import gather_object

        # Skip counts live in each process's stream; the row reports the sum.
        per_rank = gather_object([dict(self.batcher.stream.skip_counts)])
        skips: dict[str, int] = {}
        for counts in per_rank:
            for kind, n in counts.items():
                skips[kind] = skips.get(kind, 0) + int(n)
        self.skip_counts = skips
        per_source = gather_object([dict(getattr(self.batcher.stream, "source_counts", {}))])
        sources: dict[str, int] = {}
        for counts in per_source:
            for name, n in counts.items():
                sources[name] = sources.get(name, 0) + int(n)
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        row = {
            "step": self.step,
            "loss": window.loss_sum / max(window.n_micro, 1.0),
            "lr": window.lr,
            "tokens": self.tokens,
            "tokens_per_s": window.tokens / elapsed,
            "padding_share": 1.0 - window.tokens / window.slots if window.slots else 0.0,
            "skipped": sum(skips.values()),
            "skips": skips,
            "examples": self.examples,
            "images": int(window.images),
            "grad_norm": window.grad_norm,
        }
        if sources:  # a weighted mixture: examples each source has given (all processes), its epoch (rank 0's)
            row["sources"] = sources
            row["source_epochs"] = dict(self.batcher.stream.epochs)
        if self.metrics is not None:
            self.metrics.log(row)
        self._track(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{window.lr:.2e}",
                        refresh=False)

    # --------------------------------------------------------------- trackers
    def _init_trackers(self) -> None:
        if not self.tc.report_to:
            return
        from mmtune.train.trackers import TRACKERS_DIR, flat_config

        name = self.out.resolve().name or "mmtune"
        folder = self.out / TRACKERS_DIR
        if self.main:
            folder.mkdir(parents=True, exist_ok=True)
        kwargs = {"wandb": {"dir": str(folder), "name": name}, "mlflow": {"logging_dir": str(folder / "mlruns")}}
        if "mlflow" in self.tc.report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
            # accelerate passes logging_dir only as the artifact location; without a tracking URI
            # mlflow would open its default database in the working directory, not in the run folder.
            import mlflow

            mlflow.set_tracking_uri("sqlite:///" + str((folder / "mlflow.db").resolve()))
        self.acc.init_trackers(name, config=flat_config(self.cfg),
                               init_kwargs={k: v for k, v in kwargs.items() if k in self.tc.report_to})

    def _track(self, row: dict[str, Any]) -> None:
        if self.tc.report_to:
            from mmtune.train.trackers import tracker_values

            self.acc.log(tracker_values(row), step=int(row["step"]))

    # ------------------------------------------------------------- validation
    def _validate(self, bar: Any) -> None:
        # DDP: the plain module (no collectives in its forward, so ranks may hold different numbers of
        # eval batches). The sharded model (FSDP, `self.fsdp`: mmtune shards it itself, so accelerate's
        # distributed_type is not FSDP under torchrun) all-gathers in every unit's forward: every rank
        # runs the same number of forwards (padding ones not counted), under the training autocast.
        equal = (lambda n: int(self.acc.reduce(torch.tensor([n], device=self.acc.device), reduction="max").item()))
        with self.acc.autocast() if self.fsdp else contextlib.nullcontext():
            res = self.validation.evaluate(
                self.model, self.acc.device, lambda t: self.acc.reduce(t, reduction="sum"),
                equal_steps=equal if self.fsdp else None, progress=self.main and self.tc.progress,
            )
        row = {"step": self.step, "eval_loss": res.loss, "eval_examples": res.examples, "eval_tokens": res.tokens}
        if self.metrics is not None:
            self.metrics.log(row)
        self._track(row)
        bar.set_postfix(eval_loss=f"{res.loss:.4f}", refresh=False)
        log.info("step %d: validation loss %.4f over %d examples", self.step, res.loss, res.examples)
        if self.tc.save_best and math.isfinite(res.loss) and (self.best_loss is None or res.loss < self.best_loss):
            self.best_loss = res.loss
            self._save_best(res.loss)

    def _previous_best(self, resume_step: int | None) -> float | None:
        """The validation loss of DIR/best when it was saved at or before the step this run resumes from."""
        info = self.out / runs.BEST_DIR / runs.BEST_FILE
        if resume_step is None or not info.is_file():
            return None
        try:
            data = json.loads(info.read_text(encoding="utf-8"))
            return float(data["eval_loss"]) if int(data["step"]) <= resume_step else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save_best(self, loss: float) -> None:
        """DIR/best: the model (and run config) of the lowest validation loss so far, replaced atomically.

        Written like a checkpoint (`save_together`): into DIR/.tmp-best, renamed into place with the
        previous best/ waiting in DIR/.old-best, so a crash mid-save leaves the previous best/ whole and
        the next run clears (or puts back) what it left. Under FSDP each process writes its own shard
        (`save_sharded` without the optimizer), as checkpoints do, rather than gathering the full state
        dict onto rank 0: that would need the whole model in rank 0's memory, which is what FSDP avoids.
        `load_model` reads that folder like a sharded checkpoint, so `mmtune export/generate/eval` take
        DIR/best as is and `mmtune consolidate DIR/best` turns it into plain safetensors.
        """
        from mmtune.fileio import replace_dir, write_json_atomic
        from mmtune.model.io import save_model

        step, final = self.step, self.out / runs.BEST_DIR

        def each(tmp: Path) -> None:
            if self.fsdp:
                save_sharded(tmp, self.model)

        def once(tmp: Path) -> None:
            with _quiet_hf_progress():
                save_model(self.bundle, tmp, sharded=self.fsdp)
            self.faults.maybe_kill("kill_during_best_save", step)
            runs.write_run_config(self.cfg, tmp)
            write_json_atomic({"step": step, "eval_loss": loss}, tmp / runs.BEST_FILE)

        save_together(runs.temp_best_path(self.out), final, self._processes(), write_each=each, write_main=once,
                      commit=lambda tmp: replace_dir(tmp, final, aside=runs.old_best_path(self.out)))
        if self.main:
            log.info("step %d: best validation loss so far (%.4f), %smodel saved to %s", step, loss,
                     "sharded " if self.fsdp else "", final)

    def _processes(self) -> Processes:
        """This run's processes for `save_together`: accelerate's barrier, and a sum of one flag each."""
        def all_true(flag: bool) -> bool:
            total = self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), reduction="sum")
            return int(total.item()) == self.world

        return Processes(main=self.main, wait=self.acc.wait_for_everyone, all_true=all_true)

    # ------------------------------------------------------------ checkpoints
    def _last_good(self) -> str:
        latest = ckpt.latest_checkpoint(self.out)
        return str(latest) if latest is not None else "none (no checkpoint was saved yet)"

    def _save(self, data_state: dict[str, Any] | None = None, rng_state: dict[str, Any] | None = None) -> Path:
        """Write DIR/checkpoint-STEP atomically (`save_together`): temp folder, every file, state file, rename."""
        from accelerate.utils import gather_object

        from mmtune.model.io import save_model

        step = self.step
        final = runs.checkpoint_path(self.out, step)
        data_states = gather_object([data_state or self.batcher.state_dict()])
        skips = gather_object([dict(self.batcher.stream.skip_counts)])

        def each(tmp: Path) -> None:
            ckpt.save_state_file(rng_state or ckpt.capture_rng_state(), tmp / runs.rng_file(self.rank))
            if self.fsdp:  # every process writes its own shard of weights + optimizer state
                save_sharded(tmp, self.model, self.optimizer)

        def once(tmp: Path) -> None:
            with _quiet_hf_progress():
                save_model(self.bundle, tmp, sharded=self.fsdp)
            self.faults.maybe_kill("kill_during_save", step)
            if not self.fsdp:  # under FSDP the optimizer state is in sharded/
                ckpt.save_state_file(self.optimizer.state_dict(), tmp / runs.OPTIMIZER_FILE)
            ckpt.save_state_file(self.scheduler.state_dict(), tmp / runs.SCHEDULER_FILE)
            runs.write_run_config(self.cfg, tmp)

        def commit(tmp: Path) -> None:
            total: dict[str, int] = {}
            for counts in skips:
                for kind, n in counts.items():
                    total[kind] = total.get(kind, 0) + int(n)
            state = {
                "format": STATE_FORMAT, "step": step, "total_steps": self.total_steps, "stage": self.tc.stage,
                "world_size": self.world, "tokens": self.tokens, "examples": self.examples,
                "skip_counts": total, "data_state": data_states, "last_loss": self.last_loss,
                "sharded": self.fsdp,
            }
            ckpt.commit_checkpoint(self.out, step, state)

        save_together(runs.temp_checkpoint_path(self.out, step), final, self._processes(), write_each=each,
                      write_main=once, commit=commit)
        if self.main:
            for old in ckpt.rotate_checkpoints(self.out, self.tc.save_total_limit):
                log.info("removed old checkpoint %s (save_total_limit=%d)", old, self.tc.save_total_limit)
            log.info("saved %s", final)
        self.last_saved_step = step
        self.last_checkpoint = final
        return final

    def _handle_oom(self, message: str, start_data: dict[str, Any] | None, start_rng: dict[str, Any] | None) -> None:
        """Free memory, save the last completed step (one process), raise a TrainingOOMError."""
        self.optimizer.zero_grad(set_to_none=True)
        free_accelerator_memory()
        saved = ""
        if self.world == 1 and self.step > 0 and self.last_saved_step != self.step:
            try:
                path = self._save(data_state=start_data, rng_state=start_rng)
                saved = f"; saved {path} (the last completed step), resume it with --resume-from latest"
            except Exception as exc:
                saved = f"; could not save a checkpoint ({type(exc).__name__}: {exc})"
        elif self.last_checkpoint is not None:
            saved = f"; last checkpoint: {self.last_checkpoint}"
        log.error("%s%s", message, saved)
        raise TrainingOOMError(message + saved)

    def _result(self, stopped_by: str | None = None) -> TrainResult:
        return TrainResult(self.out, self.step, self.total_steps, self.last_checkpoint, stopped_by,
                           self.last_loss, dict(self.skip_counts))

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.trace is not None:
            self.trace.close()
        root = logging.getLogger("mmtune")
        for h in self._log_handlers:
            root.removeHandler(h)
            h.close()
        if self._log_handlers:
            root.setLevel(self._log_level)
        self._log_handlers = []
        # Drop references so DDP's reducer and gloo threads go away before the group does.
        self.ddp_model = self.model = self.optimizer = self.scheduler = self.bundle = None
        self.batcher = None


@dataclass
class _StepStats:
    """One optimizer step, summed over micro-batches and processes."""

    loss_sum: float
    n_micro: float
    tokens: float
    slots: float
    examples: float
    images: float
    stop: bool
    grad_norm: float | None
    lr: float


@dataclass
class _Window:
    """Sums over the steps since the last metrics row."""

    loss_sum: float = 0.0
    n_micro: float = 0.0
    tokens: float = 0.0
    slots: float = 0.0
    images: float = 0.0
    grad_norm: float | None = None
    lr: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, step: _StepStats) -> None:
        self.loss_sum += step.loss_sum
        self.n_micro += step.n_micro
        self.tokens += step.tokens
        self.slots += step.slots
        self.images += step.images
        self.grad_norm = step.grad_norm  # the latest step's
        self.lr = step.lr  # the rate the latest step used


class _TqdmHandler(logging.Handler):
    """Warnings printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(f"mmtune train: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _quiet_hf_progress() -> Iterator[None]:
    """No "Writing model shards" bar from transformers in the middle of the training bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    from mmtune.data.batching import model_inputs

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in model_inputs(batch).items()}


def _dict_diff(a: dict[str, Any], b: dict[str, Any], where: str) -> str:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _dict_diff(va, vb, f"{where}.{key}")
            if sub:
                diffs.append(sub)
        elif va != vb:
            diffs.append(f"{where}.{key}: {vb!r} in the checkpoint, {va!r} now")
    return "; ".join(diffs)
