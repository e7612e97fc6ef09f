"""Ingest throughput and memory: 20k vs 200k-row synthetic TSV, each ingested in a fresh process.

Peak RSS must stay flat in the number of rows (target: the 200k run's peak <= 1.3x the 20k
run's, and < 1 GiB). Rows are real synthetic images, replicated with new ids so building a
200k-row source takes seconds, not minutes.

    python benchmarks/ingest.py [--sizes 20000 200000] [--no-gx]

Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecomcap.data.formats import iter_lines  # noqa: E402
from ecomcap.data.synth import generate_synthetic  # noqa: E402

_CHILD = """
import json, resource, sys, time
from ecomcap.config import IngestConfig
from ecomcap.data.ingest import ingest_split
from ecomcap.data.validate import validate_dataset
src, out, gx = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t = time.perf_counter()
cfg = IngestConfig(max_bad_rate=1.0)
rep = ingest_split(src, "train", out, cfg).report
t_ingest = time.perf_counter() - t
rss_ingest = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if gx:
    rep = validate_dataset(out, cfg)
print(json.dumps({"rows_in": rep["rows_in"], "rows_ok": rep["rows_ok"], "ingest_s": t_ingest,
                  "total_s": time.perf_counter() - t, "rss_ingest_kib": rss_ingest,
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "gx_success": rep.get("gx", {}).get("success")}))
"""


def build_source(pool_dir: Path, out_dir: Path, rows: int) -> None:
    """Replicate the pool's TSV/JSONL lines under new ids until `rows` image lines exist."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [ln.text.split("\t", 1)[1] for ln in iter_lines(pool_dir / "IC_train.tsv")]
    refs = [json.loads(ln.text)["text"] for ln in iter_lines(pool_dir / "IC_train.jsonl")]
    with open(out_dir / "IC_train.tsv", "w", encoding="utf-8") as ti, open(
        out_dir / "IC_train.jsonl", "w", encoding="utf-8"
    ) as tj:
        for i in range(rows):
            k = i % len(images)
            ti.write(f"r{i:07d}\t{images[k]}\n")
            tj.write(json.dumps({"image_id": f"r{i:07d}", "text": refs[k % len(refs)]}, ensure_ascii=False) + "\n")


def measure(src: Path, out: Path, gx: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(out), "1" if gx else "0"],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs=2, default=[20_000, 200_000])
    ap.add_argument("--pool", type=int, default=1000, help="distinct synthetic images replicated")
    ap.add_argument("--no-gx", action="store_true")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_synthetic(tmp / "pool", train=args.pool, valid=0, test=0, seed=1)
        for n in args.sizes:
            t = time.perf_counter()
            build_source(tmp / "pool", tmp / f"src{n}", n)
            build_s = time.perf_counter() - t
            r = measure(tmp / f"src{n}", tmp / f"out{n}", gx=not args.no_gx)
            r["rows_per_s"] = round(r["rows_in"] / r["ingest_s"], 1)
            r["peak_rss_mib"] = round(r["rss_kib"] / 1024, 1)
            r["ingest_peak_rss_mib"] = round(r["rss_ingest_kib"] / 1024, 1)
            results[n] = r
            print(f"{n:>8} rows: build {build_s:6.1f}s  ingest {r['ingest_s']:7.1f}s "
                  f"({r['rows_per_s']:.0f} rows/s)  total {r['total_s']:7.1f}s  peak RSS "
                  f"ingest {r['ingest_peak_rss_mib']} MiB, with GX {r['peak_rss_mib']} MiB", flush=True)
            for p in (tmp / f"src{n}").iterdir():
                p.unlink()
    small, big = (results[n] for n in args.sizes)
    out = {
        "bench": "ingest",
        "sizes": args.sizes,
        "rows_per_s": [small["rows_per_s"], big["rows_per_s"]],
        "ingest_peak_rss_mib": [small["ingest_peak_rss_mib"], big["ingest_peak_rss_mib"]],
        "peak_rss_mib_with_gx": [small["peak_rss_mib"], big["peak_rss_mib"]],
        "rss_ratio_ingest": round(big["ingest_peak_rss_mib"] / small["ingest_peak_rss_mib"], 3),
        "rss_ratio_with_gx": round(big["peak_rss_mib"] / small["peak_rss_mib"], 3),
        "gx_success": [small["gx_success"], big["gx_success"]],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
