"""Several nodes: which pod a process is (ZenML's and Kubeflow's pod environment), the launcher's
command on a node, the handoff between a command step and its regular steps, and SFT on two
local "pods" (tests/local_pods.py: process trees given ZenML's multi-pod environment) equal to
one node with two processes. ZeRO-2/3, a killed pod and captioning: tests/test_nodes_e2e.py."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ecomcap.command_steps import (
    handoff_path,
    pod_command,
    read_inputs,
    read_result,
    write_handoff,
    write_result,
)
from ecomcap.config import LaunchConfig, RunConfig
from ecomcap.errors import EcomcapError
from ecomcap.launch import command
from ecomcap.nodes import Node, current_node, require_nodes
from tests.local_pods import ECOMCAP, base_env, pod_env
from tests.nodes_setup import curve, one_node, prepare, two_pods, write_config

ZENML_ENV = pod_env(1, 2, 29511)


def test_the_pod_environment_of_zenml_and_of_kubeflow():
    node = current_node(ZENML_ENV)
    assert (node.rank, node.count, node.main_address, node.main_port) == (1, 2, "127.0.0.1", 29511)
    pet = current_node({"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "trainjob-node-0-0.x"})
    assert (pet.rank, pet.count, pet.main_address, pet.main_port) == (3, 4, "trainjob-node-0-0.x", 29500)
    assert current_node({}) is None and current_node({"ZENML_KUBERNETES_POD_COUNT": "1"}) is None


@pytest.mark.parametrize("env,match", [
    ({"ZENML_KUBERNETES_POD_COUNT": "2", "ZENML_KUBERNETES_MAIN_ADDRESS": "a"}, "JOB_COMPLETION_INDEX is not set"),
    ({**ZENML_ENV, "JOB_COMPLETION_INDEX": "2"}, r"outside 0\.\.1"),
    ({**ZENML_ENV, "JOB_COMPLETION_INDEX": "x"}, "not an integer"),
])
def test_a_broken_pod_environment_is_one_line(env, match):
    with pytest.raises(EcomcapError, match=match):
        current_node(env)


def test_the_pod_count_must_match_launch_nodes():
    with pytest.raises(EcomcapError, match="launch.nodes is 3 but the job has 2 pods"):
        require_nodes(3, ZENML_ENV)
    with pytest.raises(EcomcapError, match="not one of 2 pods"):
        require_nodes(2, {})
    kubeflow = {"PET_NNODES": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m", "PET_NPROC_PER_NODE": "8"}
    with pytest.raises(EcomcapError, match="PET_NPROC_PER_NODE=8 but launch.num_processes is 4"):
        require_nodes(2, kubeflow, processes=4)
    with pytest.raises(EcomcapError, match="MIN:MAX node ranges are not supported"):
        current_node({**kubeflow, "PET_NNODES": "1:2"})


def test_the_launch_command_on_a_node(tmp_path):
    cfg = LaunchConfig(num_processes=4, rendezvous_timeout_s=900)
    cmd = command(tmp_path / "spec.json", cfg, Node(1, 2, "main.svc", 29500, "test"))
    joined = " ".join(cmd)
    for part in ("--num_processes 8", "--num_machines 2", "--machine_rank 1", "--main_process_ip main.svc",
                 "--main_process_port 29500", "--rdzv_conf timeout=900", "--deepspeed_multinode_launcher standard"):
        assert part in joined, part
    one = " ".join(command(tmp_path / "spec.json", LaunchConfig(num_processes=2)))
    assert "--num_machines 1" in one and "--machine_rank" not in one


def test_the_handoff_and_a_stale_result(tmp_path):
    cfg = RunConfig.model_validate({"data": {"work_dir": str(tmp_path / "data")}, "launch": {"nodes": 2}})
    handoff = write_handoff(cfg, "sft", "tok1", {"train": tmp_path / "t", "valid": "v", "run_name": "r1"})
    assert read_inputs(handoff, "sft") == {"train": str(tmp_path / "t"), "valid": "v", "run_name": "r1"}
    with pytest.raises(EcomcapError, match="inputs of stage 'sft', not 'scst'"):
        read_inputs(handoff, "scst")
    cmd = pod_command("sft", cfg, "tok1")
    assert cmd[:4] == ["ecomcap", "train", "--stage", "sft"] and cmd[-2:] == ["--inputs", str(handoff)]
    with pytest.raises(EcomcapError, match="left no result"):
        read_result(cfg, "sft", "tok1")
    write_result(handoff, {"model_dir": "m"})
    assert read_result(cfg, "sft", "tok1") == {"model_dir": "m"}
    handoff.write_text(handoff.read_text().replace("r1", "r2"))  # other inputs under the same name
    with pytest.raises(EcomcapError, match="another run's inputs"):
        read_result(cfg, "sft", "tok1")
    write_handoff(cfg, "sft", "tok1", {"run_name": "r3"})  # a new handoff removes the old result
    with pytest.raises(EcomcapError, match="left no result"):
        read_result(cfg, "sft", "tok1")


def test_inputs_an_earlier_run_trained_are_not_trained_again(tmp_path, monkeypatch):
    """Pod 0 of a second run (other token and run name, same config and inputs) hands on the first
    run's result without launching anything, once the first run's result was adopted (a result
    never adopted, e.g. ranks that disagreed, is never reused); the same Job restarted after pod 0
    finished hands on its own result; other inputs, or `reuse` off (the run's enable_cache: false), are trained."""
    from ecomcap import command_steps
    from ecomcap.training import stages

    cfg = RunConfig.model_validate({"data": {"work_dir": str(tmp_path / "data")}, "launch": {"nodes": 2}})
    model = tmp_path / "model"
    model.mkdir()
    launched = []
    monkeypatch.setattr(stages, "launch_stage", lambda *a, **kw: launched.append(kw) or {"model_dir": str(model)})
    for key, value in pod_env(0, 2, 29511).items():  # pod 0 of 2
        monkeypatch.setenv(key, value)

    def run(token, reuse=True, **inputs):
        handoff = write_handoff(cfg, "sft", token, {"train": "a/train", "valid": "a/valid", **inputs}, reuse=reuse)
        return command_steps.train_on_this_node("sft", cfg, read_inputs(handoff, "sft"), handoff)

    assert run("run1", run_name="r1") == {"model_dir": str(model)} and len(launched) == 1
    run("run2", run_name="r2")
    assert len(launched) == 2  # run1's result was never adopted: not reused
    command_steps.record_done(cfg, "sft", "run2")
    assert run("run3", run_name="r3") == {"model_dir": str(model)} and len(launched) == 2  # reused
    assert read_result(cfg, "sft", "run3", "r3") == {"model_dir": str(model)}
    again = handoff_path(cfg, "sft", "run3")
    assert command_steps.train_on_this_node("sft", cfg, read_inputs(again, "sft"), again) == {"model_dir": str(model)}
    assert len(launched) == 2  # the Job restarted after pod 0 finished: nothing trained
    (model / "model.safetensors").write_bytes(b"retrained by other code")  # the recorded model changed
    run("run6", run_name="r6")
    assert len(launched) == 3  # not reused
    run("run4", run_name="r4", train="b/train")
    run("run5", reuse=False, run_name="r5")
    assert len(launched) == 5
    with pytest.raises(EcomcapError, match="holds the inputs of run r5, not of this run"):
        read_result(cfg, "sft", "run5", "r6")  # a schedule's second run on the same compiled token


def test_inputs_outside_the_shared_volume_are_copied_onto_it(tmp_path):
    """With a remote artifact store a step loads artifacts into temporary folders of its own pod:
    the handoff must name copies on the volume the stage's pods mount."""
    cfg = RunConfig.model_validate({"data": {"work_dir": str(tmp_path / "volume" / "data")}})
    pod_tmp = tmp_path / "pod-tmp" / "ecomcap-artifact-x"
    pod_tmp.mkdir(parents=True)
    (pod_tmp / "report.json").write_text("{}")
    on_volume = tmp_path / "volume" / "data" / "train"
    on_volume.mkdir(parents=True)
    handoff = write_handoff(cfg, "generate", "tok", {"model": str(pod_tmp), "data": str(on_volume)}, share=True)
    inputs = read_inputs(handoff, "generate")
    assert inputs["data"] == str(on_volume)  # already shared: as it is
    copied = Path(inputs["model"])
    assert copied.is_relative_to(tmp_path / "volume") and (copied / "report.json").read_text() == "{}"


def test_a_checkpoint_waits_for_every_ranks_generators_and_refuses_without_them(tmp_path):
    from ecomcap.training.checkpoint import _restore_rng, collect_rng, complete_rng, save_rng

    dest = tmp_path / "ckpt"
    dest.mkdir()
    save_rng(tmp_path, 4, 0)
    with pytest.raises(EcomcapError, match="rng-rank1.pt missing"):
        collect_rng(tmp_path, 4, dest, world=2, wait_s=1)
    collect_rng(tmp_path, 4, dest, world=1)
    assert not complete_rng(dest, 2) and complete_rng(tmp_path / "none", 2)  # none at all: older format
    with pytest.raises(EcomcapError, match="not rank 1's"):
        _restore_rng(dest, 1, {})
    save_rng(tmp_path, 6, 0)
    save_rng(tmp_path, 6, 1)
    later = tmp_path / "later"
    later.mkdir()
    collect_rng(tmp_path, 6, later, world=2)
    assert complete_rng(later, 2) and sorted(f.name for f in later.iterdir()) == ["rng-rank0.pt", "rng-rank1.pt"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    prepare(root)
    return root


def test_a_pod_without_the_pod_environment_says_so(root):
    cfg = write_config(root, "alone", nodes=2)
    proc = subprocess.run([ECOMCAP, "train", "--stage", "sft", "--config", str(cfg)], cwd=root, env=base_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ecomcap train: error: launch.nodes is 2 but this process is not one of 2")


def test_ddp_on_two_pods_equals_one_node_with_two_processes(root):
    """The same `ecomcap train --stage sft` as one node x 2 processes and as 2 pods x 1 (ZenML's
    pod environment, main address 127.0.0.1): every logged figure of every step equal (rel 1e-4),
    every rank's weights and data order the same, and each pod says what the job is."""
    one = one_node(root, "ddp-one", num_processes=2)
    two, logs = two_pods(root, "ddp-two")
    assert one["nodes"] == 1 and two["nodes"] == 2 and len(two["ranks"]) == 2
    assert {r["weights"] for r in one["ranks"] + two["ranks"]} == {one["ranks"][0]["weights"]}
    assert {r["data_order"] for r in one["ranks"] + two["ranks"]} == {one["ranks"][0]["data_order"]}
    a, b = curve(root, one), curve(root, two)
    assert len(a) == len(b) >= 6 and [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        assert rb == pytest.approx(ra, rel=1e-4), (ra, rb)
    for i, text in enumerate(logs):
        assert f"node {i}: world size 2 over 2 nodes" in text, text[-2000:]
    assert json.loads(logs[1].strip().splitlines()[-1]) == {"stage": "sft", "node_done": True}
    assert Path(root / two["model_dir"]).is_dir()


def test_a_pod_of_several_refuses_work_it_would_repeat(root):
    """launch.nodes 1 on a pod of 2 (each pod would train the whole stage into one output_dir), and
    captioning raw files on a pod (each would ingest the whole catalogue): one line each."""
    env = {**base_env(), **pod_env(1, 2, 29511)}
    cfg = write_config(root, "one-node-on-pods")
    proc = subprocess.run([ECOMCAP, "train", "--stage", "sft", "--config", str(cfg)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "but launch.nodes is 1: set launch.nodes: 2" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([ECOMCAP, "generate", "--model", "tiny", "--data", "data/raw", "--out", "o.jsonl"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "give an ingested dataset" in proc.stderr, proc.stderr[-2000:]
