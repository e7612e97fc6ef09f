"""Training throughput and memory per process: 1 process vs 2 (DDP, DeepSpeed ZeRO-2, ZeRO-3).

    python benchmarks/scaling.py [--steps 10] [--batch 4] [--modes single,ddp,zero2,zero3]
    python benchmarks/scaling.py --device cuda          # on a GPU machine (modes that fit its GPUs)

Every mode runs the same SFT of the tiny Qwen2.5-VL (full fine-tuning, fp32 on CPU, bf16 on GPU)
through `ecomcap.launch`, exactly as the pipeline's step does: `launch.num_processes` and
`launch.config_file` are all that change. The per-process batch is fixed (`--batch`), so 2
processes train twice the images per step. Reported per mode: images/s over the steps after
`--warmup` (wall time of each step, from the run's metrics.jsonl), the speedup over one process,
peak RSS of each process, peak GPU memory of each process (GPU runs), the final loss, and the
cosine LR at the last step (0 in every mode: one scheduler step per optimizer step). On this
2-core CPU box each of 2 processes gets one core (1 process: 2 threads), so a speedup near 1 is
what the hardware allows; the figures to read here are the memory split and the agreement, and on
a box shared with other work images per CPU-second (wall time there measures the neighbours;
`--threads 1` gives every process one thread).
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ACCEL = ROOT / "configs" / "accelerate"
MODES = {  # name: (processes, accelerate config; None = DDP / one plain process)
    "single": (1, None),
    "ddp": (2, None),
    "zero2": (2, "deepspeed_zero2.yaml"),
    "zero3": (2, "deepspeed_zero3.yaml"),
    "zero2_1": (1, "deepspeed_zero2.yaml"),  # one GPU: the engine's own cost, nothing to shard over
    "zero3_1": (1, "deepspeed_zero3.yaml"),
}


def train_once(data: str, model_dir: str, out: str, steps: int, batch: int, device: str) -> dict:
    """One process of one mode (run by `ecomcap.launch`): train, then gather every rank's figures."""
    import torch

    from ecomcap.config import FinetuneConfig, GenerateConfig, ModelConfig, SFTConfig
    from ecomcap.launch import all_ranks
    from ecomcap.training.sft import run_sft

    cpu0 = _cpu_s()
    model_cfg = ModelConfig(name_or_path=model_dir, device=device)
    sft = SFTConfig(output_dir=out, max_steps=steps, batch_size=batch, lr=1e-3, eval_every=0, save_every=0,
                    resume=False, warmup_ratio=0.1)
    res = run_sft(Path(data) / "train", None, model_cfg, FinetuneConfig(strategy="full"), sft,
                  GenerateConfig(num_beams=1, max_new_tokens=8))
    mine = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_s": _cpu_s() - cpu0,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0}
    ranks = all_ranks(mine)
    rows = [json.loads(x) for x in (res.final_dir.parent / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    return {"ranks": ranks, "rows": rows, "weights": res.param_digest}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_mode(name: str, data: Path, model_dir: Path, work: Path, args) -> dict:
    from ecomcap.config import LaunchConfig
    from ecomcap.launch import launch

    n, config = MODES[name]
    cfg = LaunchConfig(num_processes=n, config_file=str(ACCEL / config) if config else None)
    t0 = time.perf_counter()
    res = launch("benchmarks.scaling:train_once", {"data": str(data), "model_dir": str(model_dir),
                                                   "out": str(work / name), "steps": args.steps,
                                                   "batch": args.batch, "device": args.device}, cfg, name=name)
    rows = res["rows"]
    timed = [r["images_per_s"] for r in rows[args.warmup:]] or [rows[-1]["images_per_s"]]
    return {"mode": name, "processes": n, "config": config, "wall_s": round(time.perf_counter() - t0, 1),
            "images_per_s": round(sum(timed) / len(timed), 2),
            # images per CPU-second of all ranks (load, build and train): what a loaded box does not distort
            "images_per_cpu_s": round(args.steps * args.batch * n / sum(r["cpu_s"] for r in res["ranks"]), 3),
            "peak_rss_mb": [round(r["peak_rss_mb"]) for r in res["ranks"]],
            "gpu_peak_mb": [round(r["gpu_peak_mb"]) for r in res["ranks"]],
            "losses": [round(r["loss"], 5) for r in rows], "last_lr": rows[-1]["lr"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of images/s")
    ap.add_argument("--batch", type=int, default=4, help="images per process per step")
    ap.add_argument("--modes", default="single,ddp,zero2,zero3")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per process (0: the usable cores split between the processes)")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
    import torch

    from ecomcap.config import DataConfig, ModelConfig, SynthConfig, TinyModelConfig
    from ecomcap.data.ingest import ingest_split
    from ecomcap.data.prepare import source_dir
    from ecomcap.modeling.prepare import ensure_model

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    modes = [m for m in args.modes.split(",") if args.device == "cpu" or MODES[m][0] <= gpus]
    skipped = [m for m in args.modes.split(",") if m not in modes]
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    data_cfg = DataConfig(work_dir=work / "data", splits=["train"],
                          synth=SynthConfig(train=args.train, valid=0, test=0, seed=3))
    ingest_split(source_dir(data_cfg), "train", work / "data" / "train", data_cfg.ingest)  # (no GX: GPU images lack it)
    model_cfg = ModelConfig(name_or_path=str(work / "tiny"), tiny=TinyModelConfig())
    ensure_model(model_cfg, work / "data" / "train")
    results = []
    for name in modes:
        r = run_mode(name, work / "data", work / "tiny", work, args)
        results.append(r)
        print(f"{name:7s} x{r['processes']}: {r['images_per_s']:7.2f} images/s  {r['images_per_cpu_s']:.3f} "
              f"images/CPU-s  peak RSS/process "
              f"{r['peak_rss_mb']} MB  GPU peak {r['gpu_peak_mb']} MB  last lr {r['last_lr']:.1e}  "
              f"losses {r['losses'][:3]}...{r['losses'][-1]}", flush=True)
    base = next((r for r in results if r["mode"] == "single"), None)
    ddp = next((r for r in results if r["mode"] == "ddp"), None)
    for r in results:
        if base:
            r["speedup_vs_single"] = round(r["images_per_s"] / base["images_per_s"], 3)
            r["cpu_efficiency_vs_single"] = round(r["images_per_cpu_s"] / base["images_per_cpu_s"], 3)
        if ddp and r["mode"].startswith("zero"):  # the same global batch as DDP: the same curve
            r["max_loss_diff_vs_ddp"] = max(abs(a - b) for a, b in zip(r["losses"], ddp["losses"]))
    print(json.dumps({"device": args.device, "gpu": torch.cuda.get_device_name(0) if gpus else None,
                      "cpus": os.cpu_count(), "steps": args.steps, "batch_per_process": args.batch,
                      "skipped": skipped, "modes": results}))


if __name__ == "__main__":
    main()
