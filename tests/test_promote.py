"""Captioning's promotion on a real MLflow store: what identifies a registered version, and
re-scoring the champion in the step that runs promote (configs/k8s.yaml: a CPU pod)."""
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml

from ecomcap.config import GenerateConfig, load_run_config
from ecomcap.registry.pyfunc import INFERENCE_FILE, export_merged, log_pyfunc
from ecomcap.registry.register import weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _info(path: Path) -> dict:
    return json.loads((path / INFERENCE_FILE).read_text(encoding="utf-8"))


def test_fingerprint_is_weights_and_decoding_only(merged, tiny_model_cfg, tmp_path):
    """The same weights merged from another path (run-specific `merged_from`) are the same
    version; another decoding of the same weights is another version."""
    moved = shutil.copytree(tiny_model_cfg.name_or_path, tmp_path / "elsewhere")
    gen = GenerateConfig.model_validate(_info(merged)["generate"])
    again = export_merged(moved, tmp_path / "again", tiny_model_cfg, gen)
    assert (again / "ecomcap_model.json").read_text() != (merged / "ecomcap_model.json").read_text()
    assert weights_fingerprint(again, _info(again)) == weights_fingerprint(merged, _info(merged))
    beams3 = export_merged(moved, tmp_path / "beams3", tiny_model_cfg, gen.model_copy(update={"num_beams": 3}))
    assert weights_fingerprint(beams3, _info(beams3)) != weights_fingerprint(merged, _info(merged))
    batch = export_merged(moved, tmp_path / "batch", tiny_model_cfg, gen.model_copy(update={"batch_size": 64}))
    assert weights_fingerprint(batch, _info(batch)) == weights_fingerprint(merged, _info(merged))  # speed only
    template = shutil.copytree(again, tmp_path / "template")  # same weights, another chat template
    tpl = next(p for p in sorted(template.iterdir()) if "chat_template" in p.name
               and "assistant" in p.read_text(encoding="utf-8"))
    tpl.write_text(tpl.read_text(encoding="utf-8").replace("assistant", "Assistant"), encoding="utf-8")
    assert weights_fingerprint(template, _info(template)) != weights_fingerprint(again, _info(again))


def test_k8s_promote_rescores_the_champion_with_its_own_settings_on_the_device_it_has(merged, small_data, tmp_path):
    """configs/k8s.yaml: re-scoring a real champion is beam search over the validation set in its
    own dtype, so promote runs on a GPU pod; the re-evaluation uses the device the step has
    (here: this CPU box, with the k8s config's `model.device: cuda`)."""
    raw = yaml.safe_load((ROOT / "configs/k8s.yaml").read_text(encoding="utf-8"))
    gpu_steps = {name for name, s in raw["steps"].items() if s.get("step_operator")}
    assert {"sft", "scst", "generate", "promote"} <= gpu_steps and "evaluate" not in gpu_steps
    pod = raw["steps"]["promote"]["settings"]["step_operator.kubernetes"]["pod_settings"]
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cfg = load_run_config(ROOT / "configs/k8s.yaml")
    assert cfg.model.device == "cuda"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={
        "tracking_uri": uri, "model_name": "k8s-cpu-rescore"})})
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        info = log_pyfunc(merged)
    version = mlflow.register_model(info.model_uri, cfg.registry.model_name).version

    from ecomcap.registry.promote import reevaluator

    scores = reevaluator(cfg, small_data["valid"], "fp")(str(version))
    assert set(scores.per_item) == {json.loads(ln)["image_id"] for ln in
                                    (small_data["raw"] / "IC_valid.jsonl").read_text().splitlines() if ln}
    assert scores.metrics["CIDEr-D"] == pytest.approx(sum(scores.per_item.values()) / len(scores.per_item))
