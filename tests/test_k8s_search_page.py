"""k8s/search-page.yaml: the search page as the Milvus reader, the milvus-users Job, and the network
policies around them (validated offline like the other manifests in tests/test_k8s.py)."""
import re

from ecomcap.retrieval.index import milvus_roles
from ecomcap.retrieval.index.milvus import StoreConfig
from tests.test_k8s import (
    K8S,
    PIPELINE_LABEL,
    kustomization,
    manifests,
    read_yaml,
    restricted_problems,
    validate_strict,
)
from tests.test_milvus_server_path import FakeMilvusAdmin

PAGE = {"app.kubernetes.io/name": "search-page"}


def _docs():
    return {(d["kind"], d["metadata"]["name"]): d for d in read_yaml(K8S / "search-page.yaml", many=True)}


def _all():
    return {(d["kind"], d["metadata"]["name"]): d for d in manifests()}


def _container(kind, name):
    return _docs()[kind, name]["spec"]["template"]["spec"]["containers"][0]


def _secret_values(name):
    """The keys and example values of a generated Secret (its *.env.example file)."""
    gen = next(g for g in kustomization()["secretGenerator"] if g["name"] == name)
    lines = (K8S / f"{gen['envs'][0]}.example").read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _pod_env(container):
    """The container's environment as the kubelet builds it from the example Secrets: envFrom
    first, then env in order with $(VAR) expanded from what came before."""
    env = {}
    for src in container.get("envFrom", []):
        env.update(_secret_values(src["secretRef"]["name"]))
    for e in container.get("env", []):
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            values = _secret_values(ref["name"])
            assert ref["key"] in values, f"{ref['name']} has no key {ref['key']}"
            env[e["name"]] = values[ref["key"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
    return env


def test_search_page_is_applied_validates_and_is_restricted():
    assert "search-page.yaml" in kustomization()["resources"]
    docs = _docs()
    assert set(docs) == {("Service", "search-page"), ("Deployment", "search-page"), ("Job", "milvus-users"),
                         ("NetworkPolicy", "search-page-ingress"), ("NetworkPolicy", "search-page-egress")}
    for d in docs.values():
        validate_strict(d)
        assert d in manifests()
    images = {i["name"]: i for i in kustomization()["images"]}
    for kind, name in (("Deployment", "search-page"), ("Job", "milvus-users")):
        spec = docs[kind, name]["spec"]["template"]["spec"]
        assert restricted_problems(spec) == [] and spec["automountServiceAccountToken"] is False
        c = spec["containers"][0]
        assert c["image"].split(":")[0] in images and c["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"])


def test_probes_ports_and_service_agree():
    c = _container("Deployment", "search-page")
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # /readyz is bounded by the store's timeout: the probe's own timeout leaves it room
    assert c["readinessProbe"]["timeoutSeconds"] > StoreConfig().timeout_s
    svc = _docs()["Service", "search-page"]
    assert svc["spec"]["selector"] == PAGE and port[svc["spec"]["ports"][0]["targetPort"]] == 8300
    assert _docs()["Deployment", "search-page"]["spec"]["template"]["metadata"]["labels"].items() >= PAGE.items()


def test_page_args_parse_with_the_real_cli_and_point_at_the_milvus_service():
    from ecomcap.cli import build_parser

    c = _container("Deployment", "search-page")
    assert c["command"] == ["ecomcap"]  # docker/Dockerfile has no ENTRYPOINT: the args alone would not run
    args = build_parser().parse_args(c["args"])
    assert args.alias == "serving" and args.no_champion_fallback  # the gate's eval set is never served there
    # the recorded (gated) index, its Milvus collection read on the cluster's server
    assert (args.host, args.port, args.index, args.store_uri) == ("0.0.0.0", 8300, "recorded", "http://milvus:19530")
    assert args.port == c["ports"][0]["containerPort"]
    milvus = _all()["Service", "milvus"]
    assert args.store_uri == f"http://{milvus['metadata']['name']}:{milvus['spec']['ports'][0]['port']}"
    store = StoreConfig(uri=args.store_uri)  # what the CLI builds: no role given
    assert not store.embedded and store.role == "reader"


def test_page_gets_the_reader_token_and_never_the_writers_or_roots():
    c = _container("Deployment", "search-page")
    env = _pod_env(c)
    users = _secret_values("milvus-users")
    token_var = StoreConfig().token_var
    assert env[token_var] == f"{users['MILVUS_READER_USER']}:{users['MILVUS_READER_PASSWORD']}"
    assert not [k for k in env if "WRITER" in k or "ROOT" in k]
    assert {s["secretRef"]["name"] for s in c.get("envFrom", [])} == {"search-page-mlflow"}
    assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_URI"].endswith(":5000")


def test_users_job_runs_milvus_roles_with_what_it_needs():
    c = _container("Job", "milvus-users")
    assert c["command"] == ["python", "-m", milvus_roles.__name__]
    env = _pod_env(c)
    assert env["MILVUS_URI"] == "http://milvus:19530"
    fake, seen = FakeMilvusAdmin(), []
    assert milvus_roles.main(env, connect=lambda uri, token: seen.append((uri, token)) or fake) == 0
    assert seen == [("http://milvus:19530", f"root:{_secret_values('milvus-root')['MILVUS_ROOT_PASSWORD']}")]
    users = _secret_values("milvus-users")
    assert ("grant_role", users["MILVUS_READER_USER"], milvus_roles.ROLES["reader"]) in fake.calls


def test_network_policies_let_the_page_reach_only_milvus_mlflow_and_dns():
    objs = _all()
    labels = {name: objs[kind, name]["spec"]["template"]["metadata"]["labels"]
              for kind, name in (("StatefulSet", "milvus"), ("Deployment", "mlflow"), ("Deployment", "search-page"))}
    assert not PIPELINE_LABEL.items() <= labels["search-page"].items()  # not a pipeline pod: no MinIO, no MLflow writes

    egress = objs["NetworkPolicy", "search-page-egress"]["spec"]
    assert egress["podSelector"]["matchLabels"] == PAGE and egress["policyTypes"] == ["Egress"]
    dns, *rules = egress["egress"]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    reached = {}
    for rule in rules:
        (peer,) = rule["to"]
        (name,) = [n for n, lab in labels.items() if peer["podSelector"]["matchLabels"].items() <= lab.items()]
        reached[name] = [p["port"] for p in rule["ports"]]
    assert reached == {"milvus": [19530], "mlflow": [5000]}
    for name, port in (("milvus", 19530), ("mlflow", 5000)):  # each Service's container port
        containers = objs[("StatefulSet" if name == "milvus" else "Deployment"), name]["spec"]["template"]["spec"]
        assert port in [p["containerPort"] for p in containers["containers"][0]["ports"]]

    def admits(policy):
        return any(PAGE.items() <= p.get("podSelector", {}).get("matchLabels", {}).items() and "namespaceSelector" not in p
                   for r in objs["NetworkPolicy", policy]["spec"]["ingress"] for p in r["from"])

    assert admits("milvus-ingress") and admits("mlflow-ingress")
    assert not admits("postgres-ingress") and not admits("minio-ingress")

    (rule,) = objs["NetworkPolicy", "search-page-ingress"]["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8300}]
    assert rule["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {}}}]


def test_the_index_jobs_cluster_config_reaches_milvus_as_the_writer():
    """configs/retrieval_index_k8s.yaml: a valid ZenML run configuration whose step pods carry the
    label the Milvus policy admits, the restricted securityContext, /data, and the writer's token
    (and the job's own config writes the server's collection)."""
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
    from zenml.integrations.kubernetes.pod_settings import KubernetesPodSettings

    from ecomcap.config import load_run_config
    from ecomcap.retrieval.index.catalogue import IndexJobConfig

    path = K8S.parent / "configs" / "retrieval_index_k8s.yaml"
    raw = read_yaml(path)
    PipelineRunConfiguration.model_validate(raw)
    pod = KubernetesPodSettings.model_validate(raw["settings"]["orchestrator.kubernetes"]["pod_settings"])
    assert pod.labels == {"app.kubernetes.io/part-of": "ecomcap-pipeline"}
    assert pod.additional_pod_spec_args["security_context"]["runAsNonRoot"] is True
    assert {m["mountPath"] for m in pod.volume_mounts} == {"/data"}
    env = {e["name"]: e for e in pod.env}
    assert env["MILVUS_WRITER_TOKEN"]["value"] == "$(MILVUS_WRITER_USER):$(MILVUS_WRITER_PASSWORD)"
    assert env["MILVUS_WRITER_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "milvus-users"
    cfg = load_run_config(path, IndexJobConfig)
    assert cfg.index.kind == "milvus" and cfg.index.milvus.uri == "http://milvus:19530"
    assert str(cfg.catalogue.work_dir).startswith("/data/")
