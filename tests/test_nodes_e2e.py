"""Several nodes, the slower half (make e2e): SFT on two local "pods" under the shipped ZeRO-2 and
ZeRO-3 accelerate configs equals one node with two processes; pod 1 killed after a checkpoint and
both pods restarted (as the step's retry re-submits the Job) resume exactly; catalogue captioning
of 2,000 images on two pods is byte-identical to one pod, also with pod 1 killed mid-run.
Local "pods": tests/local_pods.py (process trees given ZenML's multi-pod environment)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.local_pods import ECOMCAP, ROOT, base_env, kill_pod, start_pods, wait, wait_for
from tests.nodes_setup import SMALL, curve, one_node, prepare, two_pods

pytestmark = pytest.mark.e2e
ZERO = {stage: str(ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml") for stage in (2, 3)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes_e2e")
    prepare(root)
    return root


def _same_training(root: Path, one: dict, two: dict) -> None:
    assert one["nodes"] == 1 and two["nodes"] == 2
    assert {r["weights"] for r in one["ranks"] + two["ranks"]} == {one["ranks"][0]["weights"]}
    a, b = curve(root, one), curve(root, two)
    assert len(a) == len(b) >= 6
    for ra, rb in zip(a, b):
        assert rb == pytest.approx(ra, rel=1e-4), (ra, rb)


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_on_two_pods_equals_one_node(root, zero):
    one = one_node(root, f"zero{zero}-one", num_processes=2, config_file=ZERO[zero])
    two, logs = two_pods(root, f"zero{zero}-two", config_file=ZERO[zero])
    _same_training(root, one, two)
    assert all("world size 2 over 2 nodes" in text for text in logs)


@pytest.fixture(scope="module")
def ddp_one(root):
    return one_node(root, "ddp-one", num_processes=2)


def test_kubeflow_pet_environment_runs_the_same_and_waits_for_a_late_main_pod(root, ddp_one):
    """The same command under the Kubeflow Trainer's torchrun variables (a TrainJob, or by hand),
    with pod 0, which hosts the rendezvous, started 20 s after pod 1 (launch.rendezvous_timeout_s)."""
    two, logs = two_pods(root, "pet-two", pet=True, main_late_s=20)
    _same_training(root, ddp_one, two)
    assert "from PET_* (Kubeflow TrainJob / torchrun)" in logs[1]


def test_a_killed_pod_resumes_exactly(root, ddp_one):
    """Pod 1's process tree is killed once step 2's checkpoint exists; pod 0 then fails on the
    broken collective; both start again and every rank resumes from the last complete checkpoint."""
    whole = ddp_one
    resumed, logs = two_pods(root, "kill-cut", kill_after_step=2)
    assert resumed["resumed_from"] >= 2 and resumed["steps"] == SMALL["sft"]["max_steps"]
    _same_training(root, whole, resumed)
    assert "Connection" in logs[0] or "connection" in logs[0]  # pod 0's first attempt saw its peer go


CAPTION = {"data": {"work_dir": "cdata", "splits": ["test"], "synth": {"train": 0, "valid": 0, "test": 2000, "seed": 9,
                                                                      "image_size": 48}},
           "generate": {"num_beams": 1, "max_new_tokens": 6, "batch_size": 50, "chunks": {"chunk_size": 100}}}


@pytest.fixture(scope="module")
def catalogue(root):
    """2,000 synthetic images, ingested once; the tiny base model as the captioner."""
    cfg = {**json.loads(json.dumps(SMALL)), **CAPTION}
    path = root / "caption.yaml"
    path.write_text(yaml.safe_dump({"parameters": {"config": cfg}}), encoding="utf-8")
    proc = subprocess.run([ECOMCAP, "prepare", "--config", str(path)], cwd=root, env=base_env(2), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def _generate(root: Path, cfg: Path, out: str) -> list[str]:
    return ["generate", "--model", "tiny", "--data", "cdata/test", "--config", str(cfg), "--out", out]


def _one_pod(root: Path, cfg: Path, out: str) -> bytes:
    proc = subprocess.run([ECOMCAP, *_generate(root, cfg, out)], cwd=root, env=base_env(2), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (root / out).read_bytes()


def test_captioning_on_two_pods_is_byte_identical_also_with_a_pod_killed(root, catalogue):
    reference = _one_pod(root, catalogue, "one/caption_gen.jsonl")
    ids = [json.loads(line)["image_id"] for line in reference.decode().splitlines()]
    assert len(ids) == len(set(ids)) == 2000

    args, logs = _generate(root, catalogue, "two/caption_gen.jsonl"), root / "logs" / "caption"
    assert wait(start_pods(args, 2, root, logs)) == {0: 0, 1: 0}
    shares = [json.loads((logs / f"pod-{i}.log").read_text().strip().splitlines()[-1]) for i in range(2)]
    assert [s["images"] for s in shares] == [1000, 1000] and not (root / "two" / "caption_gen.jsonl").exists()
    assert _one_pod(root, catalogue, "two/caption_gen.jsonl") == reference  # the merge: no pod environment

    parts = root / "killed" / "caption_gen.jsonl.parts"
    args, logs = _generate(root, catalogue, "killed/caption_gen.jsonl"), root / "logs" / "killed"
    pods = start_pods(args, 2, root, logs)
    odd = lambda: [p for p in parts.glob("*/part-*.jsonl") if int(p.stem.split("-")[1]) % 2]  # noqa: E731
    wait_for(lambda: len(odd()) >= 3 or pods[1].poll() is not None)
    kill_pod(pods[1])
    kill_pod(pods[0])  # backoffLimit 0: the Job fails and Kubernetes stops its other pod too
    done_before = {p.name for p in odd()}
    assert 3 <= len(done_before) < 10  # killed mid-run
    assert wait(start_pods(args, 2, root, logs)) == {0: 0, 1: 0}  # the step's retry: a new Job of both
    for i in range(2):  # each pod's second attempt skipped the chunks it had finished
        text = (logs / f"pod-{i}.log").read_text()
        assert json.loads(text.strip().splitlines()[-1])["images"] == 1000
        skipped = int(re.findall(r"to caption, (\d+) already done", text)[-1])
        assert skipped >= (len(done_before) if i == 1 else 1), (i, skipped)
    assert _one_pod(root, catalogue, "killed/caption_gen.jsonl") == reference


def test_more_pods_than_chunks(root, catalogue):
    """3 pods over 2 chunks of 1,000: pod 2 has no work and says so; the merge is still complete."""
    args = _generate(root, catalogue, "three/caption_gen.jsonl") + ["--chunk-size", "1000"]
    logs = root / "logs" / "three"
    assert wait(start_pods(args, 3, root, logs)) == {0: 0, 1: 0, 2: 0}
    shares = [json.loads((logs / f"pod-{i}.log").read_text().strip().splitlines()[-1])["images"] for i in range(3)]
    assert shares == [1000, 1000, 0]
    proc = subprocess.run([ECOMCAP, *args], cwd=root, env=base_env(2), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (root / "three" / "caption_gen.jsonl").read_text().splitlines()
    assert len({json.loads(line)["image_id"] for line in lines}) == len(lines) == 2000


def test_the_benchmark_runs_and_its_checks_hold(tmp_path):
    """benchmarks/nodes.py --smoke: both comparisons run; outputs identical, weights the same."""
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nodes.py"), "--smoke", "--work", str(tmp_path)],
                          env=base_env(2), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["captioning"]["identical"] and out["training"]["same_weights"]
    assert out["captioning"]["two_pods"]["images_per_s"] > 0 and out["training"]["two_nodes_x1"]["images_per_s"] > 0
