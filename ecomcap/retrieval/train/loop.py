"""Contrastive fine-tuning of a dual encoder on the shared training loop (accelerate,
checkpoints, exact resume, best-model selection), with InfoNCE or the sigmoid loss, optional
gradient caching, mined hard negatives and image / text / fused item embeddings; on one process or
several (DDP, embeddings gathered across ranks: `distributed.py`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, broadcast_object_list

from ecomcap.config import GenerateConfig
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.config import RetrievalRunConfig
from ecomcap.retrieval.data.batches import Batch, TrainingSet
from ecomcap.retrieval.evaluate.embed import embed_items, embed_split, recall_of
from ecomcap.retrieval.evaluate.metrics import tracking_names
from ecomcap.retrieval.model.dual import DualEncoder, load_dual_encoder
from ecomcap.retrieval.model.encoder import Encoder, fuse, load_preprocessor, save_encoder
from ecomcap.retrieval.model.tiny import ensure_tiny_encoder
from ecomcap.retrieval.train.distributed import average_gradients, gather_batches, gather_embeddings
from ecomcap.retrieval.train.gradcache import grad_cache_backward
from ecomcap.retrieval.train.losses import info_nce, sigmoid_loss
from ecomcap.retrieval.train.mining import mine_hard_negatives
from ecomcap.training.loop import MetricsCallback, StageResult, TrainLoop

log = logging.getLogger(__name__)
MINING_BATCH = 256  # items decoded and embedded at a time when mining hard negatives


class RetrievalLoop(TrainLoop):
    """The shared loop with retrieval batches, full-gallery validation and encoder export."""

    primary_metric = "MeanRecall"

    def __init__(self, *, dual: DualEncoder, pre, cfg: RetrievalRunConfig, valid_dir: Path | None,
                 base_name: str, on_metrics: MetricsCallback | None = None):
        self.run_cfg, self.pre, self.valid_dir = cfg, pre, valid_dir
        super().__init__(stage="retrieval", model=dual, processor=pre, prompt=None, base_name=base_name,
                         strategy=cfg.train.strategy, cfg=cfg.train, gen_cfg=GenerateConfig(), valid=None,
                         configs=cfg.model_dump(mode="json"), on_metrics=on_metrics)
        if self.acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            # the towers run on the unwrapped module and `distributed.py` syncs gradients itself
            raise EcomcapError(f"retrieval training runs on one process or DDP, not {self.acc.distributed_type.value}: "
                               "unset launch.config_file (launch.num_processes alone gives DDP)")

    @property
    def dual(self) -> DualEncoder:
        return self.acc.unwrap_model(self.model)

    def examples_for(self, data: TrainingSet, step: int, micro: int) -> Batch:  # type: ignore[override]
        cfg, hn = self.cfg, self.run_cfg.train.hard_negatives
        if hn.enabled and step >= hn.start_step and data.negatives is None:
            data.negatives = self._negatives(data)
        world, rank = self.acc.num_processes, self.acc.process_index
        first = step * cfg.batch_size * world * cfg.grad_accum + (micro * world + rank) * cfg.batch_size
        return data.batch(step, first, cfg.batch_size, hn.per_example if hn.enabled else 0,
                          siblings=self.run_cfg.train.match_weight > 0 and bool(data.views),
                          text_negatives=self.run_cfg.train.text_negatives)

    def _negatives(self, data: TrainingSet) -> list[list[int]]:
        """Mined once (rank 0, the others get its list) with the current model; saved, so a
        resumed run trains on the same ones."""
        negatives = self._mined(data) if self.acc.is_main_process else None
        if self.acc.num_processes > 1:
            negatives = broadcast_object_list([negatives])[0]
        return negatives

    def _mined(self, data: TrainingSet) -> list[list[int]]:
        path = self.out / "hard_negatives.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        hn, mode = self.run_cfg.train.hard_negatives, self.run_cfg.encoder.item_embedding
        ids, items = embed_items(self._encoder(), data.items_dir, mode, MINING_BATCH)  # streamed: 100k+ items
        if ids != data.items.ids:
            raise EcomcapError(f"{data.items_dir}: items changed while mining hard negatives")
        enc = self._encoder()
        queries = enc.encode_texts([q["query_text"] for q in data.queries])
        self.model.train()
        negatives = mine_hard_negatives(queries, items, data.positives, data.groups, hn.rank_window,
                                        hn.per_query, self.cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(negatives), encoding="utf-8")
        log.info("mined %d hard negatives for %d queries", sum(map(len, negatives)), len(negatives))
        return negatives

    def _encoder(self) -> Encoder:
        settings = {"item_embedding": self.run_cfg.encoder.item_embedding,
                    "fusion_weight": self.run_cfg.encoder.fusion_weight}
        return Encoder(self.dual, self.pre, settings, device=str(self.acc.device))

    def validate(self) -> dict[str, Any] | None:
        if self.valid_dir is None or not self.acc.is_main_process:  # rank 0 scores; `_evaluate` shares them
            return None
        scores = recall_of(embed_split(self._encoder(), self.valid_dir, self.run_cfg.encoder.item_embedding))
        self.model.train()
        return tracking_names(scores)

    def _export(self, path: Path) -> Path:
        if self.acc.is_main_process:
            enc = self.run_cfg.encoder
            save_encoder(self.dual, self.pre, path, item_embedding=enc.item_embedding,
                         fusion_weight=enc.fusion_weight, base=self.base_name)
            (path / "training_config.json").write_text(json.dumps(self.configs, ensure_ascii=False, indent=2,
                                                                  default=str), encoding="utf-8")
            metrics = self.out / "metrics.jsonl"
            if metrics.is_file():
                (path / "metrics.jsonl").write_bytes(metrics.read_bytes())
        return path


def make_step_fn(loop: RetrievalLoop, data: TrainingSet, cfg: RetrievalRunConfig):
    """Batch -> (loss, metrics): one-shot, or gradient-cached when grad_cache_chunk is set. Over
    several processes the loss runs on every rank's rows gathered (global negatives; see
    `distributed.py`): the step back-propagates itself and averages the gradients over the ranks
    on the micro-step that syncs."""
    mode, weight, loss_kind = cfg.encoder.item_embedding, cfg.encoder.fusion_weight, cfg.train.loss
    dual, pre, device, acc = loop.dual, loop.pre, loop.acc.device, loop.acc
    several = acc.num_processes > 1

    def query_fn(inp):
        return dual.embed_text(inp)

    def item_fn(inp):
        text = {k[2:]: v for k, v in inp.items() if k.startswith("t_")}
        if mode == "text":
            return dual.embed_text(text)
        img = dual.embed_image(inp["pixel_values"])
        return img if mode == "image" else fuse(img, dual.embed_text(text), weight)

    def losses(q, d, s, n, masks: Batch):
        """The loss of `masks`' batch; s (siblings) and n (negative texts) may be None."""
        pos = masks.pos.to(device)
        owner = masks.negative_owner.to(device) if n is not None else None
        t, b = dual.scale_bias()
        loss, extra = info_nce(q, d, pos, t, n, owner) if loss_kind == "infonce" else \
            sigmoid_loss(q, d, pos, t, b, n, owner)
        if s is not None:  # same-product matching: a view against other views of its product
            match, m_extra = info_nce(d[: len(s)], s, masks.sibling_pos.to(device), t)
            loss = loss + cfg.train.match_weight * match
            extra = {**extra, "match_loss": float(match.detach()), "match_acc": m_extra["in_batch_acc"]}
        return loss, extra

    def item_inputs(rows: list[int], texts: list[str]) -> dict[str, torch.Tensor]:
        d_in: dict[str, torch.Tensor] = {}
        if mode != "text":
            d_in["pixel_values"] = pixels(rows).to(device)
        if mode != "image":
            d_in.update({f"t_{k}": v.to(device) for k, v in pre.texts(texts).items()})
        return d_in

    def autocast(fn):
        """The towers are called on the unwrapped module, outside accelerate's forward wrapper:
        run them (both gradient-caching passes too) and the loss under its autocast, so a
        bf16/fp16 config trains in mixed precision rather than silently in fp32."""
        def run(*args):
            with acc.autocast():
                return fn(*args)
        return run

    def step(batch: Batch):
        parts = gather_batches(batch) if several else [batch]
        masks = data.merge(parts) if several else batch  # the whole batch the loss sees
        towers = [(autocast(query_fn), {k: v.to(device) for k, v in pre.texts(batch.query_texts).items()}),
                  (autocast(item_fn), item_inputs(batch.items, batch.item_texts))]
        has_sib, has_neg = batch.siblings is not None, bool(batch.negative_texts)
        if has_sib:
            towers.append((autocast(item_fn), item_inputs(batch.siblings, batch.sibling_texts)))
        if has_neg:
            towers.append((autocast(query_fn), {k: v.to(device) for k, v in pre.texts(batch.negative_texts).items()}))

        def loss_fn(q, d, *rest):
            s = rest[0] if has_sib else None
            n = rest[-1] if has_neg else None
            if several:
                q, d, s, n = gather_embeddings(q, d, s, n, parts)
            return losses(q, d, s, n, masks)

        if cfg.train.grad_cache_chunk:
            loss, extra = grad_cache_backward(towers, autocast(loss_fn), cfg.train.grad_cache_chunk,
                                              backward=acc.backward)
        else:
            loss, extra = autocast(loss_fn)(*(fn(inp) for fn, inp in towers))
            if not several:
                return loss, extra  # the loop back-propagates it
            acc.backward(loss)
            loss = loss.detach()
        if several and acc.sync_gradients:
            average_gradients(dual.parameters())
        return loss, extra

    cache: dict[int, torch.Tensor] = {}

    def pixels(rows: list[int]) -> torch.Tensor:
        """Preprocessed images, the first `pixel_cache_items` items kept (decode once)."""
        todo = [j for j in dict.fromkeys(rows) if j not in cache]
        fresh = dict(zip(todo, pre.images([data.items.image(j) for j in todo]))) if todo else {}
        for j, px in fresh.items():
            if len(cache) < cfg.train.pixel_cache_items:
                cache[j] = px
        return torch.stack([cache[j] if j in cache else fresh[j] for j in rows])

    step.does_backward = bool(cfg.train.grad_cache_chunk) or several  # type: ignore[attr-defined]
    return step


def prepare_encoder(cfg: RetrievalRunConfig, vocab_texts: list[str]) -> tuple[DualEncoder, Any, bool]:
    """(dual encoder, preprocessor, from_scratch): builds the tiny model when configured."""
    enc = cfg.encoder
    from_scratch = enc.tiny is not None
    if from_scratch:
        ensure_tiny_encoder(enc.name_or_path, enc.arch, vocab_texts, enc.tiny, enc.max_text_len)
    dual = load_dual_encoder(enc.name_or_path, enc.arch)
    pre = load_preprocessor(enc.name_or_path, dual.arch, enc.max_text_len, enc.trust_remote_code,
                            max_unknown_share=enc.max_unknown_share)
    return dual, pre, from_scratch


def apply_strategy(dual: DualEncoder, cfg: RetrievalRunConfig, from_scratch: bool) -> DualEncoder:
    tc = cfg.train
    if tc.loss == "sigmoid" and (tc.logit_init == "siglip" or (tc.logit_init == "auto" and from_scratch)):
        dual.init_siglip_logits()
    if tc.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in dual.model.named_modules()}
        targets = [t for t in tc.lora_targets if t in names]
        dual.model = get_peft_model(dual.model, LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha,
                                                           target_modules=targets))
        for p in dual.logit_parameters():  # peft froze them; the loss needs both to learn
            p.requires_grad_(True)
    return dual


def train_retriever(train_dir: str | Path, valid_dir: str | Path | None, cfg: RetrievalRunConfig,
                    on_metrics: MetricsCallback | None = None) -> StageResult:
    """Fine-tune the configured encoder; returns the stage result (best model by MeanRecall)."""
    data = TrainingSet(train_dir, seed=cfg.train.seed)
    if cfg.train.text_negatives:
        from ecomcap.retrieval.data.swaps import AttributeSwapper, synthetic_vocab

        data.swapper = AttributeSwapper(cfg.train.attribute_vocab or synthetic_vocab())
    dual, pre, from_scratch = prepare_encoder(cfg, data.texts_for_vocab())
    dual = apply_strategy(dual, cfg, from_scratch)
    loop = RetrievalLoop(dual=dual, pre=pre, cfg=cfg, valid_dir=Path(valid_dir) if valid_dir else None,
                         base_name=cfg.encoder.name_or_path, on_metrics=on_metrics)
    return loop.run(data, make_step_fn(loop, data, cfg))  # type: ignore[arg-type]
