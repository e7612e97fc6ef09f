"""The training loop every stage shares (SFT, SCST): accelerate, schedule, eval, checkpoints.

A stage supplies one function, examples -> (loss, metrics). The loop owns the rest: AdamW with
cosine schedule and warmup, gradient accumulation and clipping, mixed precision, validation
CIDEr-D every N steps with the best model kept, checkpoints every N steps, exact resume (the
data a step sees is a pure function of the step number), a progress bar, and a metrics
callback (the pipeline plugs MLflow into it). Built on `accelerate`, so the same code runs on
one CPU, DDP over GPUs and DeepSpeed ZeRO-2/3 (what differs there lives in `zero.py`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from ecomcap.config import GenerateConfig, LoopConfig
from ecomcap.data.brand_balance import named_brand
from ecomcap.inference.generate import caption_images
from ecomcap.metrics import evaluate
from ecomcap.metrics.brands import brand_accuracy
from ecomcap.modeling.strategies import ParamCount, count_parameters
from ecomcap.training import zero
from ecomcap.training.accelerator import make_accelerator, resolve_precision  # noqa: F401 (re-exported)
from ecomcap.training.checkpoint import (
    STATE,
    complete_rng,
    export_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_rng,
)
from ecomcap.training.collate import PromptBuilder
from ecomcap.training.data import Example, ShardImages, epoch_order, make_example
from ecomcap.training.identity import record_finished, run_dir
from ecomcap.training.microbatches import MicroBatches, data_workers, micro_batches

log = logging.getLogger(__name__)
MetricsCallback = Callable[[dict[str, float], int], None]
StepFn = Callable[[list[Example]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class StageResult:
    """What a training stage produced: the model to hand on (best, else final) and its figures."""

    model_dir: Path
    final_dir: Path
    best_dir: Path | None
    steps: int
    params: ParamCount
    best_metrics: dict[str, Any] | None
    evals: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from: int = 0
    param_digest: str = ""  # hash of this process's trainable weights (ranks must agree)
    order_digest: str = ""  # hash of the first epoch's shared data order (ranks must agree)


class TrainLoop:
    """One stage's optimisation of the trainable parameters of `model`.

    Other jobs subclass it (retrieval): override `examples_for`, `validate`, `_export` and
    `primary_metric` (the validation score that picks the best model); no prompt, no builder.
    """

    primary_metric = "CIDEr-D"

    def __init__(self, *, stage: str, model, processor, prompt: str | None, base_name: str, strategy: str,
                 cfg: LoopConfig, gen_cfg: GenerateConfig, valid: ShardImages | None,
                 configs: dict[str, Any], on_metrics: MetricsCallback | None = None,
                 expand_references: bool = False, identity: str | None = None, accelerator=None):
        self.stage, self.cfg, self.gen_cfg = stage, cfg, gen_cfg
        self.processor, self.base_name, self.strategy, self.configs = processor, base_name, strategy, configs
        self.builder = PromptBuilder(processor, prompt) if prompt is not None else None
        self.on_metrics, self.expand = on_metrics, expand_references
        # made before the model was loaded (`make_accelerator(cfg, dtype=...)`: ZeRO-3 loads sharded), or now
        self.acc = accelerator if accelerator is not None else make_accelerator(cfg, model)
        torch.manual_seed(cfg.seed)
        self.params = count_parameters(model)
        opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
        warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
        sched = get_cosine_schedule_with_warmup(opt, warmup, max(cfg.max_steps, 1))
        # the scheduler stays unprepared: accelerate's wrapper steps it once per process per
        # optimizer step, which would compress the schedule num_processes-fold; DeepSpeed is not
        # handed it either (the engine would step it too), it sets the LR in `opt`'s param groups
        self.model, self.opt = self.acc.prepare(model, opt)
        self.sched = sched
        self.root = Path(cfg.output_dir)  # each run identity trains in its own folder below it
        self.out = run_dir(self.root, identity, stage) if identity else self.root
        self.valid = valid
        self._valid_cache: tuple[list[str], list, dict[str, list[str]]] | None = None
        self._orders: dict[int, list[tuple[int, int]]] = {}
        self._epoch_len: int | None = None
        self.marker: dict[str, Any] = {}  # more fields for the exported model's marker (a stage sets them)
        self.brands: list[str] = []  # a brand lexicon: validation also scores brand recognition
        self._brand_truth: dict[str, dict] | None = None

    # ------------------------------------------------------------------ data by step
    def examples_for(self, data: ShardImages, step: int, micro: int) -> list[Example]:
        """This process's micro-batch of optimizer step `step` (0-based): a pure function."""
        cfg, world, rank = self.cfg, self.acc.num_processes, self.acc.process_index
        per_step = cfg.batch_size * world * cfg.grad_accum
        first = step * per_step + (micro * world + rank) * cfg.batch_size
        if self._epoch_len is None:
            self._epoch_len = self.epoch_size(data)
        items = [self.item(data, *divmod(k, self._epoch_len)) for k in range(first, first + cfg.batch_size)]
        # each Example learns its draw number: what keys its augmentation (the same on resume, any world size)
        return [replace(e, draw=k) if isinstance(e, Example) else e for k, e in zip(range(first, first + cfg.batch_size), items)]

    def epoch_size(self, data) -> int:
        """Items in one pass over `data` (a stage with other items overrides it and `item`)."""
        return sum(map(len, data.texts)) if self.expand else len(data)

    def item(self, data, epoch: int, i: int):
        """The `i`-th item of `epoch`'s order."""
        return make_example(data, *self._order(data, epoch)[i])

    def _order(self, data: ShardImages, epoch: int) -> list[tuple[int, int]]:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(data, self.cfg.seed, epoch, self.expand)}
        return self._orders[epoch]

    def _order_digest(self, data) -> str:
        """Hash of the first epoch's shared order (each rank takes its slices of it)."""
        if not isinstance(data, ShardImages):
            return ""
        return hashlib.sha256(json.dumps(self._order(data, 0)).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, Any] | None:
        if self.valid is None or len(self.valid) == 0:
            return None
        if self._valid_cache is None:
            n = min(self.cfg.eval_images, len(self.valid))
            ids = self.valid.ids[:n]
            self._valid_cache = (ids, [self.valid.image(i) for i in range(n)],
                                 {ids[i]: self.valid.texts[i] for i in range(n)})
        ids, images, refs = self._valid_cache
        caps = self.validation_captions(images)
        scores = evaluate(dict(zip(ids, caps)), refs)
        if self.brands:  # each image's brand: the one its references name (no ground truth needed), once
            if self._brand_truth is None:
                self._brand_truth = {i: {"brand": named_brand(refs[i], self.brands)} for i in ids}
            b = brand_accuracy(dict(zip(ids, caps)), self._brand_truth)
            scores.update({f"brand_{k}": b[k] for k in ("micro", "macro") if b[k] is not None})
        return {**scores, "distinct": len(set(caps))}

    def validation_captions(self, images: list) -> list[str]:
        """Captions of `images` in order, each rank captioning every world-th image (under ZeRO-3
        with the parameters gathered once); every rank returns all of them. Collective."""
        # checkpoint selection by the model alone: no reranking (its scorer is not the policy's doing)
        gen = self.gen_cfg.model_copy(update={"num_beams": self.cfg.eval_beams,
                                              "rerank": self.gen_cfg.rerank.model_copy(update={"candidates": 0})})
        world, rank = self.acc.num_processes, self.acc.process_index
        with zero.gathered_for_generation(self.acc, self.model, self.cfg.gather_for_generation) as gathered:
            # partitioned and not gathered, every forward is collective: all ranks caption all images, in step
            alone = gathered or zero.zero_stage(self.acc) != 3
            mine = list(range(rank, len(images), world)) if alone else list(range(len(images)))
            caps = caption_images(self.acc.unwrap_model(self.model), self.builder, [images[i] for i in mine], gen,
                                  progress=False)
        if world == 1 or not alone:
            return caps
        from accelerate.utils import gather_object

        return [c for _, c in sorted(gather_object(list(zip(mine, caps))))]

    # ------------------------------------------------------------------ the loop
    def run(self, data: ShardImages, step_fn: StepFn) -> StageResult:
        cfg, acc = self.cfg, self.acc
        started = time.perf_counter()
        ckpts = self.out / "checkpoints"
        state: dict[str, Any] = {"best": None, "evals": [], "world_size": acc.num_processes}
        step = 0
        last = latest_checkpoint(ckpts) if cfg.resume else None
        last = self._resumable(last)
        if last is not None and zero.zero_stage(acc):
            state = zero.load_engine_checkpoint(acc, last, self.sched.optimizer, self.sched)
            step = state.pop("step")
            state.pop("format", None)
            log.info("%s: resumed from %s (step %d)", self.stage, last, step)
        elif last is not None:
            state = load_checkpoint(last, acc.unwrap_model(self.model), self.opt, self.sched,
                                    rank=acc.process_index)
            step = state.pop("step")
            log.info("%s: resumed from %s (step %d)", self.stage, last, step)
        resumed_from = step
        metrics_log = self.out / "metrics.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        _truncate_log(metrics_log, step)
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=step, desc=self.stage, unit="step",
                   disable=not acc.is_local_main_process or None)
        batches = self._batches(data, step_fn, step)
        try:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                logs: dict[str, Any] = {}
                for micro in range(cfg.grad_accum):
                    with acc.accumulate(self.model):
                        loss, extra = step_fn(next(batches) if batches is not None else self.examples_for(data, step, micro))
                        if loss.requires_grad or not getattr(step_fn, "does_backward", False):
                            acc.backward(loss)  # (SCST backwards its chunked log-prob pass itself)
                        if acc.sync_gradients:
                            norm = zero.grad_norm(acc, self.model, cfg.max_grad_norm)
                            if norm is not None:
                                logs["grad_norm"] = norm
                            self.opt.step()  # (under DeepSpeed a no-op: the engine stepped in backward)
                            self.sched.step()
                            self.opt.zero_grad(set_to_none=True)
                    for k, v in {"loss": loss.detach(), **extra}.items():  # kept on the device: one sync per step
                        logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
                step += 1
                logs = {k: float(v) for k, v in logs.items()}
                logs.update(lr=self.sched.get_last_lr()[0],
                            images_per_s=cfg.batch_size * cfg.grad_accum * acc.num_processes / (time.perf_counter() - t0))
                self._emit(metrics_log, {"step": step, **logs})
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
                if bar.disable and step % max(1, cfg.max_steps // 20) == 0:  # no TTY: log progress
                    log.info("%s step %d/%d loss %.4f lr %.2e", self.stage, step, cfg.max_steps,
                             logs["loss"], logs["lr"])
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                    self._evaluate(step, state)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    self._flush_metrics()  # MLflow holds every step up to the checkpoint a resume starts from
                    save_rng(ckpts, step, acc.process_index)  # every rank its own generators
                    acc.wait_for_everyone()
                    if zero.zero_stage(acc):  # sharded engine state: every rank saves its part
                        zero.save_engine_checkpoint(acc, ckpts, step, self.sched, state, cfg.keep_checkpoints)
                    elif acc.is_main_process:
                        save_checkpoint(ckpts, step, acc.unwrap_model(self.model), self.opt, self.sched, state,
                                        cfg.keep_checkpoints, acc.num_processes)
                    acc.wait_for_everyone()  # (no barrier on other steps: the gradient all-reduce keeps ranks in step)
                if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps and step < cfg.max_steps:
                    bar.close()
                    raise InterruptedError(f"{self.stage}: stopped after step {step} (stop_after_steps)")
        except BaseException:
            self._flush_metrics(failing=True)  # the steps before a failure are the ones to look at
            raise
        bar.close()
        final = self._export(self.out / "model")
        best = self.out / "best" if state["best"] is not None else None
        if acc.is_main_process:
            if best is not None:  # the best model carries the whole curve too
                shutil.copy(metrics_log, best / "metrics.jsonl")
            shutil.rmtree(ckpts, ignore_errors=True)  # a finished run leaves nothing half-way to resume
            if self.out != self.root:
                record_finished(self.root, self.out, best or final)
        acc.wait_for_everyone()
        self._flush_metrics(final=True)  # after the (collective) export: a tracking error cannot strand other ranks
        return StageResult(best or final, final, best, step, self.params, state["best"], state["evals"],
                           time.perf_counter() - started, resumed_from, self._param_digest(),
                           self._order_digest(data))

    def _batches(self, data, step_fn, step: int):
        """Prepared micro-batches from `step` on, when the step function has a CPU `prepare` (else
        None: the step function gets examples)."""
        prepare = getattr(step_fn, "prepare", None)
        if prepare is None:
            return None
        cfg, acc = self.cfg, self.acc
        workers = data_workers(cfg, acc)
        dataset = MicroBatches(lambda s, m: self.examples_for(data, s, m), prepare, cfg.grad_accum,
                               cfg.max_steps * cfg.grad_accum)
        return micro_batches(dataset, step * cfg.grad_accum, workers, pin=acc.device.type == "cuda")

    def _resumable(self, last: Path | None) -> Path | None:
        """`last` if this launch can resume it: the same process count (data-to-step mapping) and
        the same checkpoint format (ours, or a ZeRO stage's sharded engine state)."""
        if last is None:
            return None
        saved = json.loads((last / STATE).read_text(encoding="utf-8"))
        saved_world, fmt = saved.get("world_size", 1), saved.get("format", "trainable")
        if saved_world != self.acc.num_processes:  # another data-to-step mapping
            log.warning("%s: %s was written by %d processes, this run has %d: not resumed, starting at step 0",
                        self.stage, last, saved_world, self.acc.num_processes)
            return None
        if fmt != zero.checkpoint_format(self.acc):
            log.warning("%s: %s holds a %s checkpoint, this launch writes %s: not resumed, starting at step 0",
                        self.stage, last, fmt, zero.checkpoint_format(self.acc))
            return None
        if not complete_rng(last, saved_world):  # e.g. a rank's file that a shared volume showed too late
            log.warning("%s: %s lacks some ranks' generator states: not resumed, starting at step 0", self.stage, last)
            return None
        return last

    def _param_digest(self) -> str:
        """Hash of the trainable weights (whole ones: ZeRO-3 shards are gathered, on all ranks)."""
        h = hashlib.sha256()
        for name, p in zero.whole_trainables(self.acc, self.model):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def _evaluate(self, step: int, state: dict[str, Any]) -> None:
        scores = self.validate()  # collective: the ranks share the images, then all hold every caption
        if self.acc.num_processes > 1:  # rank 0's scores decide for all (the best export is collective under ZeRO-3)
            from accelerate.utils import broadcast_object_list

            scores = broadcast_object_list([scores])[0]
        if scores is None:
            return
        entry = {"step": step, **scores}
        state["evals"].append(entry)
        self._emit(self.out / "metrics.jsonl", {"step": step, **{f"val_{k}": v for k, v in scores.items()}})
        key = self.primary_metric
        if state["best"] is None or scores[key] > state["best"][key]:
            state["best"] = entry
            self._export(self.out / "best")
        log.info("%s step %d: val %s %.4f (best %.4f at step %d)", self.stage, step, key,
                 scores[key], state["best"][key], state["best"]["step"])

    def _export(self, path: Path) -> Path:
        """Main process writes; no barrier here (callers on one rank only must not deadlock), except
        under ZeRO-3, where every rank calls this and first gathers the sharded weights."""
        inner, weights = self.acc.unwrap_model(self.model), None
        if zero.zero_stage(self.acc) == 3:
            weights = zero.gathered_state_dict(self.acc, self.model, trainable_only=hasattr(inner, "peft_config"))
        if self.acc.is_main_process:
            export_model(inner, self.processor, path, base=self.base_name, strategy=self.strategy,
                         configs=self.configs, metrics_log=self.out / "metrics.jsonl", state_dict=weights,
                         marker=self.marker)
        return path

    def _flush_metrics(self, failing: bool = False, final: bool = False) -> None:
        """Store what a batching metrics callback holds (rank 0). While a stage is failing, a
        tracking error is only logged: it must not replace the stage's own error."""
        flush = getattr(self.on_metrics, "flush", None)
        if flush is None or not self.acc.is_main_process:
            return
        try:
            flush(final=final)
        except Exception as exc:
            if not failing:
                raise
            log.warning("%s: could not store the last metrics in MLflow: %s", self.stage, exc)

    def _emit(self, path: Path, row: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.on_metrics is not None:
            step = int(row["step"])
            self.on_metrics({f"{self.stage}/{k}": float(v) for k, v in row.items() if k != "step"}, step)


def param_groups(model, cfg: LoopConfig) -> list[dict[str, Any]]:
    """The trainable parameters, the vision tower's apart when `vision_lr_scale` != 1 (the
    cosine schedule scales every group's own rate)."""
    from ecomcap.modeling.strategies import VISION

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.vision_lr_scale == 1.0:
        return [{"params": [p for _, p in named], "lr": cfg.lr}]
    vision = [p for n, p in named if VISION.search(n)]
    rest = [p for n, p in named if not VISION.search(n)]
    if not vision:
        log.warning("vision_lr_scale %.3g: no trainable parameter of a Qwen-VL vision tower (`visual.`) in this "
                    "model, every parameter trains at lr", cfg.vision_lr_scale)
    return [g for g in ({"params": rest, "lr": cfg.lr}, {"params": vision, "lr": cfg.lr * cfg.vision_lr_scale})
            if g["params"]]


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows of steps after `step` (a resumed run redoes them)."""
    if not path.is_file():
        return
    rows = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
