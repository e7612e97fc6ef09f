"""Preference tuning (DPO) after SFT or SCST, on pairs built from the model's own samples.

Our loop rather than TRL's `DPOTrainer`: the pairs come from this project's sampler and combined
reward (CIDEr-D, CLIP-S, attribute truth), and the stage then trains with the same `TrainLoop`
as SFT and SCST (accelerate/DDP/DeepSpeed, exact resume, MLflow metrics, best-checkpoint pick),
the same image-once log-prob pass and the same suppressed tokens, on every model this project
loads (the tiny one included, whose processor TRL's collator does not know).

The reference policy is the starting model: its log-probs of every pair are computed once, when
the pairs are built (TRL's `precompute_ref_log_probs`), and stored with them in `pairs.jsonl` in
the run's folder; a resumed run reads that file back, so it trains on the very same pairs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ecomcap.config import DPOConfig, GenerateConfig, GroundingConfig, ModelConfig
from ecomcap.data.clean import repeated_ngram_share
from ecomcap.data.shards import read_references
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.data.swaps import AttributeSwapper
from ecomcap.text import tokenize_many
from ecomcap.training.budget import check_token_budget, model_token_limit
from ecomcap.training.data import ShardImages
from ecomcap.training.dpo_pairs import (
    Candidate,
    Pair,
    choose_pair,
    known_attributes,
    named_words,
    pair_counts,
    read_pairs,
    read_user_pairs,
    write_pairs,
    wrong_fields,
)
from ecomcap.training.logprob import PolicyLogprob
from ecomcap.training.loop import MetricsCallback, StageResult, TrainLoop
from ecomcap.training.losses import dpo_loss
from ecomcap.training.rewards import CombinedReward
from ecomcap.training.sampling import Sampler
from ecomcap.training.tuning import start_tuning

log = logging.getLogger(__name__)
PAIRS_FILE = "pairs.jsonl"


@dataclass(frozen=True)
class PairExample:
    pair: Pair
    load: Callable[[], Image.Image] = field(repr=False, compare=False)

    @cached_property
    def image(self) -> Image.Image:
        return self.load()


class PairSet:
    """The pairs and the training images they point at."""

    def __init__(self, pairs: Sequence[Pair], images: ShardImages):
        row = {image_id: i for i, image_id in enumerate(images.ids)}
        self.pairs, self.images = list(pairs), images
        self.rows = [row[p.image_id] for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)


class DPOLoop(TrainLoop):
    """The shared loop over pairs: epoch order a seeded permutation, a pure function of the epoch."""

    def epoch_size(self, data: PairSet) -> int:  # type: ignore[override]
        return len(data)

    def item(self, data: PairSet, epoch: int, i: int) -> PairExample:  # type: ignore[override]
        j = self._pair_order(len(data), epoch)[i]
        row = data.rows[j]
        return PairExample(data.pairs[j], lambda: data.images.image(row))

    def _pair_order(self, n: int, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(n))
            random.Random(f"{self.cfg.seed}:dpo:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _order_digest(self, data: PairSet) -> str:  # type: ignore[override]
        """Hash of the first epoch's pair order and of the pairs (ranks must agree on both)."""
        key = [self._pair_order(len(data), 0), [(p.image_id, p.chosen, p.rejected) for p in data.pairs]]
        return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:16]


def _answers(builder, pairs: Sequence[Pair], max_tokens: int, raw: list[list[int]] | None = None) -> list[list[int]]:
    """chosen, rejected, chosen, rejected, ... token ids, cut to `max_tokens - 1` and closed by EOS,
    except a rejected sample that was cut at the length limit (scored as it was sampled); `raw`:
    the captions' uncut ids when the caller has them."""
    raw = raw if raw is not None else _token_ids(builder, pairs)
    ends = [e for p in pairs for e in (True, p.rejected_ended)]
    return [list(x[: max_tokens - 1]) + ([builder.eos_id] if e else []) for x, e in zip(raw, ends)]


def _token_ids(builder, pairs: Sequence[Pair]) -> list[list[int]]:
    texts = [t for p in pairs for t in (p.chosen, p.rejected)]
    return builder.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]


def drop_cut_ties(builder, pairs: list[Pair], max_tokens: int) -> list[Pair]:
    """Pairs whose two captions are the same once cut to `max_tokens` teach nothing: dropped and
    counted; captions longer than the cut are counted too (raise `dpo.max_answer_tokens`)."""
    raw = _token_ids(builder, pairs)
    ids = _answers(builder, pairs, max_tokens, raw)
    long = sum(len(x) > max_tokens - 1 for x in raw)
    kept = [p for n, p in enumerate(pairs) if ids[2 * n] != ids[2 * n + 1]]
    if long or len(kept) < len(pairs):
        log.warning("dpo: %d captions are longer than dpo.max_answer_tokens %d and are cut; %d pairs the same once "
                    "cut are dropped", long, max_tokens, len(pairs) - len(kept))
    return kept


class DPOStep:
    """One DPO step: the pairs' log-probs under the policy in one forward, the DPO (+ RPO) loss."""

    def __init__(self, loop: TrainLoop, cfg: DPOConfig, policy: PolicyLogprob):
        self.loop, self.cfg, self.policy = loop, cfg, policy

    def __call__(self, examples: list[PairExample]):
        dev, pairs = self.loop.acc.device, [e.pair for e in examples]
        enc = {k: v.to(dev) for k, v in self.loop.builder.prompts([e.image for e in examples]).items()}
        lp, ntok = self.policy.sequence_logprobs(enc, _answers(self.loop.builder, pairs, self.cfg.max_answer_tokens), 2)
        ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=lp.dtype, device=dev)
        loss, logs = dpo_loss(lp[0::2], lp[1::2], ref[:, 0], ref[:, 1], self.cfg.beta)
        if self.cfg.rpo_alpha > 0:
            nll = (-lp[0::2] / ntok[0::2].clamp(min=1)).mean()
            loss = loss + self.cfg.rpo_alpha * nll
            logs["chosen_nll"] = float(nll.detach())
        return loss, logs


class PairBuilder:
    """Samples K captions per training image with the starting policy, scores them and picks a
    pair per image (`dpo_pairs.choose_pair`); then the reference log-probs of every pair."""

    def __init__(self, loop: TrainLoop, cfg: DPOConfig, sampler: Sampler, reward: CombinedReward,
                 policy: PolicyLogprob, vocab: dict[str, list[str]], attributes: dict[str, dict] | None):
        self.loop, self.cfg, self.reward, self.policy = loop, cfg, reward, policy
        self.sampler = sampler
        self.swapper = AttributeSwapper(vocab)
        self.attributes = attributes or {}
        self.batch = max(1, cfg.batch_size)

    def rows(self, data: ShardImages) -> list[int]:
        """The images pairs are built for: a seeded choice of `pair_images` (all when 0)."""
        rows = list(range(len(data)))
        random.Random(f"{self.cfg.seed}:dpo-images").shuffle(rows)
        return sorted(rows[: self.cfg.pair_images or len(rows)])

    def own_pairs(self, data: ShardImages, rows: list[int]) -> list[Pair]:
        acc, out = self.loop.acc, []
        mine = _rank_slice(rows, acc.num_processes, acc.process_index)  # every rank as many batches
        rng = random.Random(f"{self.cfg.seed}:dpo-swap:{acc.process_index}")
        bar = tqdm(range(0, len(mine), self.batch), desc="dpo pairs", unit="batch",
                   disable=not acc.is_local_main_process or None)
        for b in bar:
            batch = mine[b: b + self.batch]
            out += self._pairs_of([r for r, _ in batch], data, rng, keep=[k for _, k in batch])
        bar.close()
        return _gather(acc, out)

    def _pairs_of(self, batch: list[int], data: ShardImages, rng: random.Random, keep: list[bool]) -> list[Pair]:
        k, dev = self.cfg.samples, self.loop.acc.device
        images = [data.image(r) for r in batch]
        enc = {key: v.to(dev) for key, v in self.loop.builder.prompts(images).items()}
        seqs, ended = self.sampler.sample(enc, k)
        captions = self.sampler.decode(seqs)
        ids = [data.ids[r] for r in batch for _ in range(k)]
        owner = [i // k for i in range(len(captions))]
        scores, _ = self.reward(captions, ended, ids, images, owner)
        loops = [repeated_ngram_share(t, 3) > self.cfg.loop_share for t in tokenize_many(captions)]
        out = []
        for i, row in enumerate(batch):
            if not keep[i]:
                continue
            image_id, refs = data.ids[row], data.texts[row]
            truth = self.attributes.get(image_id)
            known = known_attributes(refs, self.swapper, truth)
            allowed = None if truth is not None else named_words(refs, self.swapper)  # refs' own words never contradict
            cands = [Candidate(captions[j], float(scores[j]), ended[j], loops[j],
                               wrong_fields(captions[j], known, self.swapper, allowed)) for j in range(i * k, (i + 1) * k)]
            pair = choose_pair(image_id, cands, refs, known, self.swapper, rng, chosen_fallback=self.cfg.chosen_fallback,
                               min_reward_gap=self.cfg.min_reward_gap, swap_rejected=self.cfg.swap_rejected)
            if pair is not None:
                out.append(pair)
        return out

    @torch.no_grad()
    def with_reference(self, pairs: list[Pair], data: ShardImages) -> list[Pair]:
        """Each pair with the starting policy's log-probs of its two captions (every rank a slice)."""
        acc, row = self.loop.acc, {image_id: i for i, image_id in enumerate(data.ids)}
        mine = _rank_slice(list(range(len(pairs))), acc.num_processes, acc.process_index)
        out = []
        for b in range(0, len(mine), self.batch):
            batch = mine[b: b + self.batch]
            chunk = [pairs[j] for j, _ in batch]
            enc = {k: v.to(acc.device) for k, v in
                   self.loop.builder.prompts([data.image(row[p.image_id]) for p in chunk]).items()}
            lp, _ = self.policy.sequence_logprobs(enc, _answers(self.loop.builder, chunk, self.cfg.max_answer_tokens),
                                                  2, reference=True)
            lp = lp.float().cpu().tolist()
            out += [(j, replace(p, ref_chosen=lp[2 * n], ref_rejected=lp[2 * n + 1]))
                    for n, ((j, keep), p) in enumerate(zip(batch, chunk)) if keep]
        return [p for _, p in sorted(_gather(acc, out))]


def _rank_slice(items: list, world: int, rank: int) -> list[tuple]:
    """This rank's share of `items` as (item, keep) pairs, padded with repeats marked keep=False so
    every rank runs as many batches (ZeRO-3 generation is collective)."""
    if not items:
        return []
    per = -(-len(items) // world)
    mine = [(x, True) for x in items[rank * per:(rank + 1) * per]]
    return mine + [(items[0], False)] * (per - len(mine))


def _gather(acc, items: list) -> list:
    if acc.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return list(gather_object(items))


def load_or_build_pairs(builder: PairBuilder, data: ShardImages, cfg: DPOConfig, out: Path) -> list[Pair]:
    """The run's pairs: read back when resuming, else built (own samples + user pairs) and written."""
    path = out / PAIRS_FILE
    if path.is_file() and cfg.resume:
        pairs = read_pairs(path)
        log.info("dpo: %d pairs read back from %s", len(pairs), path)
        return pairs
    pairs: list[Pair] = []
    if cfg.own_pairs:
        rows = builder.rows(data)
        pairs = builder.own_pairs(data, rows)
        log.info("dpo: %d pairs from %d images' own samples, %d images without a pair (no attribute-right caption "
                 "or none worse); %s", len(pairs), len(rows), len(rows) - len(pairs),
                 ", ".join(f"{k} {v}" for k, v in pair_counts(pairs).items()))
    if cfg.pairs_file:
        user, bad = read_user_pairs(cfg.pairs_file, data.ids)
        log.info("dpo: %d user pairs from %s, %d rows quarantined (%s)", len(user), cfg.pairs_file, len(bad),
                 out / "pairs_quarantine.jsonl")
        if bad and builder.loop.acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "pairs_quarantine.jsonl").write_text(
                "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad), encoding="utf-8")
            for b in bad[:5]:
                log.warning("dpo.pairs_file line %d quarantined: %s", b["line"], b["reason"])
        pairs += user
    pairs = drop_cut_ties(builder.loop.builder, pairs, cfg.max_answer_tokens)
    if not pairs:
        hint = ("set grounding.attribute_vocab (field -> words) so that wrong attributes can be told, or give "
                "dpo.pairs_file" if not builder.swapper.vocab else
                "raise dpo.samples or dpo.pair_images, turn on dpo.swap_rejected, or give dpo.pairs_file")
        raise EcomcapError(f"dpo: no pairs (no sample was worse than another in a way that counts): {hint}")
    pairs = builder.with_reference(pairs, data)
    if builder.loop.acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_pairs(path, pairs)
    builder.loop.acc.wait_for_everyone()
    return pairs


def _file_digest(path: Path | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path and Path(path).is_file() else None


def _digest(obj) -> str | None:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16] if obj else None


def run_dpo(
    start_model_dir: str | Path,
    train_dir: str | Path,
    valid_dir: str | Path | None,
    model_cfg: ModelConfig,
    cfg: DPOConfig,
    gen_cfg: GenerateConfig | None = None,
    on_metrics: MetricsCallback | None = None,
    dev_images: int = 0,
    scorer_dir: str | Path | None = None,
    grounding: GroundingConfig | None = None,
    attributes: dict[str, dict] | None = None,
) -> StageResult:
    """DPO from a finished stage's output (merged when it is an adapter); a fresh adapter by default,
    reference = the starting model. `attributes`: ground truth by training image id, when the data
    has it (the synthetic set); else the references' agreed values are the known attributes."""
    gen_cfg, grounding = gen_cfg or GenerateConfig(), grounding or GroundingConfig()
    vocab = grounding.attribute_vocab or _default_vocab(attributes)
    extra = {"vocab": vocab, "pairs_file": _file_digest(cfg.pairs_file), "attributes": _digest(attributes)}
    loop, train, scorer, cfg, gen_cfg = start_tuning("dpo", DPOLoop, start_model_dir, train_dir, valid_dir, model_cfg, cfg, gen_cfg,
                                                     on_metrics, dev_images, scorer_dir, grounding, extra=extra)
    check_token_budget(train, loop.builder, max(cfg.max_new_tokens, cfg.max_answer_tokens),
                       model_token_limit(loop.acc.unwrap_model(loop.model), model_cfg.max_seq_len))
    acc = loop.acc
    # the log-prob pass only (DPO's loss is backwarded by the loop, in one forward per step)
    sampler = Sampler(loop, cfg, gen_cfg)
    policy = PolicyLogprob(model=loop.model, inner=acc.unwrap_model(loop.model), pad_id=loop.builder.pad_id,
                           suppress=sampler.suppress, autocast=acc.autocast)
    builder = PairBuilder(loop, cfg, sampler, CombinedReward(read_references(train_dir), cfg.reward, scorer),
                          policy, vocab, attributes)
    pairs = load_or_build_pairs(builder, train, cfg, loop.out)
    if on_metrics is not None and acc.is_main_process:
        on_metrics({f"dpo/{k}": float(v) for k, v in pair_counts(pairs).items()}, 0)
    return loop.run(PairSet(pairs, train), DPOStep(loop, cfg, policy))


def _default_vocab(attributes: dict | None) -> dict[str, list[str]]:
    """The synthetic set's words when its ground truth is given; else none (no attribute checks)."""
    if not attributes:
        log.warning("dpo: no attribute vocabulary (grounding.attribute_vocab) and no ground truth: pairs are "
                    "built from loops and generic captions only")
        return {}
    from ecomcap.retrieval.data.swaps import synthetic_vocab

    return synthetic_vocab()
