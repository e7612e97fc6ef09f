"""Benchmarks report honest figures: each ratio is computed from what each side really runs."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_benchmark_subtracts_each_sides_own_tokeniser(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import metrics as bench
    finally:
        sys.path.pop(0)
    assert bench.main(["--images", "300", "--refs", "3", "--repeats", "1", "--reward-batches", "2",
                       "--batch-images", "8", "--samples", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ours_tokenize_s", "pycocoevalcap_tokenize_s"} <= set(out)
    want = bench.scoring_speedup(out["pycocoevalcap_s"], out["pycocoevalcap_tokenize_s"], out["ours_s"],
                                 out["ours_tokenize_s"])
    assert abs(out["scoring_speedup"] - round(want, 1)) < 0.051 + 0.01 * want
