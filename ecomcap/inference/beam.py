"""Beam search that starts from one prefill per image and reads only what beam search needs.

Stock `generate` (transformers 5.x `_beam_search`) decodes every step as: copy the logits to a
float32 tensor, log-softmax over the vocabulary, logits processors, add each beam's score to all
`num_beams x vocab` log-probs, then one top-k over that whole row per image. Its first step
feeds the last prompt token once per beam although all beams of an image are still the same
sequence (the other beams only carry a -1e9 score). Here:

- the whole prompt (image included) is prefilled once per image, and the first step's logits
  come from that single row per image; the cache is expanded to the beams by the first reorder;
- suppressed tokens are set to -inf in place (six columns, not a `where` over the vocabulary);
- the top-k is taken per beam first (the best K continuations of an image are among the best K
  of their own beam, since a beam's score shifts all its log-probs alike), then over the
  `num_beams x K` candidates: the same values as the stock top-k (`log_prob + beam_score`, the
  same float operations), without materialising `num_beams x vocab` sums;
- the repetition penalty and n-gram blocking run on the device over all beams at once
  (`ecomcap.inference.penalties`), over the caption's tokens or, for comparison, with the prompt.

The bookkeeping after the top-k (finished hypotheses, length penalty, early stopping, output
length and fill value) follows `_beam_search` operation by operation, so the token ids equal the
stock path's (with the penalties under the `prompt` rule, which is `generate`'s). Anything this
loop does not implement (sampling, custom processors, score outputs, ZeRO-3 peers that must step
together) keeps `generate`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ecomcap.inference.penalties import PenaltyScope, apply_penalties, left_padding
from ecomcap.inference.prefill import cache_kwarg, forward_last, generative_model, prompt_positions
from ecomcap.modeling.partitions import generation_gathered

# `generate` arguments this loop implements; any other (or a non-neutral value of these) keeps `generate`
HANDLED = ("max_new_tokens", "num_beams", "do_sample", "eos_token_id", "pad_token_id", "suppress_tokens",
           "repetition_penalty", "no_repeat_ngram_size", "length_penalty", "early_stopping", "temperature",
           "top_k", "top_p", "num_return_sequences", "synced_gpus")
# generation_config fields that add logits processors or stopping criteria `generate` would apply
PROCESSOR_FIELDS = ("min_length", "min_new_tokens", "bad_words_ids", "force_words_ids", "forced_bos_token_id",
                    "forced_eos_token_id", "begin_suppress_tokens", "sequence_bias", "renormalize_logits",
                    "exponential_decay_length_penalty", "encoder_repetition_penalty", "diversity_penalty",
                    "num_beam_groups", "constraints", "stop_strings", "max_time", "epsilon_cutoff", "eta_cutoff",
                    "typical_p", "min_p", "guidance_scale", "watermarking_config")
# values of those fields under which `generate` adds nothing; sampling-only ones do nothing in beam search
NEUTRAL = {"min_length": 0, "min_new_tokens": 0, "renormalize_logits": False, "encoder_repetition_penalty": 1.0,
           "diversity_penalty": 0.0, "num_beam_groups": 1, "guidance_scale": 1.0}
SAMPLING_ONLY = {"typical_p", "min_p", "epsilon_cutoff", "eta_cutoff"}
# generation_config fields that change what `generate` returns or refuses (the loop returns ids only)
OUTPUT_FIELDS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                 "output_hidden_states", "low_memory", "remove_invalid_values")
PASSED = ("num_beams", "max_new_tokens", "eos_token_id", "pad_token_id", "suppress_tokens", "length_penalty",
          "early_stopping", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size")


def plan(gen_model, kw: dict, penalty_scope: PenaltyScope = "prompt") -> dict | None:
    """`beam_search`'s arguments when it gives what `generate(**kw)` gives on this model, else None.

    Like `generate`, a field `kw` leaves out comes from the model's generation_config (a Qwen
    Instruct checkpoint's says `repetition_penalty: 1.05`, `do_sample: true`): the decision and
    the arguments are taken from those effective values. `penalty_scope`: which tokens the
    penalties read (`prompt`: `generate`'s rule)."""
    from transformers import GenerationConfig

    if set(kw) - set(HANDLED):
        return None
    default = GenerationConfig()
    gc = getattr(gen_model, "generation_config", None) or default
    eff = {f: kw[f] if f in kw else getattr(gc, f, getattr(default, f, None)) for f in HANDLED}
    if int(eff["num_beams"] or 1) < 2 or eff["do_sample"] or eff["max_new_tokens"] is None:
        return None
    if int(eff["num_return_sequences"] or 1) > int(eff["num_beams"]):
        return None
    if any(_adds_processor(gc, default, f) for f in PROCESSOR_FIELDS if f not in SAMPLING_ONLY):
        return None
    if any(getattr(gc, f, None) for f in OUTPUT_FIELDS) or getattr(gc, "use_cache", None) is False:
        return None
    if eff["synced_gpus"] or zero3_peers(gen_model):
        return None
    out = {f: eff[f] for f in PASSED}
    out["length_penalty"] = 1.0 if out["length_penalty"] is None else out["length_penalty"]
    out["num_return_sequences"] = int(out["num_return_sequences"] or 1)
    out["repetition_penalty"] = float(out["repetition_penalty"] or 1.0)
    out["no_repeat_ngram_size"] = int(out["no_repeat_ngram_size"] or 0)
    out["penalty_scope"] = penalty_scope
    return out


def _adds_processor(gc, default, field: str) -> bool:
    value = getattr(gc, field, None)
    return not (value is None or value == getattr(default, field, None) or value == NEUTRAL.get(field, object()))


def zero3_peers(gen_model) -> bool:
    """ZeRO-3 ranks must run the same number of forwards (`generate` keeps them stepping together).
    Partitioned parameters carry `ds_id` even where transformers' global ZeRO-3 flag is unset."""
    dist = torch.distributed
    if generation_gathered() or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    first = next(gen_model.parameters(), None)
    return is_deepspeed_zero3_enabled() or hasattr(first, "ds_id")


@dataclass
class Beams:
    """Per image: the running beams and the best finished hypotheses (`_beam_search`'s tensors,
    generated tokens only; the prompt is the same for every beam of an image)."""
    running: torch.Tensor          # [B, n, T] token ids of the running beams
    running_scores: torch.Tensor   # [B, n]
    done: torch.Tensor             # [B, n, T] finished hypotheses
    done_scores: torch.Tensor      # [B, n] (length-penalised)
    done_len: torch.Tensor         # [B, n] generated tokens of each finished hypothesis
    is_done: torch.Tensor          # [B, n] bool
    improvable: torch.Tensor       # [B, 1] bool: the early-stop heuristic is not yet satisfied

    @classmethod
    def start(cls, B: int, n: int, T: int, fill: int, dev) -> "Beams":
        """Before the first step: no tokens, running scores 0, no finished hypothesis (-1e9)."""
        return cls(running=torch.full((B, n, T), fill, dtype=torch.long, device=dev),
                   running_scores=torch.zeros(B, n, dtype=torch.float32, device=dev),
                   done=torch.full((B, n, T), fill, dtype=torch.long, device=dev),
                   done_scores=torch.full((B, n), -1e9, dtype=torch.float32, device=dev),
                   done_len=torch.zeros(B, n, dtype=torch.long, device=dev),
                   is_done=torch.zeros(B, n, dtype=torch.bool, device=dev),
                   improvable=torch.ones(B, 1, dtype=torch.bool, device=dev))


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


@torch.no_grad()
def beam_search(model, enc: dict[str, torch.Tensor], *, num_beams: int, max_new_tokens: int, eos_token_id=None,
                pad_token_id=None, suppress_tokens=None, length_penalty: float = 1.0, early_stopping=False,
                num_return_sequences: int = 1, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                penalty_scope: PenaltyScope = "prompt", **_neutral) -> torch.Tensor:
    """Token ids [B * num_return_sequences, prompt + generated], as `generate(**enc, num_beams=...)`."""
    n, ids = int(num_beams), enc["input_ids"]
    B, dev, T = ids.shape[0], ids.device, int(max_new_tokens)
    eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=dev).view(-1)
    k = max(2, 1 + (0 if eos is None else eos.numel())) * n
    fill = (pad_token_id or int(eos[0])) if eos is not None else -1  # `_beam_search`'s `pad or eos[0]`
    sup = torch.as_tensor(list(suppress_tokens or ()), dtype=torch.long, device=dev)

    position_ids = prompt_positions(generative_model(model), enc)
    logits, cache = forward_last(model, **enc, position_ids=position_ids)
    beams = Beams.start(B, n, T, fill, dev)
    # per step only the new token's row changes: the beams' prompt mask and next positions, made once
    mask = enc.get("attention_mask")
    beam_mask = (torch.ones_like(ids) if mask is None else mask).repeat_interleave(n, 0)
    next_pos = position_ids[..., -1:].repeat_interleave(n, dim=-2) + 1
    text_types = {"mm_token_type_ids": enc["mm_token_type_ids"].new_zeros(B * n, 1)} if "mm_token_type_ids" in enc else {}
    history = _History(ids, mask, n, penalty_scope) if (repetition_penalty != 1.0 or no_repeat_ngram_size > 0) else None
    for t in range(T):
        rows_per_image = 1 if t == 0 else n
        log_probs = torch.nn.functional.log_softmax(logits.to(dtype=torch.float32, device=dev), dim=-1)
        if sup.numel():
            log_probs[:, sup] = -float("inf")
        if history is not None:
            seq, ignore = history.at(beams, rows_per_image, t)
            log_probs = apply_penalties(log_probs, seq, repetition_penalty, no_repeat_ngram_size, ignore)
        src, hits = _step(beams, log_probs, rows_per_image, t, k, n, T, eos, length_penalty, early_stopping)
        if not _unfinished(beams, hits, early_stopping):
            break
        cache.reorder_cache((torch.arange(B, device=dev).view(B, 1) * rows_per_image + src).view(-1))
        logits, cache = forward_last(model, input_ids=beams.running[:, :, t].reshape(B * n, 1),
                                     attention_mask=torch.cat([beam_mask, beam_mask.new_ones(B * n, t + 1)], 1),
                                     position_ids=next_pos + t, **{cache_kwarg(): cache}, **text_types)
    r = int(num_return_sequences)
    length = int(beams.done_len[:, :r].max())
    gen = beams.done[:, :r, :length].reshape(B * r, length)
    return torch.cat([ids.repeat_interleave(r, 0), gen], dim=1)


class _History:
    """What the penalties read at step t, one row per running beam: the caption so far, after the
    prompt under the `prompt` rule (its left padding ignored by the repetition penalty)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None, n: int, scope: PenaltyScope):
        keep = ids.shape[1] if scope == "prompt" else 0
        pad = None
        if keep:  # (no mask: nothing is padding)
            pad = left_padding(mask, ids.shape) if mask is not None else torch.zeros_like(ids, dtype=torch.bool)
        self.prompt = {1: ids[:, :keep], n: ids[:, :keep].repeat_interleave(n, 0)}
        self.pad = None if pad is None else {1: pad, n: pad.repeat_interleave(n, 0)}

    def at(self, b: Beams, rows: int, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompt = self.prompt[rows]
        seq = torch.cat([prompt, b.running[:, :rows, :t].reshape(prompt.shape[0], t)], dim=1)
        if self.pad is None:
            return seq, None
        return seq, torch.cat([self.pad[rows], self.pad[rows].new_zeros(prompt.shape[0], t)], dim=1)


def _step(b: Beams, log_probs: torch.Tensor, rows_per_image: int, t: int, k: int, n: int, T: int, eos,
          length_penalty: float, early_stopping) -> tuple[torch.Tensor, torch.Tensor]:
    """One `_beam_search` iteration after the logits: returns each new running beam's source row
    (within its image) and which of the K candidates hit a stopping criterion."""
    B = b.running.shape[0]
    vals, tok = log_probs.topk(k, dim=-1)                     # [B * rows, k], best k per beam
    scores = b.running_scores[:, :rows_per_image].reshape(-1, 1)
    acc = (vals + scores).view(B, rows_per_image * k)
    top_lp, pos = acc.topk(k, dim=-1)                         # [B, k], as the stock top-k over beams x vocab
    beam = pos // k
    token = tok.view(B, rows_per_image * k).gather(1, pos)
    seqs = _gather(b.running[:, :rows_per_image], beam)      # [B, k, T]
    seqs[:, :, t] = token
    hits = torch.zeros_like(token, dtype=torch.bool) if eos is None else torch.isin(token, eos)
    if t + 1 >= T:
        hits = torch.ones_like(hits)
    # running beams for the next step (`_get_running_beams_for_next_iteration`)
    running_lp = top_lp + hits.to(torch.float32) * -1.0e9
    nxt = torch.topk(running_lp, k=n)[1]
    b.running, b.running_scores, src = _gather(seqs, nxt), _gather(running_lp, nxt), _gather(beam, nxt)
    # finished hypotheses (`_update_finished_beams`): only the top n candidates may finish
    just = hits.clone()
    just[:, n:] = False
    lp = top_lp / ((t + 1) ** length_penalty)
    lp += (torch.all(b.is_done, dim=-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * -1.0e9
    lp += (~b.improvable).to(torch.float32) * -1.0e9
    lp += (~just) * -1.0e9
    merged_scores = torch.cat((b.done_scores, lp), dim=1)
    best = torch.topk(merged_scores, k=n)[1]
    b.done = _gather(torch.cat((b.done, seqs), dim=1), best)
    b.done_scores = _gather(merged_scores, best)
    b.done_len = _gather(torch.cat((b.done_len, torch.full_like(token, t + 1)), dim=1), best)
    b.is_done = _gather(torch.cat((b.is_done, just), dim=1), best)
    # early-stop heuristic (`_check_early_stop_heuristic`, after cur_len + 1)
    length = T if (early_stopping == "never" and length_penalty > 0.0) else t + 1
    best_running = b.running_scores[:, :1] / (length ** length_penalty)
    worst_done = torch.where(b.is_done, torch.min(b.done_scores, dim=1, keepdim=True)[0], -1.0e9)
    b.improvable = b.improvable & torch.any(best_running > worst_done, dim=-1, keepdim=True)
    return src, hits


def _unfinished(b: Beams, hits: torch.Tensor, early_stopping) -> bool:
    """`_beam_search_has_unfinished_sequences`."""
    exists_open = not (bool(torch.all(b.is_done)) and early_stopping is True)
    return bool(torch.any(b.improvable)) and exists_open and not bool(torch.all(hits))
