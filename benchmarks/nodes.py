"""Several nodes on one machine: local "pods" (process trees given ZenML's multi-pod environment,
tests/local_pods.py) against one pod, for the two jobs that span pods.

    python benchmarks/nodes.py [--images 2000] [--new-tokens 16] [--steps 24] [--smoke]

- Catalogue captioning: `ecomcap generate` as 1 pod vs 2 pods (each 1 thread; then the merge),
  over the same ingested images and tiny model (random weights: every caption runs to
  `--new-tokens`, a fixed amount of work per image). Figures: wall images/s and CPU-seconds per
  image, the latter undistorted by contention; the outputs must be byte-identical.
- Training: `ecomcap train --stage sft` as 1 node x 2 processes vs 2 nodes x 1 process (the same
  world size, the same global batch): images/s and CPU-seconds per image; the weights must agree.

On a 2-core box, 2 pods of 1 thread hold both cores as 1 pod of 2 threads would not (captioning
at batch size 1-50 does not fill 2 threads); CPU-seconds per image tell what the split costs.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from tests.local_pods import ECOMCAP, base_env, start_pods, wait  # noqa: E402
from tests.nodes_setup import SMALL, write_config  # noqa: E402


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(run) -> tuple[float, float]:
    """(wall s, CPU s of the finished child processes) of `run()`."""
    cpu, t0 = children_cpu(), time.perf_counter()
    run()
    return time.perf_counter() - t0, children_cpu() - cpu


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc


def ecomcap(args: list[str], cwd: Path, threads: int = 1) -> subprocess.CompletedProcess:
    return check(subprocess.run([ECOMCAP, *args], cwd=cwd, env=base_env(threads), capture_output=True, text=True))


def captioning(work: Path, images: int, new_tokens: int) -> dict:
    cfg = {**json.loads(json.dumps(SMALL)),
           "data": {"work_dir": "cdata", "splits": ["train", "test"],
                    "synth": {"train": 48, "valid": 0, "test": images, "seed": 9, "image_size": 48}},
           "generate": {"num_beams": 1, "max_new_tokens": new_tokens, "batch_size": 50,
                        "chunks": {"chunk_size": 50}}}
    path = work / "caption.yaml"
    path.write_text(yaml.safe_dump({"parameters": {"config": cfg}}), encoding="utf-8")
    ecomcap(["prepare", "--config", str(path)], work, 2)
    from ecomcap.config import ModelConfig, TinyModelConfig
    from ecomcap.modeling.prepare import ensure_model

    # the default tiny model (4 text layers, 256 wide): enough work per image that process start-up
    # (~5 s: imports, model load) does not hide the split
    ensure_model(ModelConfig(name_or_path=str(work / "tiny"), tiny=TinyModelConfig(), device="cpu"),
                 work / "cdata" / "train")

    def args(out: str) -> list[str]:
        return ["generate", "--model", "tiny", "--data", "cdata/test", "--config", str(path), "--out", out]

    one_wall, one_cpu = timed(lambda: ecomcap(args("one/caption_gen.jsonl"), work))
    pods_wall, pods_cpu = timed(lambda: wait(start_pods(args("two/caption_gen.jsonl"), 2, work, work / "logs")))
    merge_wall, merge_cpu = timed(lambda: ecomcap(args("two/caption_gen.jsonl"), work))
    same = (work / "one/caption_gen.jsonl").read_bytes() == (work / "two/caption_gen.jsonl").read_bytes()
    two_wall, two_cpu = pods_wall + merge_wall, pods_cpu + merge_cpu
    return {"images": images, "identical": same,
            "one_pod": {"wall_s": round(one_wall, 1), "images_per_s": round(images / one_wall, 1),
                        "cpu_s_per_image": round(one_cpu / images, 4)},
            "two_pods": {"wall_s": round(two_wall, 1), "images_per_s": round(images / two_wall, 1),
                         "cpu_s_per_image": round(two_cpu / images, 4), "pods_wall_s": round(pods_wall, 1),
                         "merge_wall_s": round(merge_wall, 1)},
            "speedup": round(one_wall / two_wall, 2), "speedup_before_merge": round(one_wall / pods_wall, 2),
            "cpu_ratio": round(two_cpu / one_cpu, 2)}


def training(work: Path, steps: int) -> dict:
    ecomcap(["prepare", "--config", str(write_config(work, "prepare"))], work, 2)
    SMALL["sft"].update(max_steps=steps, eval_every=0, save_every=0)
    images = steps * SMALL["sft"]["batch_size"] * 2  # per-process batch x world size 2

    def one():
        out = json.loads(ecomcap(["train", "--stage", "sft", "--config",
                                  str(write_config(work, "one", num_processes=2))], work).stdout.splitlines()[-1])
        results["one"] = out

    def two():
        cfg = write_config(work, "two", nodes=2, num_processes=1)
        assert wait(start_pods(["train", "--stage", "sft", "--config", str(cfg)], 2, work, work / "tlogs")) == {0: 0, 1: 0}
        results["two"] = json.loads((work / "tlogs" / "pod-0.log").read_text().strip().splitlines()[-1])

    results: dict = {}
    one_wall, one_cpu = timed(one)
    two_wall, two_cpu = timed(two)
    same = results["one"]["ranks"][0]["weights"] == results["two"]["ranks"][0]["weights"]
    return {"images": images, "same_weights": same,
            "one_node_x2": {"wall_s": round(one_wall, 1), "images_per_s": round(images / one_wall, 1),
                            "cpu_s_per_image": round(one_cpu / images, 4)},
            "two_nodes_x1": {"wall_s": round(two_wall, 1), "images_per_s": round(images / two_wall, 1),
                             "cpu_s_per_image": round(two_cpu / images, 4)},
            "ratio": round(one_wall / two_wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--work", type=Path, default=ROOT / ".run" / "bench_nodes")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark runs")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.new_tokens, args.steps = 100, 4, 2
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "caption").mkdir(parents=True)
    (args.work / "train").mkdir(parents=True)
    cap = captioning(args.work / "caption", args.images, args.new_tokens)
    print("captioning:", json.dumps(cap), flush=True)
    train = training(args.work / "train", args.steps)
    print("training:", json.dumps(train), flush=True)
    print(json.dumps({"captioning": cap, "training": train}))


if __name__ == "__main__":
    main()
