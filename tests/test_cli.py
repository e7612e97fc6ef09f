"""The console entry: exit codes and one-line messages, never a traceback for bad input."""
import json
import subprocess
import sys

import pytest

from ecomcap.data.formats import encode_base64, write_jsonl
from tests.conftest import make_image


def run_cli(*args, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "ecomcap.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_clean_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    msg_lines = [ln for ln in err.strip().splitlines() if ln.startswith("ecomcap ")]
    assert len(msg_lines) == 1, err
    for n in needles:
        assert n in msg_lines[0], msg_lines[0]


def _source(tmp_path, n_ok=40, n_bad=0):
    lines = [f"i{i}\t{encode_base64(make_image((i, 9, 9)))}" for i in range(n_ok)]
    lines += [f"b{i}\tnot-base64!!" for i in range(n_bad)]
    (tmp_path / "IC_valid.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "IC_valid.jsonl",
                [{"image_id": f"i{i}", "text": ["红色T恤"]} for i in range(n_ok)]
                + [{"image_id": f"b{i}", "text": ["x"]} for i in range(n_bad)])
    return tmp_path


def test_ingest_ok_and_over_limit(tmp_path):
    src = _source(tmp_path, n_ok=40, n_bad=3)  # 3/43 = 7% bad
    rc, out, err = run_cli("ingest", "--src", src, "--split", "valid", "--out", tmp_path / "o1")
    assert_clean_error(rc, err, "3 of 43 rows quarantined", "bad_base64 3")
    assert "rows_in 43 = ok 40 + quarantined 3" in out
    rc, out, err = run_cli("ingest", "--src", src, "--split", "valid", "--out", tmp_path / "o2",
                           "--max-bad-rate", "0.1", "--json")
    assert rc == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["passed"] and rep["rows_ok"] == 40 and rep["gx"]["success"]


@pytest.mark.parametrize(
    "setup,needle",
    [
        (lambda p: None, "does not exist"),
        (lambda p: (p.mkdir(), (p / "IC_train.tsv").write_text("a\tb\tc\td\n")), "4 TAB-separated columns"),
        (lambda p: (p.mkdir(), (p / "IC_train.tsv").write_text("a\tAAAA\n")), "IC_train.jsonl is missing"),
        (lambda p: (p.mkdir(), (p / "IC_train.tsv").write_text("\n\n")), "is empty"),
    ],
)
def test_unusable_source_is_one_line(tmp_path, setup, needle):
    src = tmp_path / "src"
    setup(src)
    rc, _, err = run_cli("ingest", "--src", src, "--split", "train", "--out", tmp_path / "o")
    assert_clean_error(rc, err, needle)


def test_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  ingest:\n    max_bad_rat: 0.1\n", encoding="utf-8")
    rc, _, err = run_cli("prepare", "--config", cfg)
    assert_clean_error(rc, err, "invalid config", "max_bad_rat")


def test_synth_then_evaluate(tmp_path):
    rc, out, err = run_cli("synth", "--out", tmp_path / "syn", "--train", 5, "--valid", 12, "--test", 2)
    assert rc == 0, err
    gold = tmp_path / "syn" / "IC_valid.jsonl"
    recs = [json.loads(line) for line in gold.read_text(encoding="utf-8").splitlines()]
    pred = tmp_path / "caption_gen.jsonl"
    write_jsonl(pred, [{"image_id": r["image_id"], "text": r["text"][0]} for r in recs])
    rc, out, err = run_cli("evaluate", "--pred", pred, "--gold", gold, "--json")
    assert rc == 0, err
    scores = json.loads(out)
    assert set(scores) == {"CIDEr-D", "BLEU-4", "ROUGE-L", "n"} and scores["n"] == 12
    assert scores["BLEU-4"] > 0.5 and scores["CIDEr-D"] > 1.0
    write_jsonl(pred, [{"image_id": r["image_id"], "text": r["text"][0]} for r in recs[:-1]])
    rc, _, err = run_cli("evaluate", "--pred", pred, "--gold", gold)
    assert_clean_error(rc, err, recs[-1]["image_id"])


def test_every_command_starts_without_loading_model_libraries():
    """`ecomcap summary` and friends build the whole parser first: none of it may import
    transformers/torch (the search commands' store defaults once did: ~6 s per command)."""
    code = ("import sys; from ecomcap.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_search_option_help_names_the_store_config_defaults():
    from ecomcap.cli import build_parser
    from ecomcap.retrieval.index.base import IndexConfig
    from ecomcap.retrieval.index.milvus import StoreConfig

    sub = next(a for a in build_parser()._actions if a.dest == "cmd" or hasattr(a, "choices") and
               isinstance(a.choices, dict) and "search" in a.choices).choices["search"]
    helps = {a.dest: a.help for a in sub._actions}
    assert StoreConfig().uri in helps["store_uri"] and f"default {IndexConfig().ef}" in helps["ef"]
    assert f"{StoreConfig().ef} in Milvus" in helps["ef"] and "recorded" in helps["index"]
