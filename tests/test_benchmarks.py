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


def test_gpu_benchmark_mfu_counts_each_token_once():
    """The answer tokens were counted twice (the batch's attention mask already includes them)
    and attention's backward was counted as 1x its forward (it is 2x: dQ, dK and dP, dV)."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_sft as bench
    finally:
        sys.path.pop(0)
    text = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=1,
                           num_attention_heads=2, vocab_size=100)
    vision = SimpleNamespace(hidden_size=4, intermediate_size=8, depth=1, out_hidden_size=8)
    cfg = SimpleNamespace(text_config=text, vision_config=vision)
    enc = {"attention_mask": torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),  # prompt + answer
           "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]])}
    h, i, L, kv = 8, 16, 2, 4
    linear = 2 * L * (2 * h * h + 2 * h * kv + 3 * h * i) * (4 + 5) + 2 * h * 100 * 3 * 2
    attention = 2 * 2 * L * h * (4 * 4 + 5 * 5) / 2
    vis = 8 * 2 * (1176 * 4 + 4 * 4 * 4 + 3 * 4 * 8) + 2 * 2 * (16 * 16 + 16 * 8)
    assert bench.matmul_flops(cfg, enc, answer_len=2, backward=False) == linear + attention + vis
    assert bench.matmul_flops(cfg, enc, answer_len=2, backward=True) == 2 * linear + 3 * attention + vis
