"""Generation under ZeRO-3 with the parameters gathered once per pass (TRL's
`unwrap_model_for_generation`) gives the captions of the per-token-gather path, with no partition
fetch while it decodes; validation sharded across 2 ranks gives the captions one rank gives alone,
under ZeRO-3 and under DDP. Real `accelerate launch` of 2 CPU processes (gloo)."""
import json
import os
import subprocess
import sys

import pytest

from tests.test_deepspeed import ACCELERATE, DDP_ARGS, ROOT, zero_yaml


def _launch(args, small_data, tiny_model_cfg, out):
    cmd = [ACCELERATE, "launch", *args, str(ROOT / "tests" / "zero3_generation_job.py"), str(small_data["valid"]),
           tiny_model_cfg.name_or_path, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.e2e
def test_zero3_generation_gathered_once_equals_per_token_gathers(small_data, tiny_model_cfg, tmp_path):
    r0, r1 = _launch(["--config_file", str(zero_yaml(3, tmp_path))], small_data, tiny_model_cfg, tmp_path)
    assert r0["world"] == 2 and r0["zero_stage"] == 3 and r0["did_gather"]
    assert r0["per_token"] == r1["per_token"] and len(r0["per_token"]) == 5
    assert r0["gathered"] == r0["per_token"] and r1["gathered"] == r1["per_token"]
    assert r0["fetches_per_token"] > 0 and r0["fetches_gathered"] == 0  # no partition fetched while decoding
    assert r0["sharded"] == r1["sharded"] == r0["per_token"]  # sharded validation == one rank's
    assert r0["after"] == r0["per_token"]  # DeepSpeed's hooks are back afterwards
    # not gathered, every forward is collective: all ranks caption all images (no hang), same captions
    assert r0["not_gathered"] == r1["not_gathered"] == r0["per_token"]


def test_ddp_validation_sharded_equals_one_rank(small_data, tiny_model_cfg, tmp_path):
    r0, r1 = _launch(DDP_ARGS, small_data, tiny_model_cfg, tmp_path)
    assert r0["world"] == 2 and r0["zero_stage"] == 0 and not r0["did_gather"]
    assert r0["sharded"] == r1["sharded"] == r0["per_token"] == r1["per_token"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
