"""The lines `make run` ends with (`ecomcap summary`): the newest pipeline run's caption metrics,
attribute accuracy (what the default config is tuned for), the data counts, the gate's decision in
one line, and where to look next: samples.html and the run in the MLflow UI."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from ecomcap.metrics.attributes import FIELDS as ATTRIBUTES

UI = "http://127.0.0.1:5000"


def summary_lines(s: dict, tracking_uri: str) -> list[str]:
    from ecomcap.registry.tracking import HEADLINE

    m = s["metrics"]
    lines = [f"run {s['run']}: " + "  ".join(f"{k} {m[k]:.4f}" for k in HEADLINE if k in m)]
    if "val.attr.mean" in m:
        each = [f"{f} {m[f'val.attr.{f}']:.1%}" for f in ATTRIBUTES if f"val.attr.{f}" in m]
        n = f" on {m['val.attr.n']:.0f} images" if "val.attr.n" in m else ""
        lines.append(f"attribute accuracy: mean {m['val.attr.mean']:.1%} ({', '.join(each)}){n}")
    for split in ("train", "valid"):
        if f"data.{split}.rows_in" in m:
            lines.append(f"data {split}: rows_in {m[f'data.{split}.rows_in']:.0f} = ok {m[f'data.{split}.rows_ok']:.0f}"
                         f" + quarantined {m[f'data.{split}.rows_quarantined']:.0f}")
    artifacts = _local_dir(s.get("artifact_uri") or "")
    lines.append(gate_line(s["gate"], m, artifacts))
    if artifacts is None or (artifacts / "samples.html").is_file():  # a remote store: evaluate logs it
        lines.append(f"samples: {_where(artifacts, s.get('artifact_uri'), 'samples.html')}")
    lines.append(f"MLflow run: {UI}/#/experiments/{s['experiment_id']}/runs/{s['run_id']} (with the UI below)")
    lines.append(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    return lines


def gate_line(gate: dict, m: dict, artifacts: Path | None) -> str:
    """`gate: promoted: ...` / `gate: rejected: ...`: decision, versions, gain interval, where the reasons are."""
    decision = gate.get("gate.decision")
    if decision is None:
        return "gate: n/a (this run registered no candidate)"
    cand, champ = gate.get("gate.candidate_version"), gate.get("gate.champion_after")
    if decision == "promoted":
        line = f"gate: promoted: candidate version {cand} is champion now"
    else:
        held = f"version {champ}" if champ not in (None, "None") else "none yet"
        line = f"gate: {decision}: candidate version {cand} not promoted, champion {held}"
    if "gate.rel_gain_low" in m:
        line += (f"; relative gain {m['gate.rel_gain']:+.2%}, interval [{m['gate.rel_gain_low']:+.2%}, "
                 f"{m['gate.rel_gain_high']:+.2%}]")
    why = _where(artifacts, None, "gate_decision.txt") if artifacts else "gate_decision.txt in the run"
    return f"{line} (reasons: {why})"


def _local_dir(uri: str) -> Path | None:
    """The run's artifact folder when it is on this machine (file:// or a plain path)."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def _where(local: Path | None, uri: str | None, name: str) -> str:
    return str(local / name) if local is not None else f"{uri}/{name}"
