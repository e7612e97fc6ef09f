"""The local stack, idempotently, in one process: MLflow experiments on the checkout's SQLite store,
`zenml init`, the MLflow experiment tracker and model registry, the `ecomcap_local` stack (default
orchestrator and artifact store), made active. One process because every `zenml` command pays
~3 s of start-up, and this used to be eight of them on each `make run`.

Run by scripts/setup_stack.sh, after scripts/zenml_env.sh has set ZENML_CONFIG_PATH and the
MLflow variables; the repository is this checkout, wherever it is started from.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ["ZENML_LOGGING_VERBOSITY"] = "WARN"  # as quiet as the old `zenml ... >/dev/null` calls

EXPERIMENTS = ("training_pipeline", "batch_inference_pipeline", "retrieval_pipeline", "ecomcap")
STACK = "ecomcap_local"


def mlflow_experiments(tracking_uri: str, artifacts: str) -> None:
    """Experiments get their artifact root under .mlflow/ (not ./mlruns of whatever directory)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    for name in EXPERIMENTS:
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=f"file://{artifacts}/{name}")


def zenml_stack(root: Path, tracking_uri: str) -> None:
    from zenml.client import Client
    from zenml.enums import StackComponentType as T

    if not Client.is_repository_directory(root):
        Client.initialize(root)
    client = Client(root=root)
    wanted = {T.EXPERIMENT_TRACKER: ("mlflow_local", {"tracking_uri": tracking_uri}),
              T.MODEL_REGISTRY: ("mlflow_registry", {})}
    for kind, (name, configuration) in wanted.items():
        try:
            have = client.get_stack_component(kind, name, allow_name_prefix_match=False)
        except KeyError:
            client.create_stack_component(name, "mlflow", kind, configuration)
            continue
        if any(have.configuration.get(k) != v for k, v in configuration.items()):  # e.g. a moved checkout
            client.update_stack_component(name, kind, configuration=configuration)
    try:
        client.get_stack(STACK, allow_name_prefix_match=False)
    except KeyError:
        client.create_stack(STACK, {T.ORCHESTRATOR: "default", T.ARTIFACT_STORE: "default",
                                    T.EXPERIMENT_TRACKER: "mlflow_local", T.MODEL_REGISTRY: "mlflow_registry"})
    client.activate_stack(STACK)


def main() -> None:
    root = Path(__file__).resolve().parents[1]  # this checkout, wherever the script is started from
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow_experiments(uri, os.environ["MLFLOW_ARTIFACTS"])
    zenml_stack(root, uri)
    print(f"stack {STACK} ready (MLflow: {uri})")


if __name__ == "__main__":
    main()
