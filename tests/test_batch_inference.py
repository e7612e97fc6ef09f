"""Catalogue-scale batch inference: chunks read the right rows, a killed run resumes to the same
output, worker processes give the same output as one process, every id exactly once."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecomcap.config import GenerateConfig, IngestConfig
from ecomcap.data.ingest import ingest_split
from ecomcap.data.shards import read_table
from ecomcap.errors import EcomcapError
from ecomcap.inference.batch import caption_dataset, quarantined_ids
from ecomcap.inference.chunks import PartStore, plan_chunks, read_chunk
from ecomcap.inference.generate import bucket_batches, image_token_counts
from ecomcap.modeling.load import load_base

GEN = GenerateConfig(num_beams=2, max_new_tokens=5, batch_size=2)


def _gen(chunk_size=2, workers=1):
    return GEN.model_copy(update={"chunks": GEN.chunks.model_copy(update={"chunk_size": chunk_size,
                                                                          "workers": workers})})


def _raw_ids(small_data, split="test"):
    lines = (small_data["raw"] / f"IC_{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["image_id"] for line in lines]


@pytest.fixture(scope="module")
def many_shards(small_data, tmp_path_factory):
    """The train split ingested into 4-row shards of 3-row groups (chunks cross group bounds)."""
    out = tmp_path_factory.mktemp("many_shards") / "train"
    return ingest_split(small_data["raw"], "train", out, IngestConfig(rows_per_shard=4, rows_per_group=3)).out_dir


def test_chunks_cover_every_row_once_in_order(many_shards):
    want = read_table(many_shards, ["image_id"]).column(0).to_pylist()
    for size in (1, 2, 3, 5):
        chunks = plan_chunks(many_shards, size)
        assert all(0 < len(c) <= size for c in chunks)
        got = [i for c in chunks for i in read_chunk(many_shards, c, ["image_id"]).column(0).to_pylist()]
        assert got == want


def test_killed_run_resumes_to_the_same_output(tiny_model_cfg, small_data, tmp_path):
    full = caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "a.jsonl",
                           _gen())
    out = tmp_path / "b.jsonl"
    with pytest.raises(InterruptedError):
        caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], out, _gen(),
                        stop_after_chunks=1)
    (part_dir,) = [p for p in Path(f"{out}.parts").iterdir()]
    (first,) = part_dir.glob("part-*.jsonl")
    stamp = first.stat().st_mtime_ns
    (part_dir / ".part-000001.jsonl.killed.tmp").write_text('{"image_id": "half', encoding="utf-8")  # killed mid-write
    resumed = caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], out, _gen())
    assert first.stat().st_mtime_ns == stamp  # the finished chunk was not redone
    assert out.read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert resumed == full
    ids = [json.loads(line)["image_id"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(ids) == sorted(_raw_ids(small_data)) and len(set(ids)) == len(ids)


def test_other_decoding_does_not_reuse_parts(tiny_model_cfg, small_data, tmp_path):
    out = tmp_path / "c.jsonl"
    caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], out, _gen())
    caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], out,
                    _gen().model_copy(update={"max_new_tokens": 3}))
    assert len(list(Path(f"{out}.parts").iterdir())) == 2


def test_parts_follow_the_model_content_not_its_path(tiny_model_cfg, small_data, tmp_path):
    """Each Kubernetes pod loads the model into its own temporary directory: the same model under
    another path finds the parts; the same path retrained in place (new weights) does not."""
    import shutil

    from safetensors.torch import load_file, save_file

    parts = tmp_path / "parts"
    first = caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "a.jsonl",
                            _gen(), parts)
    copy = tmp_path / "pod-copy"
    shutil.copytree(tiny_model_cfg.name_or_path, copy)
    again = caption_dataset(str(copy), tiny_model_cfg, small_data["test"], tmp_path / "b.jsonl", _gen(), parts,
                            stop_after_chunks=0)  # would raise if any chunk had to be captioned again
    assert again == first and len(list(parts.iterdir())) == 1
    (weights,) = copy.glob("*.safetensors")
    state = load_file(weights)
    name = sorted(state)[len(state) // 2]
    state[name] = state[name] + 1.0  # retrained in place: same file name, same size
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(InterruptedError):
        caption_dataset(str(copy), tiny_model_cfg, small_data["test"], tmp_path / "b.jsonl", _gen(), parts,
                        stop_after_chunks=0)


def test_two_worker_processes_equal_one(tiny_model_cfg, small_data, tmp_path):
    one = caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "1.jsonl",
                          _gen())
    two = caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "2.jsonl",
                          _gen(workers=2))
    assert two == one
    assert (tmp_path / "1.jsonl").read_bytes() == (tmp_path / "2.jsonl").read_bytes()


def test_merge_refuses_missing_parts_and_duplicate_ids(many_shards, tmp_path):
    chunks = plan_chunks(many_shards, 4)
    store = PartStore(tmp_path / "parts")
    ids = [read_chunk(many_shards, c, ["image_id"]).column(0).to_pylist() for c in chunks]
    for c, chunk_ids in zip(chunks[:-1], ids):
        store.write(c, [(i, "x") for i in chunk_ids])
    with pytest.raises(EcomcapError, match="no part yet"):
        store.merge(chunks, tmp_path / "out.jsonl")
    store.write(chunks[-1], [(ids[0][0], "dup")] + [(i, "x") for i in ids[-1][1:]])
    with pytest.raises(EcomcapError, match="captioned twice"):
        store.merge(chunks, tmp_path / "out.jsonl")
    with pytest.raises(EcomcapError, match="captions for"):
        store.write(chunks[0], [(ids[0][0], "too few")])
    assert not (tmp_path / "out.jsonl").exists()


def test_batches_bucket_by_image_token_count(tiny_model_cfg):
    _, processor = load_base(tiny_model_cfg)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    sizes = [(224, 224), (60, 90), (500, 500), (90, 60), (112, 112), (224, 223)]
    tokens = image_token_counts(processor, sizes)
    assert tokens == [64, 6, 64, 6, 16, 64]
    assert bucket_batches(tokens, 2) == [[1, 3], [4, 0], [2, 5]]


@pytest.mark.e2e
def test_cli_killed_with_sigkill_resumes(tiny_model_cfg, small_data, tmp_path):
    """The real thing: `ecomcap generate` killed (SIGKILL) after its first part, then rerun."""
    def cmd(out):
        return [sys.executable, "-m", "ecomcap.cli", "generate", "--model", tiny_model_cfg.name_or_path,
                "--data", str(small_data["valid"]), "--out", str(out), "--chunk-size", "1", "--beams", "2"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "ref.jsonl"), check=True, env=env, capture_output=True)
    out = tmp_path / "run.jsonl"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(Path(f"{out}.parts").glob("*/part-*.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(Path(f"{out}.parts").glob("*/part-*.jsonl")))
    assert 0 < done < 8 and not out.exists()
    subprocess.run(cmd(out), check=True, env=env, capture_output=True)
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


@pytest.mark.e2e
def test_pipeline_fans_generate_out_and_merges(tmp_path):
    """batch_inference_pipeline with `chunks.fan_out: 3`: three parallel generate steps, then one
    merge (graph only, in a throwaway ZenML store: nothing runs, the developer's store is untouched)."""
    code = (
        "from ecomcap.config import RunConfig\n"
        "from pipelines.inference import batch_inference_pipeline\n"
        "import json\n"
        "out = {}\n"
        "for n in (1, 3):\n"
        "    p = batch_inference_pipeline.copy()\n"
        "    p.prepare(config=RunConfig.model_validate({'generate': {'chunks': {'fan_out': n, 'parts_dir': '/tmp/p'}}}))\n"
        "    out[n] = {k: sorted(v.upstream_steps) for k, v in p.invocations.items()}\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "ZENML_CONFIG_PATH": str(tmp_path / "zen"), "ZENML_ANALYTICS_OPT_IN": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("ZENML_STORE_URL", None)
    script = tmp_path / "graph.py"  # ZenML wants a main module with a file (its source root)
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    graphs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert graphs["1"]["write_predictions"] == ["generate"] and "generate_0" not in graphs["1"]
    fan = graphs["3"]
    assert all(fan[f"generate_{i}"] == ["champion_model", "ingest_split_step"] for i in range(3))
    assert fan["merge_generated"] == ["champion_model", "generate_0", "generate_1", "generate_2",
                                      "ingest_split_step"]
    assert fan["write_predictions"] == ["merge_generated"]


def test_fan_out_shares_then_merge_equal_one_run(tiny_model_cfg, small_data, tmp_path):
    from ecomcap.inference.batch import caption_share, merge_dataset

    one = caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "1.jsonl",
                          _gen())
    parts = tmp_path / "shared"
    with pytest.raises(EcomcapError, match="no part yet"):
        merge_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "2.jsonl",
                      _gen(), parts)
    n = [caption_share(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], _gen(), i, 2, parts)
         for i in range(2)]
    assert sum(n) == len(read_table(small_data["test"], ["image_id"]))
    merged = merge_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "2.jsonl",
                           _gen(), parts)
    assert merged == one and (tmp_path / "1.jsonl").read_bytes() == (tmp_path / "2.jsonl").read_bytes()


@pytest.mark.parametrize("flag", [["--chunk-size", "-5"], ["--chunk-size", "0"], ["--workers", "0"],
                                  ["--beams", "0"], ["--workers", "two"]])
def test_cli_generate_refuses_non_positive_counts(flag, tmp_path, capsys):
    from ecomcap.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "m", "--data", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), *flag])
    assert exc.value.code == 2
    assert flag[0] in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_generate_flags_override_the_config_validated(tmp_path):
    from ecomcap.cli import _overlay
    from ecomcap.config import GenerateConfig

    base = GenerateConfig(num_beams=4).model_dump()
    got = GenerateConfig.model_validate(_overlay(base, {"num_beams": None, "chunks": {"workers": 3,
                                                                                     "chunk_size": None}}))
    assert (got.num_beams, got.chunks.workers, got.chunks.chunk_size) == (4, 3, GenerateConfig().chunks.chunk_size)


def test_merge_refuses_a_plan_that_does_not_cover_the_dataset(tiny_model_cfg, small_data, tmp_path):
    """An unvalidated chunk size (as `model_copy` let through) plans no chunks: nothing captioned must
    not become a file of only the quarantined ids."""
    bad = GEN.model_copy(update={"chunks": GEN.chunks.model_copy(update={"chunk_size": -5})})
    with pytest.raises(EcomcapError, match="covers 0 images"):
        caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "o.jsonl", bad)
    assert not (tmp_path / "o.jsonl").exists()


def test_worker_gpu_follows_the_parents_visible_devices():
    """GPU counts here are given, not detected (no GPU on this machine): the assignment only."""
    from ecomcap.inference.batch import worker_gpu

    assert [worker_gpu(r, 2, "3,5") for r in range(3)] == ["3", "5", "3"]
    uuids = "GPU-aaaa-1111,GPU-bbbb-2222"
    assert [worker_gpu(r, 2, uuids) for r in range(2)] == ["GPU-aaaa-1111", "GPU-bbbb-2222"]
    assert [worker_gpu(r, 2, None) for r in range(3)] == ["0", "1", "0"]
    assert worker_gpu(1, 1, "7,bad") == "7"  # CUDA stops at an invalid entry: one usable GPU


def test_worker_threads_respect_affinity_and_omp_num_threads(monkeypatch):
    """CPU affinity stands in for a cgroup-limited container (os.sched_getaffinity patched: a mock)."""
    from ecomcap.inference import batch

    monkeypatch.setattr(batch.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(batch.os, "cpu_count", lambda: 64)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    quota = batch.available_cpus()
    assert quota <= 4
    assert batch.worker_threads(2) == max(1, quota // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert batch.worker_threads(1) == 1


def test_parent_returns_when_every_worker_dies_with_many_chunks_left(small_data, tmp_path):
    """Workers that die at load (an unloadable model dir) with thousands of chunks to hand out:
    the parent reports the failure and exits instead of hanging (run in a subprocess, with a timeout)."""
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    code = (
        "import sys; from pathlib import Path; from tqdm import tqdm\n"
        "from ecomcap.config import GenerateConfig, ModelConfig\n"
        "from ecomcap.errors import EcomcapError\n"
        "from ecomcap.inference.batch import _run_processes\n"
        "from ecomcap.inference.chunks import Chunk, PartStore\n"
        "todo = [Chunk(i, 'x.parquet', 0, 1) for i in range(20000)]\n"
        "cfg = GenerateConfig.model_validate({'chunks': {'workers': 2}})\n"
        "try:\n"
        "    _run_processes(sys.argv[1], ModelConfig(name_or_path=sys.argv[1]), Path(sys.argv[2]), cfg, todo,\n"
        "                   PartStore(sys.argv[3]), tqdm(disable=True))\n"
        "except EcomcapError as exc:\n"
        "    print('FAILED AS EXPECTED', exc)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(broken), str(small_data["test"]), str(tmp_path / "p")],
                         capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parents[1])
    assert res.returncode == 0 and "FAILED AS EXPECTED" in res.stdout, res.stderr[-2000:]
    assert "workers failed" in res.stdout


def test_fan_out_without_a_shared_parts_dir_is_refused():
    from pydantic import ValidationError

    from ecomcap.config import RunConfig

    with pytest.raises(ValidationError, match="fan_out 3 needs parts_dir"):
        RunConfig.model_validate({"generate": {"chunks": {"fan_out": 3}}})
    ok = RunConfig.model_validate({"generate": {"chunks": {"fan_out": 3, "parts_dir": "/data/parts"}}})
    assert ok.generate.chunks.parts_dir == Path("/data/parts")


def test_pipeline_generate_leaves_no_parts_behind(tiny_model_cfg, small_data, tmp_path):
    """The promote re-evaluation and every training run caption through generate_stage into the
    persistent parts root: a finished run removes its parts (a killed one keeps them to resume)."""
    from ecomcap.config import RunConfig
    from ecomcap.workflow import generate_stage, parts_root

    cfg = RunConfig.model_validate({"model": tiny_model_cfg.model_dump(mode="json"),
                                    "data": {"work_dir": str(tmp_path / "run" / "data")},
                                    "generate": _gen().model_dump(mode="json")})
    with pytest.raises(InterruptedError):
        caption_dataset(tiny_model_cfg.name_or_path, cfg.model, small_data["test"], tmp_path / "x.jsonl",
                        cfg.generate, parts_root(cfg), stop_after_chunks=1, cleanup=True)
    assert len(list(parts_root(cfg).glob("*/part-*.jsonl"))) == 1  # a killed run keeps its parts
    preds = generate_stage(Path(tiny_model_cfg.name_or_path), small_data["test"], cfg, log=False)
    assert sorted(preds) == sorted(_raw_ids(small_data))
    assert list(parts_root(cfg).iterdir()) == []


def _spawned_children(pid: int) -> list[int]:
    """Worker processes (multiprocessing spawn_main) whose parent is `pid`, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    """Exists and is not a zombie (an exited process nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux")
def test_workers_die_with_a_sigkilled_parent(tiny_model_cfg, small_data, tmp_path):
    """SIGKILL to the process that started the workers (no cleanup runs): the workers go too."""
    code = (
        "import sys; from ecomcap.config import GenerateConfig, ModelConfig\n"
        "from ecomcap.inference.batch import caption_dataset\n"
        "cfg = GenerateConfig.model_validate({'num_beams': 4, 'max_new_tokens': 40, 'batch_size': 1,\n"
        "                                     'chunks': {'workers': 2, 'chunk_size': 1}})\n"
        "caption_dataset(sys.argv[1], ModelConfig.model_validate_json(sys.argv[2]), sys.argv[3], sys.argv[4], cfg)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, tiny_model_cfg.name_or_path, tiny_model_cfg.model_dump_json(),
                             str(small_data["train"]), str(tmp_path / "o.jsonl")], env=env,
                            cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while len(workers) < 2 and time.time() < deadline:
        time.sleep(0.1)
        workers = _spawned_children(proc.pid)
    assert len(workers) == 2
    time.sleep(2)  # workers are loading or captioning (on an idle box the job ends within 8 s)
    assert all(Path(f"/proc/{w}").exists() for w in workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(_running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if _running(w)]
    for w in alive:  # before the fix: clean up what the test started
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their SIGKILLed parent"


def test_a_chunk_is_decoded_one_batch_at_a_time(tiny_model_cfg, small_data, tmp_path, monkeypatch):
    """Decoded RGB images of a whole chunk (2,048 photos: GBs) must not sit in memory at once:
    at the first batch's generation at most one batch of images has been opened (PIL's
    `Image.open` and the batch call are wrapped by spies that count, then call the real ones)."""
    from PIL import Image

    from ecomcap.inference import generate as gen_mod

    events, real_open, real_batch = [], Image.open, gen_mod.caption_batch

    def open_spy(*a, **kw):
        events.append("open")
        return real_open(*a, **kw)

    def batch_spy(model, builder, images, cfg):
        events.append(("batch", len(images)))
        return real_batch(model, builder, images, cfg)

    monkeypatch.setattr(Image, "open", open_spy)
    monkeypatch.setattr(gen_mod, "caption_batch", batch_spy)
    cfg = GEN.model_copy(update={"batch_size": 2, "max_new_tokens": 2,
                                 "chunks": GEN.chunks.model_copy(update={"chunk_size": 8})})
    preds = caption_dataset(tiny_model_cfg.name_or_path, tiny_model_cfg, small_data["test"], tmp_path / "o.jsonl", cfg)
    first = next(i for i, e in enumerate(events) if isinstance(e, tuple))
    assert events[:first].count("open") <= 2
    assert sum(e[1] for e in events if isinstance(e, tuple)) == len(preds) - len(quarantined_ids(small_data["test"]))
