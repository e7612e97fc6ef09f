"""The promotion gate: a candidate becomes `champion` only when it is measurably not worse.

Rules (RegistryConfig): candidate CIDEr-D >= champion CIDEr-D x (1 + min_rel_gain); BLEU-4 and
ROUGE-L within `tolerance` of the champion's; CIDEr-D >= an absolute floor; both measured on
the same eval-set fingerprint (else the champion is re-evaluated on the current set first).
No champion yet: the floor decides.

Race safety without a lock service: a gate tags its candidate `gate=passed` *before* moving
the alias, re-reads the champion right before moving, and after moving converges the alias on
the best passed version measured on the same eval set. Whatever the interleaving, the last
gate to finish leaves the best passed model as champion, never a worse one.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

from ecomcap.config import RegistryConfig
from ecomcap.errors import EcomcapError

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAGS = ("CIDEr-D", "BLEU-4", "ROUGE-L")


@dataclass(frozen=True)
class Scores:
    """Validation figures of one model on one eval set (raw pycocoevalcap scale)."""

    cider: float
    bleu4: float
    rouge_l: float
    eval_fingerprint: str

    def tags(self) -> dict[str, str]:
        return {"CIDEr-D": repr(self.cider), "BLEU-4": repr(self.bleu4), "ROUGE-L": repr(self.rouge_l),
                "eval_fingerprint": self.eval_fingerprint}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "Scores | None":
        try:
            return cls(float(tags["CIDEr-D"]), float(tags["BLEU-4"]), float(tags["ROUGE-L"]),
                       tags["eval_fingerprint"])
        except (KeyError, ValueError):
            return None

    @classmethod
    def from_metrics(cls, metrics: dict, eval_fingerprint: str) -> "Scores":
        return cls(float(metrics["CIDEr-D"]), float(metrics["BLEU-4"]), float(metrics["ROUGE-L"]),
                   eval_fingerprint)


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

    def text(self) -> str:
        head = "PROMOTED" if self.promote else "NOT PROMOTED"
        return f"{head}: version {self.candidate_version} vs champion {self.champion_version}\n" + \
            "\n".join(f"- {r}" for r in self.reasons)


def decide(candidate: Scores, champion: Scores | None, cfg: RegistryConfig) -> tuple[bool, list[str]]:
    """Pure gate rules; returns (promote?, reasons)."""
    reasons: list[str] = []
    ok = candidate.cider >= cfg.cider_floor
    reasons.append(f"CIDEr-D {candidate.cider:.4f} {'>=' if ok else '<'} floor {cfg.cider_floor:.4f}")
    if champion is None:
        reasons.append("no champion yet: the floor decides")
        return ok, reasons
    if champion.eval_fingerprint != candidate.eval_fingerprint:
        reasons.append("champion measured on another eval set: not comparable")
        return False, reasons
    need = champion.cider * (1 + cfg.min_rel_gain)
    c_ok = candidate.cider >= need
    reasons.append(f"CIDEr-D {candidate.cider:.4f} {'>=' if c_ok else '<'} champion {champion.cider:.4f}"
                   f" x (1 + {cfg.min_rel_gain}) = {need:.4f}")
    for name, cand, champ in (("BLEU-4", candidate.bleu4, champion.bleu4),
                              ("ROUGE-L", candidate.rouge_l, champion.rouge_l)):
        fine = cand >= champ - cfg.tolerance
        reasons.append(f"{name} {cand:.4f} {'within' if fine else 'more than'} {cfg.tolerance} "
                       f"of champion {champ:.4f}")
        c_ok = c_ok and fine
    return ok and c_ok, reasons


def _version(v) -> str | None:
    """MLflow returns version numbers as str or int depending on the call: compare as str."""
    return None if v is None else str(v.version)


def _better(a: tuple[Scores, int], b: tuple[Scores, int]) -> bool:
    """Strict total order for converging: CIDEr-D, then the newer version."""
    return (a[0].cider, a[1]) > (b[0].cider, b[1])


class Gate:
    """Registry operations of the gate on an MLflow client."""

    def __init__(self, client, cfg: RegistryConfig):
        self.client, self.cfg, self.name = client, cfg, cfg.model_name

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

    def scores_of(self, version) -> Scores | None:
        return Scores.from_tags(version.tags or {})

    def record_scores(self, version: str, scores: Scores) -> None:
        for k, v in scores.tags().items():
            self.client.set_model_version_tag(self.name, version, k, v)

    def evaluate_and_promote(
        self, candidate_version: str, scores: Scores,
        reevaluate: Callable[[str], Scores] | None = None, retries: int = 3,
    ) -> Decision:
        """Tag the candidate, apply the rules against the current champion, move the alias."""
        self.check_reachable()
        self.record_scores(candidate_version, scores)
        self.client.set_registered_model_alias(self.name, CHALLENGER, candidate_version)
        before = self.champion()
        if _version(before) == str(candidate_version):
            return self._finish(True, ["candidate is already the champion"], candidate_version, before,
                                before, scores, scores)
        reasons: list[str] = []
        champ = before
        for _ in range(retries):
            champ_scores = self._comparable(champ, scores, reevaluate, reasons)
            promote, rule_reasons = decide(scores, champ_scores, self.cfg)
            if not promote:
                return self._finish(False, reasons + rule_reasons, candidate_version, champ, before, scores, champ_scores)
            latest = self.champion()  # re-read right before moving
            if _version(latest) != _version(champ):
                reasons.append(f"champion moved to version {_version(latest)} meanwhile: re-checked")
                champ = latest
                continue
            # tagged only once it passed against the champion that is current now; the
            # convergence of concurrent gates considers tagged versions only
            self.client.set_model_version_tag(self.name, candidate_version, "gate", "passed")
            self.client.set_registered_model_alias(self.name, CHAMPION, candidate_version)
            self._converge(scores.eval_fingerprint)
            return self._finish(True, reasons + rule_reasons, candidate_version, champ, before, scores, champ_scores)
        return self._finish(False, reasons + ["champion kept moving: gave up"], candidate_version, champ,
                            before, scores, None)

    def _comparable(self, champ, scores: Scores, reevaluate, reasons: list[str]) -> Scores | None:
        if champ is None:
            return None
        champ_scores = self.scores_of(champ)
        if champ_scores is None or champ_scores.eval_fingerprint != scores.eval_fingerprint:
            if reevaluate is None:
                return champ_scores
            reasons.append(f"champion version {champ.version} re-evaluated on the current eval set")
            champ_scores = reevaluate(champ.version)
            self.record_scores(champ.version, champ_scores)
        return champ_scores

    def _converge(self, fingerprint: str) -> None:
        """Point champion at the best version that passed a gate on this eval set."""
        passed = []
        for v in self.client.search_model_versions(f"name='{self.name}'"):
            s = self.scores_of(v)
            if (v.tags or {}).get("gate") == "passed" and s and s.eval_fingerprint == fingerprint:
                passed.append((s, int(v.version)))
        if not passed:
            return
        best = passed[0]
        for p in passed[1:]:
            best = p if _better(p, best) else best
        current = self.champion()
        if current is None or int(current.version) != best[1]:
            log.info("gate: converging champion on better version %d", best[1])
            self.client.set_registered_model_alias(self.name, CHAMPION, str(best[1]))

    def _finish(self, promote, reasons, cand, champ, before, scores, champ_scores) -> Decision:
        after = self.champion()
        decision = Decision(
            promote=promote and _version(after) == str(cand), reasons=reasons,
            candidate_version=str(cand), champion_version=_version(champ),
            champion_before=_version(before), champion_after=_version(after),
            candidate=asdict(scores), champion=asdict(champ_scores) if champ_scores else None,
        )
        if promote and not decision.promote:
            decision.reasons.append(f"a better version ({decision.champion_after}) holds the alias")
        self.client.set_model_version_tag(self.name, cand, "gate_decision",
                                          "promoted" if decision.promote else "rejected")
        log.info("gate: %s", decision.text().replace("\n", " | "))
        return decision
