"""Tuning the first run: the training pipeline's stages without ZenML, CPU seconds per stage.

    OMP_NUM_THREADS=1 python benchmarks/first_run_stages.py --tag B --set model.prompt=描述商品。 \\
        --set sft.max_steps=950 --set sft.eval_every=320 --set scst.max_steps=10 --set scst.eval_every=0
    OMP_NUM_THREADS=1 python benchmarks/first_run_stages.py --profile 14   # CPU-s per SFT step, per prompt

Reads configs/local.yaml (or --config) with dotted overrides, runs data prep, SFT (best model
picked on the dev split, as the pipeline does), SCST, and beam decoding of the valid split after
each, with attribute accuracy; process CPU time is the robust figure on a shared box. One training
at a time; the last line is one JSON object. `benchmarks/first_run.py` then times the real pipeline.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecomcap.config import FinetuneConfig, ModelConfig, RunConfig, parse_model  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load(config: Path, sets: list[str], work: Path, tag: str) -> RunConfig:
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))["parameters"]["config"]
    for s in sets:
        key, value = s.split("=", 1)
        *path, last = key.split(".")
        node = raw
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    prompt = raw["model"].get("prompt", ModelConfig().prompt)  # the tiny vocabulary holds the prompt's chars
    raw["data"]["work_dir"] = str(work / "data")
    raw["model"]["name_or_path"] = str(work / f"tiny-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}")
    raw["sft"]["output_dir"], raw["scst"]["output_dir"] = str(work / tag / "sft"), str(work / tag / "scst")
    return parse_model(RunConfig, raw, str(config))


def evaluate(cfg: RunConfig, model_dir: Path, work: Path, name: str) -> dict:
    from ecomcap.data.shards import read_references
    from ecomcap.inference.batch import generate_for_dataset
    from ecomcap.metrics.attributes import read_attributes
    from ecomcap.metrics.report import caption_report
    from ecomcap.modeling.load import load_trained

    c0 = cpu_s()
    model, processor = load_trained(model_dir, cfg.model)
    valid = Path(cfg.data.work_dir) / "valid"
    preds = generate_for_dataset(model, processor, cfg.model.prompt, valid, work / f"gen_{name}.jsonl", cfg.generate)
    rep = caption_report(preds, read_references(valid),
                         read_attributes(Path(cfg.data.work_dir) / "raw" / "attributes_valid.jsonl"))
    out = {"CIDEr-D": round(rep["CIDEr-D"], 3), **{k: round(v, 3) for k, v in rep["attributes"].items() if k != "n"},
           "generate_cpu_s": round(cpu_s() - c0, 1)}
    print(name, out, list(preds.values())[:3], flush=True)
    return out


def stages(args) -> dict:
    from ecomcap.data.prepare import prepare_data
    from ecomcap.modeling.prepare import ensure_model
    from ecomcap.training.scst import run_scst
    from ecomcap.training.sft import run_sft

    cfg = load(args.config, args.set, args.work, args.tag)
    prepare_data(cfg.data)
    train, valid = Path(cfg.data.work_dir) / "train", Path(cfg.data.work_dir) / "valid"
    ensure_model(cfg.model, train)
    res: dict = {"tag": args.tag, "set": args.set, "threads": torch.get_num_threads()}
    c0, w0 = cpu_s(), time.perf_counter()
    sft = run_sft(train, valid, cfg.model, cfg.finetune, cfg.sft, cfg.generate, dev_images=cfg.data.dev_images)
    res.update(sft_steps=sft.steps, sft_cpu_s=round(cpu_s() - c0, 1), sft_wall_s=round(time.perf_counter() - w0, 1),
               sft_dev_curve=[(e["step"], round(e["CIDEr-D"], 3)) for e in sft.evals])
    res["after_sft"] = evaluate(cfg, sft.model_dir, args.work / args.tag, "after_sft")
    if cfg.scst.enabled and cfg.scst.max_steps:
        c0, w0 = cpu_s(), time.perf_counter()
        scst = run_scst(sft.model_dir, train, valid, cfg.model, cfg.scst, cfg.generate, dev_images=cfg.data.dev_images)
        res.update(scst_steps=scst.steps, scst_cpu_s=round(cpu_s() - c0, 1),
                   scst_wall_s=round(time.perf_counter() - w0, 1))
        res["after_scst"] = evaluate(cfg, scst.model_dir, args.work / args.tag, "after_scst")
    return res


def profile(args) -> dict:
    """CPU-s of one full-finetune SFT step (forward, backward, AdamW) per prompt, interleaved."""
    from ecomcap.data.prepare import prepare_data
    from ecomcap.modeling.load import load_base
    from ecomcap.modeling.prepare import ensure_model
    from ecomcap.modeling.strategies import apply_strategy
    from ecomcap.training.collate import PromptBuilder, answer_logits, with_answers
    from ecomcap.training.data import ShardImages
    from ecomcap.training.losses import sft_loss

    cfg = load(args.config, args.set, args.work, "profile")
    prepare_data(cfg.data)
    data = ShardImages(Path(cfg.data.work_dir) / "train")
    runs = {}
    for name, prompt in (("default", ModelConfig().prompt), ("config", cfg.model.prompt)):
        mcfg = cfg.model.model_copy(update={"prompt": prompt})
        ensure_model(mcfg, Path(cfg.data.work_dir) / "train")
        model, processor = load_base(mcfg, None)
        model, _ = apply_strategy(model, FinetuneConfig(strategy="full"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft.lr)
        runs[name] = (model.train(), PromptBuilder(processor, prompt), opt, [])
    bs = cfg.sft.batch_size
    for step in range(args.profile + 2):
        rows = [(step * bs + j) % len(data) for j in range(bs)]
        for model, builder, opt, times in runs.values():
            c0 = time.process_time()
            batch = with_answers(builder.prompts([data.image(i) for i in rows]),
                                 builder.answer_ids([data.texts[i][0] for i in rows], cfg.sft.max_answer_tokens),
                                 builder.pad_id)
            logits, targets = answer_logits(model, batch)
            sft_loss(logits, targets, cfg.sft.label_smoothing).backward()
            opt.step()
            opt.zero_grad()
            if step >= 2:  # first steps warm the allocator
                times.append(time.process_time() - c0)
            if step == 0:
                print(f"{builder.text!r}: sequence length {batch.inputs['input_ids'].shape[1]}", flush=True)
    out = {f"{n}_cpu_s_per_step": round(sum(r[3]) / len(r[3]), 3) for n, r in runs.items()}
    out["ratio_config_vs_default"] = round(sum(runs["config"][3]) / sum(runs["default"][3]), 3)
    out.update(batch_size=bs, threads=torch.get_num_threads(), prompt=cfg.model.prompt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    ap.add_argument("--set", action="append", default=[], help="dotted override, e.g. sft.max_steps=950")
    ap.add_argument("--work", type=Path, default=ROOT / ".run" / "bench_first_run")
    ap.add_argument("--tag", default="run", help="output folder under --work (several candidates side by side)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="N: only time N SFT steps, default vs config prompt")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(json.dumps(profile(args) if args.profile else stages(args), ensure_ascii=False))


if __name__ == "__main__":
    main()
