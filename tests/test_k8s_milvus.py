"""k8s/milvus.yaml: the vector store server the retrieval store's client code talks to at scale
(validated offline like the other manifests in tests/test_k8s.py; no API server here)."""
import os
import subprocess

import yaml

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

SERVER_URI = "http://milvus.ecomcap.svc.cluster.local:19530"


def _docs():
    return {(d["kind"], d["metadata"]["name"]): d for d in read_yaml(K8S / "milvus.yaml", many=True)}


def test_milvus_is_applied_validates_and_is_restricted():
    assert "milvus.yaml" in kustomization()["resources"]
    docs = _docs()
    for d in docs.values():
        validate_strict(d)
        assert d in manifests()
    spec = docs["StatefulSet", "milvus"]["spec"]["template"]["spec"]
    assert restricted_problems(spec) == []
    for c in spec["containers"] + spec["initContainers"]:
        assert c["image"].startswith("milvusdb/milvus:v") and {"cpu", "memory"} <= set(c["resources"]["limits"])


def test_service_policy_and_client_uri_agree():
    docs = _docs()
    svc = docs["Service", "milvus"]
    assert SERVER_URI == f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:" \
                         f"{svc['spec']['ports'][0]['port']}"
    ports = {p["name"]: p["containerPort"] for p in
             docs["StatefulSet", "milvus"]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports[svc["spec"]["ports"][0]["targetPort"]] == 19530
    rule = docs["NetworkPolicy", "milvus-ingress"]["spec"]["ingress"][0]
    writer, reader, users = ({"podSelector": {"matchLabels": labels}} for labels in (
        PIPELINE_LABEL, {"app.kubernetes.io/name": "search-page"}, {"app.kubernetes.io/name": "milvus-users"}))
    assert rule["from"] == [writer, reader, users]
    assert rule["ports"] == [{"protocol": "TCP", "port": 19530}]
    assert not StoreConfig(uri=SERVER_URI).embedded
    assert StoreConfig().token_var == "MILVUS_READER_TOKEN" and StoreConfig(role="writer").token_var == "MILVUS_WRITER_TOKEN"


def test_init_container_writes_a_user_yaml_with_auth_and_the_secret_password(tmp_path):
    """Run the init container's own shell command here: the YAML Milvus reads turns auth on and
    carries the password from the Secret, quotes and all."""
    init = _docs()["StatefulSet", "milvus"]["spec"]["template"]["spec"]["initContainers"][0]
    script = init["command"][2].replace("/config/", f"{tmp_path}/")
    password = 'p@ss "word"#1\\x'  # YAML-special characters are escaped, not breaking the file
    env = {**os.environ, "MILVUS_ROOT_PASSWORD": password}
    subprocess.run(["sh", "-c", script], check=True, env=env)
    conf = yaml.safe_load((tmp_path / "user.yaml").read_text())
    assert conf == {"common": {"security": {"authorizationEnabled": True, "defaultRootPassword": password}}}
    assert {"name": "milvus-root", "namespace": "ecomcap", "envs": ["secrets/milvus.env"]} in \
        kustomization()["secretGenerator"]
