"""Batch inference at catalogue scale: chunks, worker processes, resume, one merged output.

    caption_dataset(...)   plan chunks -> caption the missing ones (in this process, or in
                           `chunks.workers` processes sharing the chunk list) -> merge -> caption_gen.jsonl
    caption_share(...)     one step/pod of a fan-out: chunks i, i+n, ... of the plan, no merge
    merge_dataset(...)     after a fan-out: every part -> caption_gen.jsonl

Every finished chunk is an atomically written part (`ecomcap.inference.chunks`), so a killed
run resumes where it stopped and several machines can share one parts directory. Worker
processes each load the model once and die with their parent; on a GPU node worker r sees the
r-th GPU the parent may use, on CPU the usable cores are split between the workers. Progress
(images/s, ETA) covers all workers. The prompt is the one the model directory records, else the
config's (`ecomcap.inference.prompt`), and the parts are keyed by it.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ecomcap.config import GenerateConfig, ModelConfig
from ecomcap.errors import EcomcapError
from ecomcap.inference.chunks import Chunk, PartStore, plan_chunks, read_chunk, run_key
from ecomcap.inference.generate import LazyImages, caption_images
from ecomcap.inference.prompt import with_model_prompt
from ecomcap.inference.rerank import scorer_fingerprint, with_scorer
from ecomcap.processes import available_cpus, die_with_parent, worker_threads  # noqa: F401  (re-exported)
from ecomcap.training.collate import PromptBuilder

log = logging.getLogger(__name__)


def _plan(model_ref: str, model_cfg: ModelConfig, dataset_dir: Path, cfg: GenerateConfig,
          parts_root: Path) -> tuple[list[Chunk], PartStore, ModelConfig]:
    """(chunks, the part store, `model_cfg` with the prompt the model learnt): parts are keyed by
    the prompt they are captioned with, so another one never reuses them."""
    model_cfg = with_model_prompt(model_ref, model_cfg)
    chunks = plan_chunks(dataset_dir, cfg.chunks.chunk_size)
    decoding = {"generate": cfg.model_dump(mode="json", exclude={"chunks": True, "rerank": {"scorer_dir"}}),
                "scorer": scorer_fingerprint(cfg.rerank.scorer_dir) if cfg.rerank.candidates else None,
                "model": model_cfg.model_dump(mode="json", exclude={"name_or_path", "prompt", "tiny"})}
    key = run_key(dataset_dir, str(model_ref), model_cfg.prompt, decoding, cfg.chunks.chunk_size)
    return chunks, PartStore(Path(parts_root) / key), model_cfg


def caption_chunks(model, processor, prompt: str, dataset_dir: Path, chunks: list[Chunk], store: PartStore,
                   cfg: GenerateConfig, on_batch: Callable[[int], None] | None = None,
                   stop_after_chunks: int | None = None) -> int:
    """Caption and write every chunk that has no part yet; returns how many were written.

    `stop_after_chunks` stops as if killed after that many parts (resume tests)."""
    builder, written = PromptBuilder(processor, prompt), 0
    for c in chunks:
        if store.done(c):
            continue
        if stop_after_chunks is not None and written >= stop_after_chunks:
            raise InterruptedError(f"stopped after {written} chunks (stop_after_chunks)")
        table = read_chunk(dataset_dir, c, ["image_id", "image", "width", "height"])
        images = LazyImages(table.column("image").to_pylist())  # decoded batch by batch
        sizes = list(zip(table.column("width").to_pylist(), table.column("height").to_pylist()))
        caps = caption_images(model, builder, images, cfg, progress=False, on_batch=on_batch, sizes=sizes)
        store.write(c, zip(table.column("image_id").to_pylist(), caps))
        written += 1
    return written


def _load(model_ref: str, model_cfg: ModelConfig):
    from ecomcap.modeling.load import load_trained

    return load_trained(model_ref, model_cfg)


def worker_gpu(rank: int, gpus: int, inherited: str | None) -> str:
    """The one GPU worker `rank` sees: round-robin over the GPUs the parent may use (its
    CUDA_VISIBLE_DEVICES, indices or UUIDs, as a scheduler or the user set it), else 0..gpus-1."""
    visible = [d.strip() for d in (inherited or "").split(",") if d.strip()][:gpus] or \
        [str(i) for i in range(gpus)]
    return visible[rank % len(visible)]


def _worker_main(rank: int, workers: int, model_ref: str, model_cfg_json: str, dataset_dir: str,
                 cfg_json: str, parts_dir: str, todo: list[int], taken, counter, gpus: int, parent: int) -> None:
    """One worker process: load the model once, then take the next chunk of `todo` (the shared
    `taken` counter says how many are handed out) until none is left."""
    die_with_parent(parent)
    if gpus:  # before CUDA is first touched
        os.environ["CUDA_VISIBLE_DEVICES"] = worker_gpu(rank, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    else:
        torch.set_num_threads(worker_threads(workers))
    cfg = GenerateConfig.model_validate_json(cfg_json)  # model_cfg: already with the model's prompt
    chunks, _, model_cfg = _plan(model_ref, ModelConfig.model_validate_json(model_cfg_json), Path(dataset_dir),
                                 cfg, Path(parts_dir))
    store = PartStore(parts_dir)
    model, processor = _load(model_ref, model_cfg)

    def bump(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    while True:
        with taken.get_lock():
            j = taken.value
            taken.value += 1
        if j >= len(todo):
            return
        caption_chunks(model, processor, model_cfg.prompt, Path(dataset_dir), [chunks[todo[j]]], store, cfg, bump)


def _run_processes(model_ref: str, model_cfg: ModelConfig, dataset_dir: Path, cfg: GenerateConfig,
                   todo: list[Chunk], store: PartStore, bar: tqdm) -> None:
    workers = min(cfg.chunks.workers, len(todo))
    ctx = mp.get_context("spawn")  # fresh interpreters: safe with CUDA and threads
    # a shared counter over the todo list, not a queue: a queue's feeder thread blocks the
    # parent's exit on a full pipe when every worker died before reading it
    taken, counter = ctx.Value("q", 0), ctx.Value("q", 0)
    gpus = torch.cuda.device_count() if model_cfg.device != "cpu" else 0
    args = (workers, str(model_ref), model_cfg.model_dump_json(), str(dataset_dir), cfg.model_dump_json(),
            str(store.dir), [c.index for c in todo], taken, counter, gpus, os.getpid())
    procs = [ctx.Process(target=_worker_main, args=(r, *args), daemon=True) for r in range(workers)]
    for p in procs:
        p.start()
    try:
        seen = 0
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            now = counter.value
            bar.update(now - seen)
            seen = now
        bar.update(counter.value - seen)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise EcomcapError(f"generate workers failed (rank, exit code): {failed}; finished chunks are kept, "
                           "rerun to resume")


def _caption_missing(model_ref: str, model_cfg: ModelConfig, dataset_dir: Path, cfg: GenerateConfig,
                     chunks: list[Chunk], store: PartStore, loaded=None,
                     stop_after_chunks: int | None = None) -> None:
    todo = [c for c in chunks if not store.done(c)]
    total = sum(len(c) for c in chunks)
    left = sum(len(c) for c in todo)
    log.info("%d images in %d chunks; %d chunks (%d images) to caption, %d already done in %s",
             total, len(chunks), len(todo), left, len(chunks) - len(todo), store.dir)
    if not todo:
        return
    t0 = time.perf_counter()
    with tqdm(total=left, desc="generate", unit="img", smoothing=0.1) as bar:
        if cfg.chunks.workers > 1 and len(todo) > 1 and stop_after_chunks is None:
            _run_processes(model_ref, model_cfg, dataset_dir, cfg, todo, store, bar)
        else:
            model, processor = loaded or _load(model_ref, model_cfg)
            caption_chunks(model, processor, model_cfg.prompt, dataset_dir, todo, store, cfg, bar.update,
                           stop_after_chunks)
    dt = time.perf_counter() - t0
    log.info("captioned %d images in %.1f s (%.2f images/s)", left, dt, left / max(dt, 1e-9))


def caption_dataset(model_ref: str | Path, model_cfg: ModelConfig, dataset_dir: str | Path,
                    out_path: str | Path, cfg: GenerateConfig, parts_root: str | Path | None = None,
                    loaded=None, stop_after_chunks: int | None = None, cleanup: bool = False) -> dict[str, str]:
    """Caption every image of an ingested dataset (resuming finished chunks) -> `caption_gen.jsonl`.

    Ids the ingest quarantined are written with an empty caption, so the file has every input
    id exactly once. `loaded`: an already loaded (model, processor) for in-process work.
    `cleanup`: remove this run's parts once the merged file is written (pipelines, whose
    parts root persists across runs and models; the CLI keeps them, a rerun is then instant).
    """
    dataset_dir = Path(dataset_dir)
    parts_root = Path(parts_root or cfg.chunks.parts_dir or f"{out_path}.parts")
    cfg = with_scorer(cfg, model_ref if Path(model_ref).is_dir() else None)  # a shipped reranker scorer
    chunks, store, model_cfg = _plan(str(model_ref), model_cfg, dataset_dir, cfg, parts_root)
    _caption_missing(str(model_ref), model_cfg, dataset_dir, cfg, chunks, store, loaded, stop_after_chunks)
    return merge_parts(dataset_dir, chunks, store, out_path, cleanup)


def caption_share(model_ref: str | Path, model_cfg: ModelConfig, dataset_dir: str | Path,
                  cfg: GenerateConfig, index: int, count: int, parts_root: str | Path) -> int:
    """Share `index` of `count` (a fan-out step or pod): its chunks only, no merge; returns images."""
    if not 0 <= index < count:
        raise EcomcapError(f"share index {index} outside 0..{count - 1}")
    dataset_dir = Path(dataset_dir)
    cfg = with_scorer(cfg, model_ref if Path(model_ref).is_dir() else None)  # a shipped reranker scorer
    chunks, store, model_cfg = _plan(str(model_ref), model_cfg, dataset_dir, cfg, Path(parts_root))
    mine = [c for c in chunks if c.index % count == index]
    _caption_missing(str(model_ref), model_cfg, dataset_dir, cfg, mine, store)
    return sum(len(c) for c in mine)


def merge_dataset(model_ref: str | Path, model_cfg: ModelConfig, dataset_dir: str | Path,
                  out_path: str | Path, cfg: GenerateConfig, parts_root: str | Path,
                  cleanup: bool = False) -> dict[str, str]:
    """Merge the parts of every chunk (after a fan-out) -> `caption_gen.jsonl`."""
    dataset_dir = Path(dataset_dir)
    cfg = with_scorer(cfg, model_ref if Path(model_ref).is_dir() else None)  # the key the shares used
    chunks, store, _ = _plan(str(model_ref), model_cfg, dataset_dir, cfg, Path(parts_root))
    return merge_parts(dataset_dir, chunks, store, out_path, cleanup)


def merge_parts(dataset_dir: Path, chunks: list[Chunk], store: PartStore, out_path,
                cleanup: bool = False) -> dict[str, str]:
    """Parts + the quarantined ids (empty captions) -> `caption_gen.jsonl`, every id once."""
    from ecomcap.data.shards import read_report

    rows_ok, planned = read_report(dataset_dir)["rows_ok"], sum(len(c) for c in chunks)
    if planned != rows_ok:  # count in and out: a bad plan must not write a short file
        raise EcomcapError(f"{dataset_dir}: the chunk plan covers {planned} images but the dataset holds "
                           f"{rows_ok}; nothing written")
    quarantined = quarantined_ids(dataset_dir)
    preds = store.merge(chunks, out_path, quarantined)
    log.info("%d ids written: %d captioned + %d quarantined (empty captions)", len(preds), rows_ok,
             len(preds) - rows_ok)
    if cleanup:
        shutil.rmtree(store.dir, ignore_errors=True)
    if quarantined:
        log.warning("%d quarantined ids written with empty captions", len(quarantined))
    return preds


def quarantined_ids(dataset_dir: Path) -> list[str]:
    """Ids the ingest quarantined (not duplicates: their id is captioned once already)."""
    import pyarrow.parquet as pq

    q = Path(dataset_dir) / "quarantine.parquet"
    if not q.is_file():
        return []
    rows = pq.read_table(q, columns=["image_id", "reason"]).to_pylist()
    return list(dict.fromkeys(r["image_id"] for r in rows if r["image_id"] and r["reason"] != "duplicate_id"))


def generate_for_dataset(
    model, processor, prompt: str, dataset_dir: str | Path, out_path: str | Path, cfg: GenerateConfig,
) -> dict[str, str]:
    """Caption every image of an ingested dataset with a loaded model -> `caption_gen.jsonl`.

    In this process, chunk by chunk (parts in a temporary directory); quarantined ids get an
    empty caption. `prompt`: the one the model learnt (`ecomcap.inference.prompt.prompt_for` for a
    directory). Resumable, multi-process runs: `caption_dataset`.
    """
    import tempfile

    dataset_dir = Path(dataset_dir)
    chunks = plan_chunks(dataset_dir, cfg.chunks.chunk_size)
    with tempfile.TemporaryDirectory(prefix="caption-parts-") as tmp:
        store = PartStore(tmp)
        with tqdm(total=sum(len(c) for c in chunks), desc="generate", unit="img") as bar:
            caption_chunks(model, processor, prompt, dataset_dir, chunks, store, cfg, bar.update)
        return merge_parts(dataset_dir, chunks, store, out_path)
