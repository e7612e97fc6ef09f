"""Benchmarks report honest figures: each ratio is computed from what each side really runs."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_benchmark_subtracts_each_sides_own_tokeniser(capsys, monkeypatch):
    """With fixed (stand-in) durations per timed function, "scoring alone" must subtract the
    vectorised tokeniser from ours and the per-text one from pycocoevalcap's side."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import metrics as bench
    finally:
        sys.path.pop(0)
    durations = {"tokenize_many": 0.5, "<lambda>": 0.4, "evaluate": 0.8, "pycoco_scores": 17.0}

    def fixed_timed(fn, *args):
        return fn(*args), durations.get(getattr(fn, "__name__", ""), 0.01)

    monkeypatch.setattr(bench, "timed", fixed_timed)
    assert bench.main(["--images", "200", "--refs", "3", "--repeats", "1", "--reward-batches", "2",
                       "--batch-images", "8", "--samples", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ours_tokenize_s"] == 0.5 and out["pycocoevalcap_tokenize_s"] == 0.4
    assert out["scoring_speedup"] == round((17.0 - 0.4) / (0.8 - 0.5), 1)  # 55.3, not (17-0.4)/(0.8-0.4)


@pytest.mark.e2e  # every part of the GPU peer benchmark on CPU, both sides: 50 s (make e2e)
def test_gpu_peer_smoke_runs_every_part_on_both_sides():
    """`benchmarks/gpu_peer.py --smoke`: every part on CPU at tiny width, TRL's side included;
    the last line is one JSON object with a row per part."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "benchmarks/gpu_peer.py", "--smoke"], cwd=root, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    stages = [r["stage"] for r in out["results"]]
    sides = [r.get("side") for r in out["results"] if r["stage"] == "sft"]
    assert sides == ["ecomcap", "ecomcap_packed", "trl"]
    assert all("skipped" not in r for r in out["results"]), out["results"]
    assert {"decode_shipped_penalties_own_loop", "decode_shipped_penalties_hf_generate", "scst_step", "qlora",
            "vision_sdpa_matmul"} <= set(stages)
    assert next(r for r in out["results"] if r["stage"] == "qlora")["vision_4bit_modules"] == 0
