"""Promotion gate on a real MLflow registry (SQLite): promote, refuse worse, refuse a gain within
the noise (paired bootstrap), refuse a different eval set until re-evaluated, concurrent gates
replayed with the gate's own rule, a champion set by hand stays, unreachable registry."""
import threading

import numpy as np
import pytest
from mlflow import MlflowClient

from ecomcap.config import RegistryConfig
from ecomcap.errors import EcomcapError
from ecomcap.registry.bootstrap import paired_relative_gain
from ecomcap.registry.gate import CHAMPION, Gate, Scores, decide

CFG = RegistryConfig(model_name="captioner", min_rel_gain=0.01, tolerance=0.02, floor=0.5)
IDS = [f"img{i:03d}" for i in range(200)]


def scores(cider, bleu=0.3, rouge=0.5, fp="fp", spread=0.0, seed=0):
    """Scores whose per-image CIDEr-D average to `cider` (optionally noisy around it)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, spread, len(IDS)) if spread else np.zeros(len(IDS))
    noise -= noise.mean()
    per = {i: float(cider + n) for i, n in zip(IDS, noise)}
    return Scores({"CIDEr-D": cider, "BLEU-4": bleu, "ROUGE-L": rouge}, fp, per)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real SQLite registry for the module (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture()
def client(store, request, tmp_path):
    """A client on the shared store with a registered model of this test's own."""
    global CFG
    CFG = RegistryConfig(model_name=f"captioner-{request.node.name[:40]}", min_rel_gain=0.01,
                         tolerance=0.02, floor=0.5)
    c = MlflowClient(tracking_uri=store, registry_uri=store)
    c.create_registered_model(CFG.model_name)
    c.uri = store
    import mlflow

    mlflow.set_tracking_uri(store)
    return c


def new_version(client, tmp_path) -> str:
    n = len(client.search_model_versions(f"name='{CFG.model_name}'"))
    src = tmp_path / f"m{n}"
    src.mkdir(exist_ok=True)
    return str(client.create_model_version(CFG.model_name, str(src)).version)


def champion(client):
    try:
        return str(client.get_model_version_by_alias(CFG.model_name, CHAMPION).version)
    except Exception:
        return None


def test_bootstrap_interval():
    a = {i: 1.0 + 0.1 * (k % 7) for k, i in enumerate(IDS)}
    same = paired_relative_gain(a, a)
    assert same.gain == same.low == same.high == 0.0
    up = paired_relative_gain({i: v * 1.1 for i, v in a.items()}, a)  # +10% on every image
    assert up.low == pytest.approx(0.1) and up.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="different items"):
        paired_relative_gain({"x": 1.0}, {"y": 1.0})
    # deterministic for a seed, and the interval widens with the per-image noise
    noisy = {i: v + (0.8 if k % 2 else -0.8) for k, (i, v) in enumerate(a.items())}
    iv = paired_relative_gain(noisy, a, seed=3)
    assert iv == paired_relative_gain(noisy, a, seed=3) and iv.low < 0 < iv.high


def test_rules():
    a = scores(1.0)
    assert decide(a, None, CFG)[0]
    assert not decide(scores(0.4), None, CFG)[0]
    ok, _, iv = decide(scores(1.02), a, CFG)
    assert ok and iv.low == pytest.approx(0.02)
    assert not decide(scores(1.005), a, CFG)[0]  # below the 1% gain
    assert not decide(scores(1.2, bleu=0.25), a, CFG)[0]  # BLEU-4 fell too far
    assert decide(scores(1.2, bleu=0.29, rouge=0.49), a, CFG)[0]  # within tolerance
    ok, reasons, _ = decide(scores(2.0, fp="other"), a, CFG)
    assert not ok and "another eval set" in reasons[-1]
    ok, reasons, _ = decide(scores(2.0), Scores(a.metrics, "fp"), CFG)
    assert not ok and "no per-item" in reasons[-1]


def test_gain_within_the_noise_is_refused():
    """+3% on average clears min_rel_gain as a single number, but not beyond the noise."""
    champ = scores(1.0, spread=0.6, seed=1)
    rng = np.random.default_rng(7)
    noisy = {i: v * 1.03 + rng.normal(0, 0.5) for i, v in champ.per_item.items()}
    shift = 1.03 * 1.0 - np.mean(list(noisy.values()))
    noisy = {i: v + shift for i, v in noisy.items()}
    cand = Scores({"CIDEr-D": 1.03, "BLEU-4": 0.3, "ROUGE-L": 0.5}, "fp", noisy)
    ok, reasons, iv = decide(cand, champ, CFG)
    assert iv.gain == pytest.approx(0.03, abs=1e-9) and iv.low < CFG.min_rel_gain and not ok
    assert "interval" in reasons[1]
    steady = Scores(cand.metrics, "fp", {i: v * 1.03 for i, v in champ.per_item.items()})
    assert decide(steady, champ, CFG)[0]  # the same mean gain on every image passes


def test_promote_then_refuse_worse(client, tmp_path):
    gate = Gate(client, CFG)
    v1 = new_version(client, tmp_path)
    d1 = gate.evaluate_and_promote(v1, scores(1.0))
    assert d1.promote and champion(client) == v1
    v2 = new_version(client, tmp_path)
    d2 = gate.evaluate_and_promote(v2, scores(0.9))
    assert not d2.promote and champion(client) == v1 and d2.interval["high"] < 0
    assert client.get_model_version(CFG.model_name, v2).tags["gate_decision"] == "rejected"
    assert str(client.get_model_version_by_alias(CFG.model_name, "challenger").version) == v2
    v3 = new_version(client, tmp_path)
    assert gate.evaluate_and_promote(v3, scores(1.1, bleu=0.31)).promote and champion(client) == v3
    stored = gate.scores_of(client.get_model_version(CFG.model_name, v3))
    assert stored.per_item == scores(1.1).per_item  # per-image scores live in the registry


def test_floor_decides_without_champion(client, tmp_path):
    d = Gate(client, CFG).evaluate_and_promote(new_version(client, tmp_path), scores(0.2, 0.1, 0.2))
    assert not d.promote and champion(client) is None and "floor" in d.reasons[0]


def test_different_eval_set_refused_until_reevaluated(client, tmp_path):
    gate = Gate(client, CFG)
    v1 = new_version(client, tmp_path)
    gate.evaluate_and_promote(v1, scores(1.0, fp="old-set"))
    v2 = new_version(client, tmp_path)
    d = gate.evaluate_and_promote(v2, scores(1.5, 0.35, 0.55, "new-set"))
    assert not d.promote and champion(client) == v1
    calls = []

    def reevaluate(version):
        calls.append(str(version))
        return scores(1.2, fp="new-set")

    v3 = new_version(client, tmp_path)
    d = gate.evaluate_and_promote(v3, scores(1.5, 0.35, 0.55, "new-set"), reevaluate=reevaluate)
    assert calls == [v1] and d.promote and champion(client) == v3
    assert client.get_model_version(CFG.model_name, v1).tags["eval_fingerprint"] == "new-set"


def test_replay_of_concurrent_gates_applies_the_gate_rule(client, tmp_path):
    """Two gates passed against the same champion (a race); the one with the higher CIDEr-D trails the
    other on BLEU-4 beyond the tolerance, so it must not end up holding the alias."""
    gate = Gate(client, CFG)
    x = new_version(client, tmp_path)
    gate.evaluate_and_promote(x, scores(1.0))
    a, b = new_version(client, tmp_path), new_version(client, tmp_path)
    for t, (v, s) in enumerate(((a, scores(1.2, bleu=0.40)), (b, scores(1.3, bleu=0.30)))):
        gate.record_scores(v, s)
        for k, val in (("gate_base", x), ("gate_passed_at", str(t)), ("gate", "passed")):
            client.set_model_version_tag(CFG.model_name, v, k, val)
    client.set_registered_model_alias(CFG.model_name, CHAMPION, b)  # b moved last in the race
    gate._converge(client.get_model_version(CFG.model_name, x))
    assert champion(client) == a


def test_concurrent_gates_leave_the_best_passed_model(client, tmp_path):
    gate0 = Gate(client, CFG)
    v0 = new_version(client, tmp_path)
    gate0.evaluate_and_promote(v0, scores(1.0))
    ciders = [1.3, 1.1, 1.5, 0.8, 1.2, 1.4]
    versions = [new_version(client, tmp_path) for _ in ciders]
    barrier = threading.Barrier(len(ciders))
    errors = []

    def run(v, c):
        try:
            mine = MlflowClient(tracking_uri=client.uri, registry_uri=client.uri)
            barrier.wait()
            Gate(mine, CFG).evaluate_and_promote(v, scores(c))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v, c)) for v, c in zip(versions, ciders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert champion(client) == versions[ciders.index(max(ciders))]


def test_champion_set_by_hand_stays_until_beaten(client, tmp_path):
    gate = Gate(client, CFG)
    v1, v2 = new_version(client, tmp_path), new_version(client, tmp_path)
    gate.evaluate_and_promote(v1, scores(1.0))
    gate.evaluate_and_promote(v2, scores(1.5))
    gate.set_by_hand(v1, "rollback: v2 misbehaves in production")
    assert champion(client) == v1
    assert client.get_model_version(CFG.model_name, v1).tags["champion_set_by"] == "hand"
    v3 = new_version(client, tmp_path)
    assert not gate.evaluate_and_promote(v3, scores(0.9)).promote and champion(client) == v1
    v4 = new_version(client, tmp_path)  # beats the hand-set champion, not the better v2
    d = gate.evaluate_and_promote(v4, scores(1.2))
    assert d.promote and champion(client) == v4
    # the eval set changes: the champion is re-scored, a better candidate takes over, and the
    # replay never hands the alias back to the hand-set version scored on the old set
    v5 = new_version(client, tmp_path)
    d = gate.evaluate_and_promote(v5, scores(1.4, fp="new"), reevaluate=lambda v: scores(1.2, fp="new"))
    assert d.promote and champion(client) == v5
    v6 = new_version(client, tmp_path)
    d = gate.evaluate_and_promote(v6, scores(1.6, fp="new"))
    assert d.promote and champion(client) == v6


def test_rollback_in_the_mlflow_ui_is_not_undone(client, tmp_path):
    """Moving the alias by hand in the UI (no tag): the next gate compares against that version,
    and the replay does not resurrect the version it replaced."""
    gate = Gate(client, CFG)
    v1, v2 = new_version(client, tmp_path), new_version(client, tmp_path)
    gate.evaluate_and_promote(v1, scores(1.0))
    gate.evaluate_and_promote(v2, scores(1.5))
    client.set_registered_model_alias(CFG.model_name, CHAMPION, v1)  # what the UI does
    v3 = new_version(client, tmp_path)
    assert gate.evaluate_and_promote(v3, scores(1.2)).promote and champion(client) == v3


def test_unreachable_registry_changes_nothing():
    client = MlflowClient(tracking_uri="http://127.0.0.1:9", registry_uri="http://127.0.0.1:9")
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    with pytest.raises(EcomcapError, match="unreachable"):
        Gate(client, CFG).evaluate_and_promote("1", scores(1.0))
