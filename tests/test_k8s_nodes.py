"""Several nodes on Kubernetes (configs/k8s_multinode.yaml, docs/kubernetes.md#several-nodes): the
Indexed Job and headless Service ZenML's Kubernetes step operator submits for `sft_nodes` and
`scst_nodes`, built with ZenML's own builders as `submit_with_allocation` builds them for
pod_count > 1, and the command steps of the compiled pipelines.

Offline, as tests/test_k8s.py: no cluster, no ZenML Client. The pipelines are compiled in a
subprocess with a throwaway ZenML store (ZENML_CONFIG_PATH), as tests/test_batch_inference.py
does: the developer's store stays untouched.
"""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")

from kubernetes import client as k8s_client
from zenml.constants import ENV_ZENML_STEP_OPERATOR
from zenml.integrations.kubernetes import kube_utils, manifest_utils
from zenml.integrations.kubernetes.constants import MULTI_POD_MAIN_PORT, STEP_NAME_ANNOTATION_KEY
from zenml.integrations.kubernetes.flavors import KubernetesStepOperatorSettings as OpSettings
from zenml.utils.dict_utils import recursive_update

from ecomcap.command_steps import handoff_path, pod_command
from ecomcap.config import RunConfig, load_run_config
from ecomcap.nodes import DEFAULT_PORT, current_node, require_nodes
from ecomcap.paths import off_volume
from tests.test_k8s import (
    PIPELINE_LABEL,
    check_pipeline_pod,
    manifests,
    read_yaml,
    strip_nulls,
    validate_strict,
)
from tests.test_k8s_sizing import sizing_problems

TOKEN = "0123456789ab"  # a run's handoff token, as a compile draws one


def token_of(argv: list[str]) -> str:
    """The run token in a command step's `--inputs <dir>/<stage>-<token>.json`."""
    return PurePosixPath(argv[argv.index("--inputs") + 1]).stem.split("-", 1)[1]


ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "k8s_multinode.yaml"
NAMESPACE = "ecomcap"  # k8s/register_stack.sh: the step operator's namespace
PORT = 29500  # ZenML's MULTI_POD_MAIN_PORT, torchrun's default
NODE_STEPS = ("sft", "scst")  # the stages of this config (DPO is off)
# batch inference across pods (docs/kubernetes.md#several-nodes); parts on the shared volume
INFERENCE = {"generate": {"chunks": {"pods": 2, "parts_dir": "/data/ecomcap/generate_parts"}}}


def raw_config() -> dict:
    return read_yaml(CONFIG)


def run_cfg() -> RunConfig:
    return load_run_config(CONFIG)


def op_settings(raw: dict, step: str, pods: int) -> OpSettings:
    """The step operator's settings of `step`: the pipeline code's pod_count (steps/nodes.py
    on_nodes), the file's step entry over it, the file's run-level settings under both."""
    step_raw = raw["steps"][step]
    code = {"pod_count": pods}
    merged = recursive_update(copy.deepcopy(raw["settings"]),
                              {"step_operator.kubernetes": recursive_update(code, step_raw["settings"]
                                                                            ["step_operator.kubernetes"])})
    return OpSettings.model_validate(merged["step_operator.kubernetes"])


def multi_pod_job(stage: str, raw: dict, cfg: RunConfig) -> tuple[dict, dict, str]:
    """(Job, Service, job name) of `<stage>_nodes` as KubernetesStepOperator.submit_with_allocation
    builds them, as the API server stores them."""
    step = f"{stage}_nodes"
    settings = op_settings(raw, step, cfg.launch.nodes)
    assert settings.pod_count == cfg.launch.nodes
    pod_settings = kube_utils.apply_resource_request_allocations_to_pod_settings(
        allocated_resource_request=None, pod_settings=settings.pod_settings)
    pod_settings = kube_utils.apply_default_resource_requests(memory="400Mi", pod_settings=pod_settings)
    step_labels = {"run_name": "r", "pipeline": "training_pipeline",
                   "step_name": kube_utils.sanitize_label_value(step)}
    job_name = kube_utils.sanitize_label(f"-0123abcd-{step}-training_pipeline-step-operator")
    job_name = kube_utils.multi_pod_job_name(job_name, settings.pod_count)
    # the launcher's environment: ZenML's own, the run's and the step's `environment`, then the pods'
    environment = {"ZENML_STORE_URL": "https://zenml.example.com", **raw["environment"],
                   **raw["steps"][step].get("environment", {}), ENV_ZENML_STEP_OPERATOR: "True"}
    environment.update(kube_utils.multi_pod_environment(job_name=job_name, namespace=NAMESPACE,
                                                        pod_count=settings.pod_count))
    entrypoint = pod_command(stage, cfg, TOKEN)  # a command step's entrypoint is its command (no ZenML args)
    pod = manifest_utils.build_pod_manifest(
        pod_name=None, image_name="registry.example.com/ecomcap/ecomcap:run",
        command=entrypoint[:3], args=entrypoint[3:], env=environment, privileged=settings.privileged,
        pod_settings=pod_settings, service_account_name=settings.service_account_name, labels=step_labels,
        annotations={"zenml.io/workspace-user-id": "u"})
    job = manifest_utils.build_job_manifest(
        job_name=job_name, pod_template=manifest_utils.pod_template_manifest_from_pod(pod), backoff_limit=0,
        ttl_seconds_after_finished=settings.ttl_seconds_after_finished,
        active_deadline_seconds=settings.active_deadline_seconds, labels=step_labels,
        annotations={STEP_NAME_ANNOTATION_KEY: step}, pod_count=settings.pod_count)
    api = k8s_client.ApiClient()
    job_doc = strip_nulls(api.sanitize_for_serialization(job))
    job_doc["metadata"]["namespace"] = NAMESPACE
    job.metadata.uid = "6a1f4c8e-0000-4000-8000-000000000001"  # what create_job returns carries one
    service_doc = strip_nulls(api.sanitize_for_serialization(manifest_utils.build_headless_service_manifest(job)))
    service_doc["metadata"]["namespace"] = NAMESPACE
    return ({"apiVersion": "batch/v1", "kind": "Job", **job_doc},
            {"apiVersion": "v1", "kind": "Service", **service_doc}, job_name)


@pytest.fixture(scope="module")
def node_jobs():
    """{stage: (Job, Service, job name)} for the command steps of configs/k8s_multinode.yaml."""
    raw, cfg = raw_config(), run_cfg()
    return {stage: multi_pod_job(stage, raw, cfg) for stage in NODE_STEPS}


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def _env(job: dict) -> dict:
    return {e["name"]: e["value"] for e in _container(job)["env"]}


def _pvc_mounts(spec: dict) -> dict[str, str]:
    """{mount path: claim name} of the pod's persistentVolumeClaim volumes."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
              if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]] for m in spec["containers"][0].get("volumeMounts", [])
            if m["name"] in claims}


def test_config_loads_with_several_nodes():
    cfg = run_cfg()
    assert cfg.launch.nodes == 2 and cfg.launch.num_processes == 8
    assert (ROOT / cfg.launch.config_file).is_file()  # relative to /app, the image's workdir
    assert cfg.dpo.enabled is False  # else dpo_inputs/dpo_nodes/dpo need entries (test below)
    assert off_volume(cfg, ["/data"]) == []  # outputs and handoffs outlive a pod


def test_jobs_and_services_validate_and_pods_are_restricted(node_jobs):
    for stage, (job, service, _) in node_jobs.items():
        validate_strict(service)
        spec = check_pipeline_pod(job, stage)
        assert spec["serviceAccountName"] == "ecomcap-step", stage


def test_indexed_job_and_headless_service_give_pod_0_a_stable_name(node_jobs):
    nodes = run_cfg().launch.nodes
    assert MULTI_POD_MAIN_PORT == DEFAULT_PORT == PORT  # the Service's port, the pods' fallback
    for stage, (job, service, name) in node_jobs.items():
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(f"{name}-{nodes - 1}") <= 63, name
        spec = job["spec"]
        assert spec["completionMode"] == "Indexed", stage
        assert spec["completions"] == spec["parallelism"] == nodes, stage
        assert spec["backoffLimit"] == 0, stage  # a lost pod fails the Job; the step's retry starts a new one
        assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"] == name
        s = service["spec"]
        assert s["clusterIP"] == "None" and s["publishNotReadyAddresses"] is True, stage
        assert s["selector"] == {"job-name": name}, stage  # Kubernetes labels a Job's pods with job-name
        assert [p["port"] for p in s["ports"]] == [PORT], stage
        owner = service["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("Job", name), stage  # reaped with the Job


def test_every_pod_finds_its_rank_and_pod_0(node_jobs):
    """ZenML's pod environment plus the JOB_COMPLETION_INDEX Kubernetes gives each Indexed pod, read
    as the pods read it (ecomcap.nodes)."""
    cfg = run_cfg()
    nodes = cfg.launch.nodes
    for stage, (job, _, name) in node_jobs.items():
        env = _env(job)
        assert env["ZENML_KUBERNETES_POD_COUNT"] == str(nodes), stage
        assert env["ZENML_KUBERNETES_MAIN_ADDRESS"] == f"{name}-0.{name}.{NAMESPACE}.svc", stage
        assert env["ZENML_KUBERNETES_MAIN_PORT"] == str(PORT), stage
        for i in range(nodes):
            node = require_nodes(nodes, {**env, "JOB_COMPLETION_INDEX": str(i)})
            assert (node.rank, node.count, node.main_address, node.main_port) == (
                i, nodes, f"{name}-0.{name}.{NAMESPACE}.svc", PORT), stage
        assert current_node({k: v for k, v in env.items() if not k.startswith("ZENML_KUBERNETES_")}) is None
        # NCCL over the pod network (no InfiniBand assumed), model weights on the shared volume
        assert env["NCCL_IB_DISABLE"] == "1" and env["NCCL_SOCKET_IFNAME"] and env["NCCL_DEBUG"] == "WARN", stage
        assert PurePosixPath(env["HF_HOME"]).is_relative_to("/data"), stage


def test_each_pod_runs_the_stage_on_its_gpus_with_data_and_shm(node_jobs):
    cfg = run_cfg()
    quota = next(int(d["spec"]["hard"]["requests.nvidia.com/gpu"]) for d in manifests()
                 if d["kind"] == "ResourceQuota")
    assert quota >= cfg.launch.nodes * cfg.launch.num_processes, "the namespace quota must admit every pod at once"
    for stage, (job, _, _) in node_jobs.items():
        spec = job["spec"]["template"]["spec"]
        container = _container(job)
        res = container["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(cfg.launch.num_processes)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory", stage
        assert sizing_problems(res, shm["sizeLimit"], quota) == [], stage
        assert _pvc_mounts(spec) == {"/data": "ecomcap-data"}, stage
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"], stage

        argv = container["command"] + container["args"]
        assert argv == pod_command(stage, cfg, TOKEN), stage
        assert argv[:4] == ["ecomcap", "train", "--stage", stage], stage
        assert RunConfig.model_validate_json(argv[argv.index("--config-json") + 1]) == cfg, stage
        inputs = PurePosixPath(argv[argv.index("--inputs") + 1])
        assert inputs == PurePosixPath(handoff_path(cfg, stage, TOKEN).as_posix()), stage
        assert inputs.is_relative_to("/data"), f"{stage}: the handoff must be on the shared volume"


def admits(src: dict, dst: dict, port: int | None = None) -> bool:
    """Whether k8s/networkpolicy.yaml lets pods labelled `src` reach pods labelled `dst` in the
    same namespace on TCP `port` (None: on every port)."""
    selecting = [d["spec"] for d in manifests() if d["kind"] == "NetworkPolicy"
                 and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
                 and d["spec"]["podSelector"].get("matchLabels", {}).items() <= dst.items()]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy.get("ingress", []):
            peers = rule.get("from")
            from_src = peers is None or any(
                "podSelector" in p and "namespaceSelector" not in p
                and p["podSelector"].get("matchLabels", {}).items() <= src.items() for p in peers)
            ports = [p["port"] for p in rule.get("ports", [])]
            if from_src and (not ports or (port is not None and port in ports)):
                return True
    return False


def test_admits_reads_the_policies():
    mlflow = {"app.kubernetes.io/name": "mlflow"}
    assert admits(PIPELINE_LABEL, mlflow, 5000)
    assert not admits(PIPELINE_LABEL, mlflow)  # port 5000 only
    assert not admits(PIPELINE_LABEL, {"app.kubernetes.io/name": "postgres"}, 5432)


def test_the_pods_of_a_job_reach_each_other(node_jobs):
    """k8s/networkpolicy.yaml's multi-node-peers: pod 0's rendezvous (:29500) and NCCL's ephemeral
    ports between the pods of a stage, over default-deny-ingress."""
    for stage, (job, _, name) in node_jobs.items():
        labels = {**job["spec"]["template"]["metadata"]["labels"], "job-name": name}
        assert admits(labels, labels, PORT), f"{stage}: pod 1 cannot reach pod 0's rendezvous"
        assert admits(labels, labels), f"{stage}: NCCL connects every pod to every pod on ephemeral ports"


def test_the_regular_gpu_steps_fit_their_pods():
    """scst (merges the LoRA), generate, promote: one GPU each; sft adopts the result on CPU."""
    raw = raw_config()
    quota = next(int(d["spec"]["hard"]["requests.nvidia.com/gpu"]) for d in manifests()
                 if d["kind"] == "ResourceQuota")
    gpu_steps = {s for s, c in raw["steps"].items() if c.get("step_operator")}
    assert gpu_steps == {"sft_nodes", "scst_nodes", "scst", "generate", "promote"}
    for step in gpu_steps - {"sft_nodes", "scst_nodes"}:
        pod = raw["steps"][step]["settings"]["step_operator.kubernetes"]["pod_settings"]
        shm = next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm")
        assert int(pod["resources"]["limits"]["nvidia.com/gpu"]) == 1, step
        assert sizing_problems(pod["resources"], shm, quota) == [], step
        assert "pod_count" not in raw["steps"][step]["settings"]["step_operator.kubernetes"], step
    for step in ("sft_nodes", "scst_nodes"):  # launch.nodes is the one source of the pod count
        assert "pod_count" not in raw["steps"][step]["settings"]["step_operator.kubernetes"], step


GRAPH = r'''
import copy, json, sys
import yaml
from zenml.config.compiler import Compiler
from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
from ecomcap.config import RunConfig, load_run_config
from pipelines.inference import batch_inference_pipeline
from pipelines.training import training_pipeline


def describe(pipeline, run=None):
    """Each invocation, with the run file's entries applied as ZenML's compiler applies them
    (Compiler.compile: the run level, then each step's entry over the step's own configuration)."""
    if run is not None:
        Compiler()._apply_run_configuration(pipeline, run)
    out = {}
    for name, inv in pipeline.invocations.items():
        step = copy.deepcopy(inv.step)
        if run is not None and name in (run.steps or {}):
            step._apply_configuration(run.steps[name])
        c = step.configuration
        op = c.settings.get("step_operator.kubernetes")
        out[name] = {"upstream": sorted(inv.upstream_steps), "command": c.command, "step_operator": c.step_operator,
                     "enable_cache": c.enable_cache, "environment": dict(c.environment),
                     "operator": op.model_dump(mode="json", exclude_unset=True) if op is not None else None}
    return out


path, inference = sys.argv[1], json.loads(sys.argv[2])
raw = yaml.safe_load(open(path, encoding="utf-8"))
training = training_pipeline.copy()
training.prepare(config=load_run_config(path))
plain = describe(training)
run = PipelineRunConfiguration.model_validate({k: v for k, v in raw.items() if k != "parameters"})
batch = batch_inference_pipeline.copy()
batch.prepare(config=RunConfig.model_validate(inference))
again = training_pipeline.copy()
again.prepare(config=load_run_config(path))
print(json.dumps({"training": plain, "training_run": describe(training, run), "inference": describe(batch),
                  "training_again": describe(again)}))
'''


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The compiled pipelines' invocations (graph only: nothing runs)."""
    tmp = tmp_path_factory.mktemp("graphs")
    env = {**os.environ, "ZENML_CONFIG_PATH": str(tmp / "zen"), "ZENML_ANALYTICS_OPT_IN": "false",
           "PYTHONPATH": str(ROOT)}
    env.pop("ZENML_STORE_URL", None)
    script = tmp / "graph.py"  # ZenML wants a main module with a file (its source root)
    script.write_text(GRAPH, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(CONFIG), json.dumps(INFERENCE)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_pipeline_runs_each_stage_as_a_command_step_on_the_nodes(graphs):
    cfg = run_cfg()
    steps = graphs["training"]
    assert list(steps) == ["ingest", "validate", "sft_inputs", "sft_nodes", "sft", "scst_inputs", "scst_nodes",
                           "scst", "generate", "evaluate", "promote"]
    for stage in NODE_STEPS:
        nodes = steps[f"{stage}_nodes"]
        assert nodes["upstream"] == [f"{stage}_inputs"], stage
        assert f"{stage}_nodes" in steps[stage]["upstream"], stage
        assert nodes["command"] == pod_command(stage, cfg, token_of(steps["sft_nodes"]["command"])), stage
        assert nodes["step_operator"] is True, stage
        assert nodes["operator"]["pod_count"] == cfg.launch.nodes, stage
        assert steps[stage]["command"] is None and steps[f"{stage}_inputs"]["command"] is None
    assert "sft" in steps["scst_inputs"]["upstream"]  # SCST starts from the adopted SFT model


def test_run_file_entries_are_steps_of_the_pipeline_and_merge_with_the_code(graphs):
    """ZenML ignores, with only a warning, an entry for a step the pipeline does not have: a typo
    would run that stage on the defaults. The file's pod settings merge with the code's pod_count."""
    raw, cfg = raw_config(), run_cfg()
    assert set(raw["steps"]) <= set(graphs["training"]), set(raw["steps"]) - set(graphs["training"])
    steps = graphs["training_run"]
    for stage in NODE_STEPS:
        nodes = steps[f"{stage}_nodes"]
        assert OpSettings.model_validate(nodes["operator"]) == op_settings(raw, f"{stage}_nodes", cfg.launch.nodes)
        assert nodes["environment"] == raw["steps"][f"{stage}_nodes"]["environment"], stage
    assert steps["sft"]["step_operator"] is False and steps["scst"]["step_operator"] is True


def test_each_run_has_its_own_handoff_and_no_command_step_is_cached(graphs):
    """The token drawn at compile time gives every run its own handoff (the same config compiled
    twice); under the shipped run file the command steps and their inputs steps stay uncached (a
    run-level `enable_cache: true` would override their own False: a schedule's second run, same
    token, would get the first run's pods from the cache), and neither k8s run file sets one."""
    for stage in NODE_STEPS:
        for name in (f"{stage}_nodes", f"{stage}_inputs"):
            assert graphs["training_run"][name]["enable_cache"] is False, name
    for name in ("k8s.yaml", "k8s_multinode.yaml"):
        assert "enable_cache" not in read_yaml(ROOT / "configs" / name), name
    first, second = graphs["training"], graphs["training_again"]
    for stage in NODE_STEPS:
        a, b = first[f"{stage}_nodes"]["command"], second[f"{stage}_nodes"]["command"]
        assert a != b and a[:-1] == b[:-1], stage  # only the handoff path differs
        assert token_of(a) != token_of(b)


def test_batch_inference_captions_across_pods_then_merges(graphs):
    cfg = RunConfig.model_validate(INFERENCE)
    steps = graphs["inference"]
    assert steps["generate_pods"]["upstream"] == ["generate_inputs"]
    assert "generate_pods" in steps["merge_generated"]["upstream"]
    assert steps["write_predictions"]["upstream"] == ["merge_generated"]
    assert not {"generate", "generate_0"} & set(steps)
    pods = steps["generate_pods"]
    assert pods["command"] == pod_command("generate", cfg, token_of(pods["command"]))
    assert pods["command"][:2] == ["ecomcap", "generate"]
    assert pods["step_operator"] is True and pods["operator"]["pod_count"] == 2
