#!/usr/bin/env bash
# Register the ZenML stack that runs ecomcap on the cluster set up by `kubectl apply -k k8s/`.
#
#   REGISTRY_URI=registry.example.com/ecomcap bash k8s/register_stack.sh
#
# Components: S3 artifact store on the in-cluster MinIO, container registry, Kaniko image builder
# (the cluster has no Docker daemon), Kubernetes orchestrator, Kubernetes step operator (GPU
# steps), MLflow experiment tracker + model registry on the in-cluster server. Credentials only
# travel as ZenML secrets, read from the same env files as the cluster secrets (k8s/secrets/).
# Re-running updates what exists (idempotent). Needs: the zenml CLI logged in to a ZenML server
# the cluster can reach (`zenml login ...`), kubectl, python3.
set -euo pipefail

# ---- settings (override any of them from the environment) ---------------------------------
REGISTRY_URI="${REGISTRY_URI:?set REGISTRY_URI, the registry/repository images are pushed to}"
KUBE_CONTEXT="${KUBE_CONTEXT:-}"                  # kubectl context of the cluster; default: current
NAMESPACE="${NAMESPACE:-ecomcap}"                 # namespace of k8s/ (pipeline pods run here)
BUILD_NAMESPACE="${BUILD_NAMESPACE:-ecomcap-build}"   # Kaniko pods (run as root: baseline PSS)
KANIKO_IMAGE="${KANIKO_IMAGE:-gcr.io/kaniko-project/executor:v1.23.2}"
KANIKO_REGISTRY_SECRET="${KANIKO_REGISTRY_SECRET:-kaniko-registry}"  # docker-registry Secret in BUILD_NAMESPACE
S3_ENDPOINT="${S3_ENDPOINT:-http://minio.${NAMESPACE}.svc.cluster.local:9000}"  # MinIO S3 API
ARTIFACT_PATH="${ARTIFACT_PATH:-s3://zenml-artifacts}"
MLFLOW_URI="${MLFLOW_URI:-http://mlflow.${NAMESPACE}.svc.cluster.local:5000}"
PIPELINE_SA="${PIPELINE_SA:-ecomcap-pipeline}"    # k8s/rbac.yaml: may create step Jobs
STEP_SA="${STEP_SA:-ecomcap-step}"                # k8s/rbac.yaml: GPU step pods, no API token
SECRETS_DIR="${SECRETS_DIR:-$(cd "$(dirname "$0")" && pwd)/secrets}"
PREFIX="${PREFIX:-ecomcap}"                       # prefix of component and secret names
STACK="${STACK:-${PREFIX}-k8s}"
PYTHON="${PYTHON:-python3}"
ZENML="${ZENML:-zenml}"
# ----------------------------------------------------------------------------------------------

die() { echo "register_stack.sh: $*" >&2; exit 1; }

if [[ -z "$KUBE_CONTEXT" ]]; then
  KUBE_CONTEXT="$(kubectl config current-context)" || die "no kubectl context; set KUBE_CONTEXT"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# zenml_secret NAME ENV_FILE ENV_KEY=secret_key...: create or update a ZenML secret from an env
# file. Values go through a private temp file (`--values=@file`), never through argv.
zenml_secret() {
  local name=$1 env_file=$2
  shift 2
  [[ -f "$env_file" ]] || die "missing $env_file: copy ${env_file}.example and fill it in"
  (umask 077 && "$PYTHON" - "$env_file" "$@" >"$WORK/$name.json") <<'PY'
import json, sys

env = {}
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if line and not line.startswith("#") and "=" in line:
        key, value = line.split("=", 1)
        env[key.strip()] = value.strip().strip("'\"")
out = {}
for pair in sys.argv[2:]:
    src, dst = pair.split("=", 1)
    if env.get(src, "CHANGE_ME") in ("", "CHANGE_ME"):
        sys.exit(f"{sys.argv[1]}: {src} is missing, empty or still CHANGE_ME")
    out[dst] = env[src]
json.dump(out, sys.stdout)
PY
  if "$ZENML" secret get "$name" >/dev/null 2>&1; then
    "$ZENML" secret update "$name" --values="@$WORK/$name.json"
  else
    "$ZENML" secret create "$name" --values="@$WORK/$name.json"
  fi
}

# component TYPE NAME FLAVOR [--key=value...]: register, or update the config when it exists.
component() {
  local type=$1 name=$2 flavor=$3
  shift 3
  if "$ZENML" "$type" describe "$name" >/dev/null 2>&1; then
    "$ZENML" "$type" update "$name" "$@"
  else
    "$ZENML" "$type" register "$name" --flavor="$flavor" "$@"
  fi
}

# Secrets: the ZenML artifact store uses the MinIO user k8s/minio.yaml creates for ZenML; the
# MLflow components use an MLflow account (docs/kubernetes.md: "MLflow account").
S3_SECRET="${PREFIX}-s3-creds"
MLFLOW_SECRET="${PREFIX}-mlflow-creds"
zenml_secret "$S3_SECRET" "$SECRETS_DIR/zenml-s3.env" \
  AWS_ACCESS_KEY_ID=aws_access_key_id AWS_SECRET_ACCESS_KEY=aws_secret_access_key
zenml_secret "$MLFLOW_SECRET" "$SECRETS_DIR/mlflow-client.env" \
  MLFLOW_TRACKING_USERNAME=username MLFLOW_TRACKING_PASSWORD=password

# authentication_secret names the ZenML secret (AWS schema keys); `--secret` would not work
# here: the CLI reads it as "secrets to attach", not as the S3 config field of that name.
component artifact-store "${PREFIX}-minio" s3 \
  --path="$ARTIFACT_PATH" \
  --authentication_secret="$S3_SECRET" \
  --client_kwargs="{\"endpoint_url\": \"${S3_ENDPOINT}\"}" \
  --config_kwargs='{"s3": {"addressing_style": "path"}}'

component container-registry "${PREFIX}-registry" default --uri="$REGISTRY_URI"

# Kaniko pushes with the docker-registry Secret mounted as /kaniko/.docker/config.json and caches
# layers in the registry, so a rebuild after a code change only redoes the last layers.
component image-builder "${PREFIX}-kaniko" kaniko \
  --kubernetes_context="$KUBE_CONTEXT" \
  --kubernetes_namespace="$BUILD_NAMESPACE" \
  --executor_image="$KANIKO_IMAGE" \
  --executor_args="[\"--cache=true\", \"--cache-repo=${REGISTRY_URI}/kaniko-cache\", \"--compressed-caching=false\", \"--snapshot-mode=redo\"]" \
  --volumes="[{\"name\": \"registry\", \"secret\": {\"secretName\": \"${KANIKO_REGISTRY_SECRET}\", \"items\": [{\"key\": \".dockerconfigjson\", \"path\": \"config.json\"}]}}]" \
  --volume_mounts='[{"name": "registry", "mountPath": "/kaniko/.docker", "readOnly": true}]'

component orchestrator "${PREFIX}-orchestrator" kubernetes \
  --kubernetes_context="$KUBE_CONTEXT" \
  --kubernetes_namespace="$NAMESPACE" \
  --service_account_name="$PIPELINE_SA"

component step-operator "${PREFIX}-gpu" kubernetes \
  --kubernetes_context="$KUBE_CONTEXT" \
  --kubernetes_namespace="$NAMESPACE" \
  --service_account_name="$STEP_SA"

# '{{secret.key}}' strings are ZenML secret references, resolved where the component runs.
component experiment-tracker "${PREFIX}-mlflow" mlflow \
  --tracking_uri="$MLFLOW_URI" \
  --tracking_username="{{${MLFLOW_SECRET}.username}}" \
  --tracking_password="{{${MLFLOW_SECRET}.password}}"

component model-registry "${PREFIX}-mlflow-registry" mlflow

stack_args=(
  -a "${PREFIX}-minio" -c "${PREFIX}-registry" -i "${PREFIX}-kaniko"
  -o "${PREFIX}-orchestrator" -s "${PREFIX}-gpu" -e "${PREFIX}-mlflow" -r "${PREFIX}-mlflow-registry"
)
if "$ZENML" stack describe "$STACK" >/dev/null 2>&1; then
  "$ZENML" stack update "$STACK" "${stack_args[@]}"
else
  "$ZENML" stack register "$STACK" "${stack_args[@]}"
fi
"$ZENML" stack set "$STACK"
echo "Stack $STACK is active. Next: zenml pipeline run pipelines.training.training_pipeline -c configs/k8s.yaml"
