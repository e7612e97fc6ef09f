"""Config mistakes in one line through the `ecomcap` CLI (issue 21 §2): an unknown key names its path
and the closest valid key, a wrong type the path and the type expected, a renamed key is accepted
with a warning naming the new key. `tests/test_config_errors_e2e.py` runs the same cases through
`zenml pipeline run -c`."""
import logging
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml

from ecomcap.config import RunConfig, load_run_config, parse_model
from ecomcap.config_check import RENAMED
from ecomcap.errors import EcomcapError
from ecomcap.retrieval.config import RetrievalRunConfig


def _config(tmp_path, settings: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"parameters": {"config": settings}}), encoding="utf-8")
    return path


def _cli(*args) -> tuple[int, str]:
    """Exit code and the last line the user sees (stdout and stderr as one stream)."""
    proc = subprocess.run([sys.executable, "-m", "ecomcap.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    return proc.returncode, proc.stdout


def _last(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_unknown_key_names_the_closest_key_in_one_line(tmp_path):
    rc, out = _cli("prepare", "--config", _config(tmp_path, {"registry": {"flor": 0.3}}))
    assert rc == 2 and "Traceback" not in out
    assert _last(out) == (f"ecomcap prepare: error: invalid config in {tmp_path / 'run.yaml'}: "
                          "unknown key registry.flor: did you mean registry.floor?")


def test_wrong_type_names_the_expected_type_in_one_line(tmp_path):
    rc, out = _cli("prepare", "--config", _config(tmp_path, {"sft": {"max_steps": "many"}}))
    assert rc == 2 and "Traceback" not in out
    assert _last(out).endswith("invalid config in " + str(tmp_path / "run.yaml")
                               + ": sft.max_steps: expected an integer, got 'many'")


def test_renamed_key_is_accepted_with_a_warning_naming_the_new_key(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    rc, out = _cli("champion", "--config", _config(tmp_path, {"registry": {"cider_floor": 0.3}}),
                   "--version", "1", "--reason", "test", "--tracking-uri", store)
    assert "registry.cider_floor is renamed registry.floor" in out, out
    # the config was accepted: what stops the command is the empty registry, not the key
    assert rc == 2 and "invalid config" not in out
    assert _last(out).startswith("ecomcap champion: error: cannot make version 1 of 'ecomcap-captioner' champion")
    # a bad value under the old name: the one line names both names
    rc, out = _cli("prepare", "--config", _config(tmp_path, {"registry": {"cider_floor": -1}}))
    assert rc == 2 and _last(out).endswith(
        "registry.floor (written registry.cider_floor, renamed): Input should be greater than or equal to 0, got -1")


def test_a_renamed_key_sets_the_new_one_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ecomcap.config"):
        cfg = load_run_config(_config(tmp_path, {"registry": {"cider_floor": 0.25}}))
    assert cfg.registry.floor == 0.25
    assert "registry.cider_floor is renamed registry.floor" in caplog.text
    # the retrieval run has the same registry section, so the same rename
    assert parse_model(RetrievalRunConfig, {"registry": {"cider_floor": 0.5}}, "x").registry.floor == 0.5
    with pytest.raises(EcomcapError, match="both registry.cider_floor and registry.floor are set"):
        parse_model(RunConfig, {"registry": {"cider_floor": 0.1, "floor": 0.2}}, "x")


@pytest.mark.parametrize("settings,message", [
    ({"sft": {"num_beams": 3}}, "unknown key sft.num_beams: did you mean generate.num_beams?"),  # wrong section
    ({"sftt": {}}, "unknown key sftt: did you mean sft?"),
    ({"registry": {"cider_flor": 1}}, "unknown key registry.cider_flor: did you mean registry.floor?"),
    ({"finetune": {"strategy": "lorra"}},
     "finetune.strategy: expected one of 'lora', 'qlora', 'partial', 'freeze_llm', 'full', got 'lorra'"),
    ({"model": {"max_pixels": "x"}}, "model.max_pixels: expected an integer or null, got 'x'"),
    ({"data": {"splits": ["train", "dev"]}}, "data.splits[1]: expected one of 'train', 'valid', 'test', got 'dev'"),
    ({"registry": {"tolerances": {"attr_mean": "x"}}}, "registry.tolerances.attr_mean: expected a number, got 'x'"),
    ({"sft": 5}, "sft: expected a mapping (a section of settings), got 5"),
])
def test_messages(settings, message):
    with pytest.raises(EcomcapError) as err:
        parse_model(RunConfig, settings, "x.yaml")
    assert str(err.value) == f"invalid config in x.yaml: {message}"


def test_renames_are_dropped_in_the_release_they_name():
    """"Accepted for one release": an entry past its release is a reminder to delete it."""
    current = tuple(int(p) for p in version("ecomcap").split(".")[:2])
    for old, (new, until) in RENAMED.items():
        assert current < tuple(int(p) for p in until.split(".")), f"{old} -> {new}: drop it (ecomcap {until})"


def test_a_misspelt_parameters_config_and_broken_yaml_are_one_line(tmp_path):
    from ecomcap.config import load_run_config
    from ecomcap.errors import EcomcapError

    bad = tmp_path / "confg.yaml"
    bad.write_text("parameters:\n  confg:\n    sft: {max_steps: 3}\n", encoding="utf-8")
    with pytest.raises(EcomcapError, match=r"unknown key parameters.confg: the run settings go under parameters.config"):
        load_run_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("parameters:\n  config:\n    sft: {max_steps: 3\n", encoding="utf-8")
    with pytest.raises(EcomcapError) as err:
        load_run_config(broken)
    assert "\n" not in str(err.value) and "is not valid YAML" in str(err.value) and "line" in str(err.value)
