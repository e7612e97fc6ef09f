"""A killed multi-process run resumes exactly: each run is launched through `ecomcap.launch`
(fresh processes, 2 CPU ranks, gloo), stopped after step 2 so its processes exit with an error
(`stop_after_steps`, as a killed pod), then launched again with the same config and output dir.
The final weights and the loss curve must equal an uninterrupted run's (launched in the first
launch's processes before the cut run)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ecomcap.config import LaunchConfig
from ecomcap.errors import EcomcapError
from ecomcap.launch import launch
from tests.test_deepspeed import curve, zero_yaml

TARGET = "tests.resume_targets:train"


def figures(run_dir: Path) -> list[dict]:
    """The logged curve without wall-clock figures."""
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "reward_s")} for row in curve(run_dir)]


def killed_and_resumed(tmp_path: Path, data, model_cfg, stage: str, strategy: str, launch_cfg: LaunchConfig,
                       **extra):
    out = tmp_path / "out"
    kwargs = {"stage": stage, "data": {"train": str(data["train"]), "valid": str(data["valid"])},
              "model_dir": model_cfg.name_or_path, "out": str(out), "strategy": strategy, **extra}
    with pytest.raises(EcomcapError, match=f"{stage}: stopped after step 2"):
        launch(TARGET, {**kwargs, "stop_after": 2, "whole": True}, launch_cfg, name=stage)
    cut = next((out / "cut").glob("run-*"))
    left = sorted(p.name for p in (cut / "checkpoints").glob("step-*"))
    assert left and left[-1] == "step-0000002"  # what the killed run left to resume from
    ckpt = cut / "checkpoints" / left[-1]
    sizes = {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    rng = [torch.load(ckpt / f"rng-rank{r}.pt", weights_only=True)["torch"] for r in (0, 1)]
    res = launch(TARGET, kwargs, launch_cfg, name=stage)
    whole = [json.loads((out / "whole" / f"rank{r}.json").read_text()) for r in (0, 1)]
    resumed = [json.loads((out / "cut" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert res == resumed[0] and res["world"] == 2
    assert res["resumed_from"] == 2 and res["steps"] == 4
    assert {r["digest"] for r in whole + resumed} == {res["digest"]}  # both ranks, both runs: the same weights
    assert Path(res["run_dir"]) == cut and not (cut / "checkpoints").exists()
    whole_dir = Path(whole[0]["run_dir"])
    assert figures(cut) == figures(whole_dir) and len(figures(cut)) == 4  # every logged figure of every step, exactly
    return cut, whole_dir, sizes, rng


def test_zero3_killed_full_finetune_resumes_exactly(tiny_model_cfg, small_data, tmp_path):
    """Full fine-tuning under ZeRO-3 (sharded engine checkpoint written by both ranks)."""
    cfg = LaunchConfig(num_processes=2, config_file=str(zero_yaml(3, tmp_path)))
    cut, whole, _, _ = killed_and_resumed(tmp_path, small_data, tiny_model_cfg, "sft", "full", cfg)
    assert curve(cut)[-1]["lr"] == 0.0
    # the export is the gathered full model (not ZeRO-3's empty shards), equal to the uninterrupted one
    mine, theirs = (load_file(str(d / "model" / "model.safetensors")) for d in (cut, whole))
    base = load_file(str(Path(tiny_model_cfg.name_or_path) / "model.safetensors"))
    assert set(mine) == set(theirs) == set(base)
    assert all(mine[n].shape == base[n].shape for n in base)
    assert any(not torch.equal(mine[n], base[n]) for n in base)  # trained
    for name, t in mine.items():
        assert torch.equal(t, theirs[name]), name


def test_zero2_lora_checkpoint_holds_the_trainables_only(tiny_model_cfg, small_data, tmp_path):
    """A LoRA step checkpoint under ZeRO-2 is the adapter's size (weights, fp32 master and Adam
    moments), not the frozen base model's; resuming from it is still exact."""
    cfg = LaunchConfig(num_processes=2, config_file=str(zero_yaml(2, tmp_path)))
    cut, whole, sizes, _ = killed_and_resumed(tmp_path, small_data, tiny_model_cfg, "sft", "lora", cfg)
    engine = sum(n for name, n in sizes.items() if name.startswith("engine/"))
    adapter = (cut / "model" / "adapter_model.safetensors").stat().st_size  # the trainables in fp32
    model = (Path(tiny_model_cfg.name_or_path) / "model.safetensors").stat().st_size
    print(json.dumps({"engine_checkpoint_bytes": engine, "adapter_bytes": adapter, "base_model_bytes": model}))
    assert engine < 5 * adapter + 300_000  # 4 x 4 bytes per trainable + pickle/config overhead
    assert engine < model / 2


def test_ddp_scst_with_sampling_resumes_exactly(tiny_model_cfg, small_data, tmp_path):
    """SCST samples captions: resuming is exact only if each rank restores its own generators."""
    cut, whole, sizes, rng = killed_and_resumed(tmp_path, small_data, tiny_model_cfg, "scst", "lora",
                                                LaunchConfig(num_processes=2))
    assert not torch.equal(rng[0], rng[1])  # the ranks' generators differ: rank 0's on both would not do
    rows = curve(cut)
    assert len({r["reward"] for r in rows}) > 1 and all(r["sample_len"] > 0 for r in rows)  # it sampled


def lora_sft_output(model_cfg, dest: Path) -> Path:
    """An SFT LoRA output directory (our export format) with a non-zero adapter, made in-process."""
    from ecomcap.config import FinetuneConfig
    from ecomcap.modeling.load import load_base
    from ecomcap.modeling.strategies import apply_strategy
    from ecomcap.training.checkpoint import export_model

    model, processor = load_base(model_cfg)
    model, _ = apply_strategy(model, FinetuneConfig(strategy="lora", lora_r=4, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return export_model(model, processor, dest, base=model_cfg.name_or_path, strategy="lora", configs={})


@pytest.mark.e2e
def test_zero3_scst_from_a_lora_sft_output_resumes_exactly(tiny_model_cfg, small_data, tmp_path):
    """SCST under ZeRO-3 starts from an SFT adapter: the base loads sharded (zero.Init), so the
    adapter is merged into gathered weights; the merge equals a plain in-process merge, and a
    killed SCST run (sampling, a checkpoint every step) resumes exactly."""
    from ecomcap.modeling.load import load_trained

    sft = lora_sft_output(tiny_model_cfg, tmp_path / "sft")
    cfg = LaunchConfig(num_processes=2, config_file=str(zero_yaml(3, tmp_path)))
    cut, _, _, _ = killed_and_resumed(tmp_path, small_data, tiny_model_cfg, "scst", "lora", cfg, sft_model=str(sft))
    merged = [json.loads((tmp_path / "out" / f"merged-rank{r}.json").read_text()) for r in (0, 1)]
    model, _ = load_trained(sft, tiny_model_cfg)
    expected = dict(model.merge_and_unload().named_parameters())[merged[0]["name"]]
    base = dict(load_trained(tiny_model_cfg.name_or_path, tiny_model_cfg)[0].named_parameters())[merged[0]["name"]]
    assert not torch.equal(expected, base)  # the adapter changes this weight
    for m in merged:
        assert m["partitioned"]  # loaded sharded
        torch.testing.assert_close(torch.tensor(m["values"]).view_as(expected), expected.detach())
    assert figures(cut)[-1]["lr"] == 0.0
