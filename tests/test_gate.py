"""Promotion gate on a real MLflow registry (SQLite): promote, refuse worse, refuse a different
eval set until re-evaluated, concurrent gates, unreachable registry."""
import threading

import pytest
from mlflow import MlflowClient

from ecomcap.config import RegistryConfig
from ecomcap.errors import EcomcapError
from ecomcap.registry.gate import CHAMPION, Gate, Scores, decide

CFG = RegistryConfig(model_name="captioner", min_rel_gain=0.01, tolerance=0.02, cider_floor=0.5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real SQLite registry for the module (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture()
def client(store, request):
    """A client on the shared store with a registered model of this test's own."""
    global CFG
    CFG = RegistryConfig(model_name=f"captioner-{request.node.name[:40]}", min_rel_gain=0.01,
                         tolerance=0.02, cider_floor=0.5)
    c = MlflowClient(tracking_uri=store, registry_uri=store)
    c.create_registered_model(CFG.model_name)
    c.uri = store
    return c


def new_version(client, tmp_path) -> str:
    n = len(client.search_model_versions(f"name='{CFG.model_name}'"))
    src = tmp_path / f"m{n}"
    src.mkdir()
    return str(client.create_model_version(CFG.model_name, str(src)).version)


def champion(client):
    try:
        return str(client.get_model_version_by_alias(CFG.model_name, CHAMPION).version)
    except Exception:
        return None


def test_rules():
    a = Scores(1.0, 0.3, 0.5, "fp")
    assert decide(a, None, CFG)[0]
    assert not decide(Scores(0.4, 0.3, 0.5, "fp"), None, CFG)[0]
    assert decide(Scores(1.02, 0.3, 0.5, "fp"), a, CFG)[0]
    assert not decide(Scores(1.005, 0.3, 0.5, "fp"), a, CFG)[0]  # below the 1% gain
    assert not decide(Scores(1.2, 0.25, 0.5, "fp"), a, CFG)[0]  # BLEU-4 fell too far
    assert decide(Scores(1.2, 0.29, 0.49, "fp"), a, CFG)[0]  # within tolerance
    ok, reasons = decide(Scores(2.0, 0.3, 0.5, "other"), a, CFG)
    assert not ok and "another eval set" in reasons[-1]


def test_promote_then_refuse_worse(client, tmp_path):
    gate = Gate(client, CFG)
    v1 = new_version(client, tmp_path)
    d1 = gate.evaluate_and_promote(v1, Scores(1.0, 0.3, 0.5, "fp"))
    assert d1.promote and champion(client) == v1
    v2 = new_version(client, tmp_path)
    d2 = gate.evaluate_and_promote(v2, Scores(0.9, 0.3, 0.5, "fp"))
    assert not d2.promote and champion(client) == v1
    assert client.get_model_version(CFG.model_name, v2).tags["gate_decision"] == "rejected"
    assert str(client.get_model_version_by_alias(CFG.model_name, "challenger").version) == v2
    v3 = new_version(client, tmp_path)
    assert gate.evaluate_and_promote(v3, Scores(1.1, 0.31, 0.5, "fp")).promote and champion(client) == v3


def test_floor_decides_without_champion(client, tmp_path):
    d = Gate(client, CFG).evaluate_and_promote(new_version(client, tmp_path), Scores(0.2, 0.1, 0.2, "fp"))
    assert not d.promote and champion(client) is None and "floor" in d.reasons[0]


def test_different_eval_set_refused_until_reevaluated(client, tmp_path):
    gate = Gate(client, CFG)
    v1 = new_version(client, tmp_path)
    gate.evaluate_and_promote(v1, Scores(1.0, 0.3, 0.5, "old-set"))
    v2 = new_version(client, tmp_path)
    d = gate.evaluate_and_promote(v2, Scores(1.5, 0.35, 0.55, "new-set"))
    assert not d.promote and champion(client) == v1
    calls = []

    def reevaluate(version):
        calls.append(str(version))
        return Scores(1.2, 0.3, 0.5, "new-set")

    v3 = new_version(client, tmp_path)
    d = gate.evaluate_and_promote(v3, Scores(1.5, 0.35, 0.55, "new-set"), reevaluate=reevaluate)
    assert calls == [v1] and d.promote and champion(client) == v3
    assert client.get_model_version(CFG.model_name, v1).tags["eval_fingerprint"] == "new-set"


def test_concurrent_gates_leave_the_best_passed_model(client, tmp_path):
    gate0 = Gate(client, CFG)
    v0 = new_version(client, tmp_path)
    gate0.evaluate_and_promote(v0, Scores(1.0, 0.3, 0.5, "fp"))
    ciders = [1.3, 1.1, 1.5, 0.8, 1.2, 1.4]
    versions = [new_version(client, tmp_path) for _ in ciders]
    barrier = threading.Barrier(len(ciders))
    errors = []

    def run(v, c):
        try:
            mine = MlflowClient(tracking_uri=client.uri, registry_uri=client.uri)
            barrier.wait()
            Gate(mine, CFG).evaluate_and_promote(v, Scores(c, 0.3, 0.5, "fp"))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v, c)) for v, c in zip(versions, ciders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert champion(client) == versions[ciders.index(max(ciders))]


def test_unreachable_registry_changes_nothing():
    client = MlflowClient(tracking_uri="http://127.0.0.1:9", registry_uri="http://127.0.0.1:9")
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    with pytest.raises(EcomcapError, match="unreachable"):
        Gate(client, CFG).evaluate_and_promote("1", Scores(1.0, 0.3, 0.5, "fp"))
