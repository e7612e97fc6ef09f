"""A new user's first run: today's `make run` (reference) vs the new default, on this machine.

    python benchmarks/first_run.py            # both configs as shipped (minutes each)
    python benchmarks/first_run.py --smoke    # both scaled down alike: checks the benchmark end to end
    python benchmarks/first_run.py --new-first  # the new side first: with a default run, ABBA order
    python benchmarks/first_run.py --reference-commit 50a983c  # the reference is that commit's `make run`

Each side runs `bash scripts/run.sh` (what `make run` runs: the ZenML local stack, MLflow on
SQLite, the whole training pipeline) in its own fresh copy of the tracked files, so each has its
own .zen_config/.zen/.mlflow/.run: no ZenML cache hit, no model, data or run shared between them.
The reference is `benchmarks/first_run_reference.yaml` (configs/local.yaml before issue 13 §3),
the new side `configs/local.yaml`. With `--reference-commit` the reference is instead `make run` as
it was at that commit, its code and its configs/local.yaml (issue 13 was filed against 50a983c:
"today's default run"; it already logs attribute accuracy). Both run one after the other, in one process sequence, so a
machine twice as fast speeds both; on a shared box compare the CPU seconds too.

Prints per side the pipeline's wall time, CPU time (the run's processes, waited for), mean
attribute accuracy, category/pattern accuracy and CIDEr-D (the evaluate step's figures, read back
from the side's MLflow store), then new/reference ratios; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks" / "first_run_reference.yaml"
ISSUE_BASE = "50a983c"  # main when issue 13 was filed: its `make run` is "today's default run"
NEW = ROOT / "configs" / "local.yaml"
SMOKE = {  # both sides shrunk the same way: the steps run, the figures mean nothing
    "data": {"dev_images": 24, "synth": {"train": 240, "valid": 24, "test": 8}},
    "sft": {"eval_every": 0, "save_every": 0},
    "scst": {"eval_every": 0, "save_every": 0, "batch_size": 4},
}
SMOKE_STEP_DIVISOR = 100  # SFT/SCST steps = max(2, shipped // 100): the two sides keep their ratio


def run_config(path: Path, smoke: bool = False) -> dict[str, Any]:
    """The ZenML run configuration a side runs with (validated as the pipeline will)."""
    from ecomcap.config import RunConfig, parse_model

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = data["parameters"]["config"]
    if smoke:
        for section, update in SMOKE.items():
            _merge(cfg.setdefault(section, {}), update)
        for stage in ("sft", "scst"):
            cfg[stage]["max_steps"] = max(2, int(cfg[stage].get("max_steps", 2)) // SMOKE_STEP_DIVISOR)
    parse_model(RunConfig, cfg, str(path))  # a broken config fails here, not minutes into a run
    return data


def _merge(into: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def fresh_checkout(dst: Path) -> Path:
    """The tracked (and untracked, not ignored) files, as a clone has them, sharing this .venv."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return _share_venv(dst)


def _share_venv(dst: Path) -> Path:
    (dst / ".venv").symlink_to((ROOT / ".venv").resolve())
    return dst


def commit_checkout(commit: str, dst: Path) -> Path:
    """The files of `commit` (`git archive`: tracked files only), sharing this .venv."""
    dst.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    return _share_venv(dst)


def commit_config(commit: str) -> dict:
    """`configs/local.yaml` as `commit` has it: validated by that commit's code when it runs."""
    text = subprocess.run(["git", "show", f"{commit}:configs/local.yaml"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    return yaml.safe_load(text)


def warm_up() -> None:
    """Import the heavy libraries once, untimed: the first side must not pay for a cold disk cache."""
    code = "import torch, transformers, mlflow, zenml.client, great_expectations"
    subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code], cwd=ROOT, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_side(name: str, config: dict, work: Path, commit: str | None = None) -> dict[str, Any]:
    """`bash scripts/run.sh` with this config in a fresh checkout (of `commit` if given); wall and
    CPU time, figures."""
    repo = commit_checkout(commit, work / name) if commit else fresh_checkout(work / name)
    cfg_path = repo / "configs" / f"first_run_{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "CONFIG": str(cfg_path.relative_to(repo)), "PYTHONPATH": str(repo)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the side's own store (scripts/zenml_env.sh sets it)
    log = work / f"{name}.log"
    print(f"[{name}] bash scripts/run.sh in {repo} (log: {log})", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(["bash", "scripts/run.sh"], cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"[{name}] scripts/run.sh failed (exit {proc.returncode}); end of {log}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    figs = read_figures(repo / ".mlflow" / "mlflow.db")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), **({"commit": commit} if commit else {}), **figs}


def read_figures(mlflow_db: Path) -> dict[str, Any]:
    """The newest training run's evaluate-step figures from a side's MLflow store."""
    from ecomcap.registry.tracking import last_run_summary

    summary = last_run_summary(f"sqlite:///{mlflow_db}")
    if summary is None:
        raise SystemExit(f"no training_pipeline run in {mlflow_db}")
    return figures(summary["metrics"])


def figures(metrics: dict[str, float]) -> dict[str, Any]:
    """The figures this benchmark compares, from the MLflow metrics the evaluate step logs."""
    missing = [k for k in ("CIDEr-D", "val.attr.mean") if k not in metrics]
    if missing:
        raise SystemExit(f"the run logged no {missing}: did the evaluate step run on synthetic data?")
    return {"attr_mean": round(metrics["val.attr.mean"], 4),
            **{f"attr_{k}": round(metrics[f"val.attr.{k}"], 4) for k in ("category", "pattern", "colour", "brand")
               if f"val.attr.{k}" in metrics},
            "CIDEr-D": round(metrics["CIDEr-D"], 4)}


def compare(ref: dict[str, Any], new: dict[str, Any], smoke: bool, threads: str) -> dict[str, Any]:
    """The summary line: both sides, new/reference time ratios, and whether the issue's target holds."""
    return {"benchmark": "first_run", "smoke": smoke, "omp_num_threads": threads, "reference": ref, "new": new,
            "wall_ratio_new_vs_reference": round(new["wall_s"] / ref["wall_s"], 3),
            "cpu_ratio_new_vs_reference": round(new["cpu_s"] / ref["cpu_s"], 3) if ref["cpu_s"] else None,
            "target_attr_mean": 0.85,
            "target_met": new["attr_mean"] >= 0.85 and new["wall_s"] <= ref["wall_s"]}


def show(name: str, r: dict[str, Any]) -> None:
    print(f"[{name}] wall {r['wall_s']:.1f} s  cpu {r['cpu_s']:.1f} s  attr mean {r['attr_mean']:.3f}  "
          f"category {r.get('attr_category', float('nan')):.3f}  pattern {r.get('attr_pattern', float('nan')):.3f}  "
          f"CIDEr-D {r['CIDEr-D']:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help=f"tiny data, steps // {SMOKE_STEP_DIVISOR}: end-to-end check")
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--reference-commit", default=None, metavar="SHA",
                    help=f"the reference is `make run` of that commit, its code and configs/local.yaml "
                         f"({ISSUE_BASE}: main when issue 13 was filed)")
    ap.add_argument("--new", type=Path, default=NEW)
    ap.add_argument("--work", type=Path, default=None, help="where the two checkouts go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkouts, logs and MLflow stores")
    ap.add_argument("--new-first", action="store_true",
                    help="run the new side first (with a default-order run: ABBA, cancels drift in the box's load)")
    args = ap.parse_args(argv)
    if args.reference_commit and args.smoke:
        ap.error("--smoke scales configs for this code; a commit's reference runs as that commit shipped it")
    ref_config = commit_config(args.reference_commit) if args.reference_commit else run_config(args.reference, args.smoke)
    configs = {"reference": ref_config, "new": run_config(args.new, args.smoke)}
    if args.new_first:
        configs = dict(reversed(configs.items()))
    work = args.work or Path(tempfile.mkdtemp(prefix="first_run-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    ref_name = f"make run at {args.reference_commit}" if args.reference_commit else args.reference.name
    print(f"first run: {ref_name} vs {args.new.name}, order {list(configs)}, smoke={args.smoke}, "
          f"OMP_NUM_THREADS={threads}, "
          f"{os.cpu_count()} CPUs, work {work}", flush=True)
    warm_up()
    results = {}
    for name, config in configs.items():  # a failed side exits here, its log kept
        results[name] = run_side(name, config, work, args.reference_commit if name == "reference" else None)
        show(name, results[name])
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    out = {**compare(results["reference"], results["new"], args.smoke, threads), "order": list(configs)}
    print(f"new/reference: wall x{out['wall_ratio_new_vs_reference']}, cpu x{out['cpu_ratio_new_vs_reference']}; "
          f"attr mean {results['reference']['attr_mean']:.3f} -> {results['new']['attr_mean']:.3f}")
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
