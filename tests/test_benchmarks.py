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


def test_memory_benchmark_counts_autocast_copies_and_marks_estimates():
    """Under bf16 autocast every fp32 trainable weight has a cached bf16 copy (+2 B/param, ~6 GiB
    for ad_caption's partial 7B) that the LoRA-measured rows do not contain; and rows built on the
    analytic checkpointing estimate must say so."""
    from ecomcap.config import FinetuneConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory as bench
    finally:
        sys.path.pop(0)
    full = bench.static_bytes(bench.QWEN25_VL_3B, FinetuneConfig(strategy="full"))
    assert full["autocast_copies"] == full["trainable"] / 8  # 2 of the 16 bytes per trainable param
    part = bench.static_bytes(bench.QWEN25_VL_7B, FinetuneConfig(strategy="partial", partial_layers="upper_half"))
    assert 5.0 < part["autocast_copies"] / 2**30 < 7.0
    assert bench.static_bytes(bench.QWEN25_VL_3B, FinetuneConfig(strategy="lora"))["autocast_copies"] == 0
    zero = {"d0": 0.0, "dL": 0.0, "dV": 0.0}
    fits = {s: zero for s in ("sft", "sft_gc", "scst_before", "scst_after", "scst_after_gc")}
    ad = bench.extrapolate("configs/ad_caption.yaml", fits)  # SFT with gradient checkpointing
    assert ad["sft"]["estimated"] and not ad["scst_before"]["estimated"]
    assert not bench.extrapolate("configs/ad_caption.yaml", fits, gc_measured=True)["sft"]["estimated"]
    assert not bench.extrapolate("configs/qwen25vl_3b_lora.yaml", fits)["sft"]["estimated"]
