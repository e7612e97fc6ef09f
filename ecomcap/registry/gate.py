"""The promotion gate (both jobs): a candidate becomes `champion` only when it is better than the
champion beyond the noise of the evaluation set.

Rules (RegistryConfig; `primary_metric` is CIDEr-D for captioning, MeanRecall for retrieval):
- the primary metric is at least `floor`;
- both were measured on the same eval-set fingerprint (else the champion is re-evaluated);
- paired bootstrap over the items both scored: the lower end of the `confidence` interval of the
  relative gain mean(candidate)/mean(champion) - 1 is at least `min_rel_gain`;
- each guard metric (BLEU-4, ROUGE-L, attribute accuracy, caption->image R@1; R@1) trails the
  champion's by at most `tolerance` (or its own entry in `tolerances`).
No champion yet: the floor decides.

Race safety without a lock service: a gate re-reads the champion right before moving the alias
and records on its version the champion it passed against (`gate_base`) and when. Afterwards it
replays, in the order they passed, the versions that descend (through `gate_base`) from the
last champion set by hand, or from the first one: a version that passed against the replay's
current winner takes over as it did then; any other (a concurrent gate that passed against an
older champion) must pass the same rules against the current winner. The alias ends on the
replay's winner. A champion set by hand (`ecomcap champion`, e.g. a rollback) roots the replay,
so a version it replaced never takes the alias back; it stays until a candidate beats it.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ecomcap.config import RegistryConfig
from ecomcap.errors import EcomcapError
from ecomcap.registry.bootstrap import GainInterval, paired_relative_gain

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
SCORES_EXPERIMENT = "{name}-gate-scores"  # runs holding each version's per-item scores


@dataclass(frozen=True)
class Scores:
    """One model's figures on one eval set; `per_item` maps item id -> primary-metric score."""

    metrics: dict[str, float]
    eval_fingerprint: str
    per_item: dict[str, float] | None = None

    def tags(self) -> dict[str, str]:
        return {**{k: repr(float(v)) for k, v in self.metrics.items()}, "eval_fingerprint": self.eval_fingerprint}

    @classmethod
    def from_tags(cls, tags: dict[str, str], names: list[str]) -> "Scores | None":
        try:
            return cls({n: float(tags[n]) for n in names}, tags["eval_fingerprint"])
        except (KeyError, ValueError):
            return None


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    candidate_version: str
    champion_version: str | None
    champion_before: str | None = None
    champion_after: str | None = None
    candidate: dict = field(default_factory=dict)
    champion: dict | None = None
    interval: dict | None = None

    def text(self) -> str:
        head = "PROMOTED" if self.promote else "NOT PROMOTED"
        return f"{head}: version {self.candidate_version} vs champion {self.champion_version}\n" + \
            "\n".join(f"- {r}" for r in self.reasons)


def decide(candidate: Scores, champion: Scores | None,
           cfg: RegistryConfig) -> tuple[bool, list[str], GainInterval | None]:
    """Pure gate rules (floor, `minimums`, paired-bootstrap gain, guards); returns (promote?, reasons,
    bootstrap interval of the gain)."""
    p = cfg.primary_metric
    reasons: list[str] = []
    ok = candidate.metrics[p] >= cfg.floor
    reasons.append(f"{p} {candidate.metrics[p]:.4f} {'>=' if ok else '<'} floor {cfg.floor:.4f}")
    for name, low in cfg.minimums.items():
        got = candidate.metrics.get(name)
        fine = got is not None and got >= low
        reasons.append(f"{name} {'missing' if got is None else f'{got:.4f}'} {'>=' if fine else '<'} minimum {low:.4f}")
        ok = ok and fine
    if champion is None:
        reasons.append("no champion yet: the floor decides")
        return ok, reasons, None
    if champion.eval_fingerprint != candidate.eval_fingerprint:
        reasons.append("champion measured on another eval set: not comparable")
        return False, reasons, None
    if not candidate.per_item or not champion.per_item:
        who = "candidate" if not candidate.per_item else "champion"
        reasons.append(f"the {who} has no per-item {p} scores on this eval set: the gain cannot be tested")
        return False, reasons, None
    try:
        iv = paired_relative_gain(candidate.per_item, champion.per_item, confidence=cfg.confidence,
                                  resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)
    except ValueError as exc:
        reasons.append(f"not comparable: {exc}")
        return False, reasons, None
    gain_ok = iv.low >= cfg.min_rel_gain
    reasons.append(f"{p} {candidate.metrics[p]:.4f} vs champion {champion.metrics[p]:.4f}: {iv.text()}; "
                   f"lower bound {'>=' if gain_ok else '<'} min_rel_gain {cfg.min_rel_gain:+.2%}")
    for name in cfg.guard_metrics:
        cand, champ = candidate.metrics[name], champion.metrics[name]
        tol = cfg.tolerances.get(name, cfg.tolerance)
        fine = cand >= champ - tol
        reasons.append(f"{name} {cand:.4f} {'within' if fine else 'more than'} {tol} "
                       f"of champion {champ:.4f}")
        gain_ok = gain_ok and fine
    return ok and gain_ok, reasons, iv


def _version(v) -> str | None:
    """MLflow returns version numbers as str or int depending on the call: compare as str."""
    return None if v is None else str(v.version)


class Gate:
    """Registry operations of the gate on an MLflow client."""

    def __init__(self, client, cfg: RegistryConfig):
        self.client, self.cfg, self.name = client, cfg, cfg.model_name
        self.names = [cfg.primary_metric, *cfg.guard_metrics, *cfg.minimums]  # all decide() reads

    def check_reachable(self) -> None:
        try:
            self.client.search_registered_models(max_results=1)
        except Exception as exc:  # MLflow raises many types for connection problems
            raise EcomcapError(f"MLflow registry unreachable ({str(exc).splitlines()[0][:200]}): "
                               "nothing was changed") from None

    def champion(self):
        """The champion version, None when there is none yet; other registry errors surface."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, CHAMPION)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(exc):
                return None
            raise EcomcapError(f"cannot read the champion of '{self.name}': {str(exc).splitlines()[0]}") from None

    # ------------------------------------------------------------------ scores in the registry
    def record_scores(self, version: str, scores: Scores) -> None:
        """Metrics as version tags; per-item scores as an artifact of the version's score run."""
        if scores.per_item is not None:
            run_id = self._scores_run(version)
            self.client.log_text(run_id, json.dumps(scores.per_item), f"per_item/{scores.eval_fingerprint}.json")
        for k, v in scores.tags().items():
            self.client.set_model_version_tag(self.name, version, k, v)

    def scores_of(self, version) -> Scores | None:
        """Tagged metrics with the per-item scores on the same eval set (None when not stored)."""
        tags = version.tags or {}
        s = Scores.from_tags(tags, self.names)
        if s is None or "scores_run" not in tags:
            return s
        name = f"per_item/{s.eval_fingerprint}.json"
        for attempt in range(4):
            listed = [f.path for f in self.client.list_artifacts(tags["scores_run"], "per_item")]
            if name not in listed:  # scored before per-item storage, or on another eval set
                return s
            try:
                with tempfile.TemporaryDirectory(prefix="ecomcap-gate-") as tmp:
                    path = self.client.download_artifacts(tags["scores_run"], name, tmp)
                    return Scores(s.metrics, s.eval_fingerprint, json.loads(Path(path).read_text(encoding="utf-8")))
            except Exception as exc:  # a store busy with concurrent gates: retry, then surface
                if attempt == 3:
                    raise EcomcapError(f"cannot read the per-item scores of version {version.version}: "
                                       f"{str(exc).splitlines()[0][:200]}") from None
                log.warning("gate: reading per-item scores of version %s failed (%s): retrying",
                            version.version, str(exc).splitlines()[0][:120])
                time.sleep(0.5 * (attempt + 1))
        return s

    def _scores_run(self, version: str) -> str:
        tags = self.client.get_model_version(self.name, version).tags or {}
        if "scores_run" in tags:
            return tags["scores_run"]
        exp_name = SCORES_EXPERIMENT.format(name=self.name)
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
        run = self.client.create_run(exp_id, run_name=f"version-{version}")
        self.client.set_terminated(run.info.run_id)
        self.client.set_model_version_tag(self.name, version, "scores_run", run.info.run_id)
        return run.info.run_id

    # ------------------------------------------------------------------ deciding
    def evaluate_and_promote(
        self, candidate_version: str, scores: Scores,
        reevaluate: Callable[[str], Scores] | None = None, retries: int = 3,
    ) -> Decision:
        """Record the candidate's scores, apply the rules against the current champion, move the alias."""
        self.check_reachable()
        self.record_scores(candidate_version, scores)
        self.client.set_registered_model_alias(self.name, CHALLENGER, candidate_version)
        seen_at = time.time()
        before = self.champion()
        self._notice_hand_move(before, seen_at)
        if _version(before) == str(candidate_version):
            return self._finish(True, ["candidate is already the champion"], candidate_version, before,
                                before, scores, scores, None)
        reasons: list[str] = []
        champ = before
        for _ in range(retries):
            champ_scores = self._comparable(champ, scores, reevaluate, reasons)
            promote, rule_reasons, iv = decide(scores, champ_scores, self.cfg)
            if not promote:
                return self._finish(False, reasons + rule_reasons, candidate_version, champ, before, scores,
                                    champ_scores, iv)
            latest = self.champion()  # re-read right before moving
            if _version(latest) != _version(champ):
                reasons.append(f"champion moved to version {_version(latest)} meanwhile: re-checked")
                champ = latest
                continue
            # tagged only once it passed against the champion that is current now; the replay
            # of concurrent gates considers tagged versions only
            for k, v in (("gate_base", _version(champ) or "none"), ("gate_passed_at", repr(time.time())),
                         ("gate", "passed")):
                self.client.set_model_version_tag(self.name, candidate_version, k, v)
            self._move(candidate_version, "gate")
            self._converge(champ)
            return self._finish(True, reasons + rule_reasons, candidate_version, champ, before, scores,
                                champ_scores, iv)
        return self._finish(False, reasons + ["champion kept moving: gave up"], candidate_version, champ,
                            before, scores, None, None)

    def set_by_hand(self, version: str, reason: str) -> None:
        """A deliberate choice of champion (e.g. a rollback): it stays until a candidate beats it."""
        self.client.get_model_version(self.name, version)  # raises when it does not exist
        self.client.set_model_version_tag(self.name, version, "champion_reason", reason[:500])
        self._move(version, "hand")

    def _notice_hand_move(self, champ, seen_at: float) -> None:
        """A champion that a later gate had already replaced before we read it holds the alias
        again: someone moved it outside the gate (the MLflow UI). Treat it as set by hand, so the
        replay keeps it. (A successor's `champion_set_at` is written after its alias move, so one
        that moved while we were reading is not mistaken for a replaced champion.)"""
        if champ is None or (champ.tags or {}).get("champion_set_by") == "hand":
            return
        for v in self.client.search_model_versions(f"name='{self.name}'"):
            tags = v.tags or {}
            if tags.get("gate_base") == str(champ.version) and float(tags.get("champion_set_at") or "inf") < seen_at:
                log.info("gate: version %s was made champion outside the gate: kept as set by hand", champ.version)
                self.client.set_model_version_tag(self.name, str(champ.version), "champion_reason",
                                                  "alias moved outside the gate")
                self.client.set_model_version_tag(self.name, str(champ.version), "champion_set_by", "hand")
                self.client.set_model_version_tag(self.name, str(champ.version), "champion_set_at", repr(time.time()))
                return

    def _move(self, version: str, by: str) -> None:
        """Move the alias, then record who moved it and when (after the move: see _notice_hand_move)."""
        self.client.set_registered_model_alias(self.name, CHAMPION, str(version))
        self.client.set_model_version_tag(self.name, version, "champion_set_by", by)
        self.client.set_model_version_tag(self.name, version, "champion_set_at", repr(time.time()))

    def _comparable(self, champ, scores: Scores, reevaluate, reasons: list[str]) -> Scores | None:
        if champ is None:
            return None
        champ_scores = self.scores_of(champ)
        stale = champ_scores is None or champ_scores.eval_fingerprint != scores.eval_fingerprint
        if (stale or champ_scores.per_item is None) and reevaluate is not None:
            why = "on the current eval set" if stale else "for per-item scores"
            reasons.append(f"champion version {champ.version} re-evaluated {why}")
            champ_scores = reevaluate(str(champ.version))
            self.record_scores(str(champ.version), champ_scores)
        return champ_scores

    def _converge(self, base) -> None:
        """Replay the gates descending from the last hand-set (or first) champion; see the top."""
        versions = {str(v.version): v for v in self.client.search_model_versions(f"name='{self.name}'")}
        tag = lambda v, k: (versions[v].tags or {}).get(k) if v in versions else None  # noqa: E731
        root = _version(base)
        while root is not None and tag(root, "champion_set_by") != "hand" and tag(root, "gate_base") not in (None, "none"):
            root = tag(root, "gate_base")
        if root is not None and tag(root, "champion_set_by") != "hand":
            root = None if tag(root, "gate_base") == "none" else root  # the first champion: replay it too
        children: dict[str, list[str]] = {}
        for v in versions:
            if tag(v, "gate") == "passed":
                children.setdefault(tag(v, "gate_base") or "none", []).append(v)
        family, todo = [], [root or "none"]
        while todo:
            for child in children.get(todo.pop(), []):
                family.append(child)
                todo.append(child)
        if root is not None and tag(root, "champion_set_by") == "hand":  # only what passed after that
            since = float(tag(root, "champion_set_at") or 0)
            family = [v for v in family if float(tag(v, "gate_passed_at") or 0) > since]
        family.sort(key=lambda v: (float(tag(v, "gate_passed_at") or 0), int(v)))
        winner, winner_scores = root, None
        for v in family:
            if tag(v, "gate_base") == (winner or "none"):  # passed against this very champion
                winner, winner_scores = v, None
                continue
            winner_scores = winner_scores or (self.scores_of(versions[winner]) if winner else None)
            s = self.scores_of(versions[v])
            if s is not None and decide(s, winner_scores, self.cfg)[0]:
                winner, winner_scores = v, s
        current = _version(self.champion())
        if winner is not None and current != winner and current in family:
            log.info("gate: the replay of concurrent gates leaves version %s as champion", winner)
            self._move(winner, "gate")

    def _finish(self, promote, reasons, cand, champ, before, scores, champ_scores, iv) -> Decision:
        after = self.champion()
        strip = lambda s: {**asdict(s), "per_item": None} if s else None  # noqa: E731
        decision = Decision(
            promote=promote and _version(after) == str(cand), reasons=reasons,
            candidate_version=str(cand), champion_version=_version(champ),
            champion_before=_version(before), champion_after=_version(after),
            candidate=strip(scores), champion=strip(champ_scores), interval=asdict(iv) if iv else None,
        )
        if promote and not decision.promote:
            decision.reasons.append(f"a better version ({decision.champion_after}) holds the alias")
        self.client.set_model_version_tag(self.name, cand, "gate_decision",
                                          "promoted" if decision.promote else "rejected")
        log.info("gate: %s", decision.text().replace("\n", " | "))
        return decision
