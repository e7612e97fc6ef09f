"""The training steps' work: each stage runs in processes of its own (`ecomcap.launch`).

`sft_stage`/`scst_stage`/`dpo_stage` run in the step's process: they log the configs, launch
`launch.num_processes` training processes on `<stage>_process`, and log what rank 0
returned. Everything the processes need travels as JSON (paths, the run config), so the same
code runs one process on a laptop and N ranks in a Kubernetes GPU pod.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ecomcap.config import RunConfig
from ecomcap.errors import EcomcapError
from ecomcap.launch import all_ranks, launch
from ecomcap.nodes import Node, world_nodes
from ecomcap.paths import require_durable_paths
from ecomcap.registry import tracking


def launch_stage(stage: str, cfg: RunConfig, node: Node | None = None, **kwargs: Any) -> dict[str, Any] | None:
    """Run `<stage>_process` in `cfg.launch.num_processes` processes (on each pod of a multi-node
    job: `node`); rank 0's summary (None on a pod other than pod 0)."""
    from ecomcap.modeling.prepare import ensure_model

    require_durable_paths(cfg)
    check_strategy_fits_launch(cfg, stage)
    if "train" in kwargs and (node is None or node.rank == 0):
        # the tiny model is built here once, not raced for by N ranks; the other pods' ranks start
        # only once pod 0's launcher has joined the rendezvous, after this
        ensure_model(cfg.model, kwargs["train"])
    args = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    return launch(f"{__name__}:{stage}_process", {**args, "config": cfg.model_dump(mode="json")},
                  cfg.launch, name=stage, node=node)


def zero_stage_of(config_file: str | None) -> int:
    """The ZeRO stage an accelerate config file asks for (0: none, or not DeepSpeed)."""
    if not config_file:
        return 0
    from ecomcap.config import load_yaml

    data = load_yaml(config_file)
    if str(data.get("distributed_type", "")).upper() != "DEEPSPEED":
        return 0
    return int((data.get("deepspeed_config") or {}).get("zero_stage", 0))


def check_strategy_fits_launch(cfg: RunConfig, stage: str) -> None:
    """QLoRA's 4-bit weights cannot be partitioned by ZeRO-3 (they are packed bytes, and they are
    placed on a GPU at load time): refuse before N processes load a model."""
    strategy = cfg.finetune.strategy if stage == "sft" else getattr(cfg, stage).finetune.strategy
    quantized = strategy == "qlora" or (stage != "sft" and cfg.finetune.strategy == "qlora")
    if quantized and zero_stage_of(cfg.launch.config_file) == 3:
        raise EcomcapError(f"{stage}: QLoRA (4-bit base) cannot train under DeepSpeed ZeRO-3 "
                           f"({cfg.launch.config_file}): use ZeRO-2 or DDP (no config_file), or LoRA on a "
                           "16-bit base with ZeRO-3")


def sft_stage(train: Path, valid: Path, cfg: RunConfig, run_name: str) -> Path:
    tracking.log_config("model", cfg.model)
    tracking.log_config("finetune", cfg.finetune)
    tracking.log_config("sft", cfg.sft)
    tracking.log_config("launch", cfg.launch)
    return finish_sft(launch_stage("sft", cfg, train=train, valid=valid, run_name=run_name))


def finish_sft(res: dict[str, Any]) -> Path:
    """Rank 0's account of SFT -> checked, logged, the model to hand on (one pod or several)."""
    _check_ranks("sft", res)
    tracking.log_metrics({k: res[k] for k in ("trainable_params", "total_params", "wall_s")}, prefix="sft.")
    return Path(res["model_dir"])


def scst_stage(sft_model: Path, train: Path, valid: Path, cfg: RunConfig, run_name: str,
               grounding: Path | None = None) -> Path:
    """SCST on top of SFT, or the SFT model unchanged when `scst.enabled` is false; `grounding`:
    the grounding stage's output (its scorer serves the CLIP-S / distinctiveness reward terms)."""
    if not cfg.scst.enabled or cfg.scst.max_steps == 0:
        return sft_model
    return _tuning_stage("scst", {"sft_model": sft_model}, train, valid, cfg, run_name, grounding)


def dpo_stage(model: Path, train: Path, valid: Path, cfg: RunConfig, run_name: str,
              grounding: Path | None = None) -> Path:
    """DPO on top of the model SCST handed on (the SFT model when SCST is off), or that model
    unchanged when `dpo.enabled` is false."""
    if not cfg.dpo.enabled or cfg.dpo.max_steps == 0:
        return model
    return _tuning_stage("dpo", {"start_model": model}, train, valid, cfg, run_name, grounding)


def _tuning_stage(stage: str, start: dict[str, Path], train: Path, valid: Path, cfg: RunConfig, run_name: str,
                  grounding: Path | None) -> Path:
    """A stage that tunes a finished model with a reward (SCST, DPO): its processes, then one
    standalone merged model to hand on."""
    stage_cfg = getattr(cfg, stage)
    tracking.log_config(stage, stage_cfg)
    tracking.log_config("launch", cfg.launch)
    scorer = reward_scorer(stage, cfg, grounding)
    res = launch_stage(stage, cfg, **start, train=train, valid=valid, run_name=run_name,
                       scorer_dir=str(scorer) if scorer else None)
    return finish_tuning(stage, cfg, res, grounding)


def reward_scorer(stage: str, cfg: RunConfig, grounding: Path | None) -> Path | None:
    """The grounding scorer a stage's reward terms need (tagged on the run), or None."""
    needs = getattr(cfg, stage).reward.needs_scorer
    scorer = Path(grounding) / "scorer" if grounding is not None and needs else None
    if needs and (scorer is None or not scorer.is_dir()):
        raise EcomcapError(f"{stage}.reward.clip / distinct need the grounding stage's scorer: set grounding.enabled")
    if scorer is not None:
        from ecomcap.grounding.scorer import weights_fingerprint

        tracking.set_tags({"grounding.scorer": weights_fingerprint(scorer)})
    return scorer


def finish_tuning(stage: str, cfg: RunConfig, res: dict[str, Any], grounding: Path | None) -> Path:
    """Rank 0's account of SCST/DPO -> checked, logged, merged into one standalone model."""
    from ecomcap.registry.pyfunc import export_merged

    _check_ranks(stage, res)
    tracking.log_metrics({"wall_s": res["wall_s"]}, prefix=f"{stage}.")
    model_dir = Path(res["model_dir"])
    # the adapter's base is the previous stage's local path, which a remote artifact store (another
    # pod) does not have: hand on a standalone, merged model instead (one process, after training)
    from ecomcap.inference.rerank import with_grounding_scorer

    merged = export_merged(model_dir, Path(res["output_dir"]) / "merged", cfg.model,
                           with_grounding_scorer(cfg.generate, grounding))
    if (model_dir / "metrics.jsonl").is_file():
        shutil.copy(model_dir / "metrics.jsonl", merged / "metrics.jsonl")
    return merged


def _summary(res, output_dir: Path) -> dict[str, Any]:
    """Rank 0's account of the stage, with every rank's weights and data-order digests."""
    return {"model_dir": str(res.model_dir), "output_dir": str(output_dir), "steps": res.steps,
            "wall_s": res.wall_s, "trainable_params": res.params.trainable, "total_params": res.params.total,
            "resumed_from": res.resumed_from, "nodes": world_nodes(),
            "ranks": all_ranks({"weights": res.param_digest, "data_order": res.order_digest})}


def _check_ranks(stage: str, res: dict[str, Any]) -> None:
    """Every rank must end with the same weights, having walked the same data order: a rank that
    drifted (a missed all-reduce, another seed) would otherwise go unnoticed until evaluation."""
    ranks = res["ranks"]
    for key in ("weights", "data_order"):
        if len({r[key] for r in ranks}) > 1:
            raise EcomcapError(f"{stage}: the {len(ranks)} training processes disagree on {key}: "
                               f"{[r[key] for r in ranks]}")
    tracking.log_metrics({"world_size": len(ranks), "nodes": res.get("nodes", 1)}, prefix=f"{stage}.")
    tracking.set_tags({f"{stage}.weights_digest": ranks[0]["weights"], f"{stage}.data_order_digest":
                       ranks[0]["data_order"]})


def sft_process(train: str, valid: str, config: dict, run_name: str) -> dict[str, Any]:
    """One training process of the SFT stage (every rank runs it; rank 0's return is kept)."""
    from ecomcap.training.sft import run_sft

    cfg = RunConfig.model_validate(config)
    sft = cfg.sft.model_copy(update={"output_dir": Path(cfg.sft.output_dir) / run_name})
    from ecomcap.data.prepare import brand_lexicon

    res = run_sft(train, valid, cfg.model, cfg.finetune, sft, cfg.generate, tracking.metrics_callback(),
                  dev_images=cfg.data.dev_images, brands=brand_lexicon(cfg.data))
    return _summary(res, Path(sft.output_dir))


def scst_process(sft_model: str, train: str, valid: str, config: dict, run_name: str,
                 scorer_dir: str | None = None) -> dict[str, Any]:
    """One training process of the SCST stage."""
    from ecomcap.training.scst import run_scst

    cfg = RunConfig.model_validate(config)
    scst = cfg.scst.model_copy(update={"output_dir": Path(cfg.scst.output_dir) / run_name})
    res = run_scst(sft_model, train, valid, cfg.model, scst, cfg.generate, tracking.metrics_callback(),
                   dev_images=cfg.data.dev_images, scorer_dir=scorer_dir, grounding=cfg.grounding)
    return _summary(res, Path(scst.output_dir))


def dpo_process(start_model: str, train: str, valid: str, config: dict, run_name: str,
                scorer_dir: str | None = None) -> dict[str, Any]:
    """One training process of the DPO stage."""
    from ecomcap.training.dpo import run_dpo

    cfg = RunConfig.model_validate(config)
    dpo = cfg.dpo.model_copy(update={"output_dir": Path(cfg.dpo.output_dir) / run_name})
    res = run_dpo(start_model, train, valid, cfg.model, dpo, cfg.generate, tracking.metrics_callback(),
                  dev_images=cfg.data.dev_images, scorer_dir=scorer_dir, grounding=cfg.grounding,
                  attributes=training_attributes(cfg))
    return _summary(res, Path(dpo.output_dir))


def training_attributes(cfg: RunConfig) -> dict[str, dict] | None:
    """Ground-truth attributes of the training images, where the data has them (the synthetic set)."""
    from ecomcap.metrics.attributes import synthetic_attributes

    return synthetic_attributes(cfg.data.work_dir, cfg.data.source, "train")


def prepared_inputs(stage: str, cfg: RunConfig, start: Path | None = None,
                    grounding: Path | None = None) -> dict[str, Any]:
    """`ecomcap train` by hand: the stage's data (prepared here on one node; on several, prepared
    once beforehand: the pods would race to rewrite the shared shards), the model it starts from
    (default: the finished SFT run of this config) and the grounding scorer its reward may use."""
    from ecomcap.data.prepare import prepare_data

    if "valid" not in cfg.data.splits:
        cfg.data.splits.append("valid")
    work = Path(cfg.data.work_dir)
    if cfg.launch.nodes == 1:
        prepare_data(cfg.data)
    elif not all((work / s / "report.json").is_file() for s in ("train", "valid")):
        raise EcomcapError(f"launch.nodes is {cfg.launch.nodes}: the pods do not ingest (they would race on the shared "
                           f"volume); run `ecomcap prepare --config ...` once first (no ingested train/valid in {work})")
    inputs: dict[str, Any] = {"train": work / "train", "valid": work / "valid", "run_name": ""}
    if stage == "sft":
        return inputs
    from ecomcap.training.sft import sft_output

    start = start or sft_output(work / "train", cfg.model, cfg.finetune, cfg.sft, cfg.data.dev_images)
    if start is None:
        raise EcomcapError(f"no finished SFT run of this config (model, finetune, sft, data) under "
                           f"{cfg.sft.output_dir}: run --stage sft first or pass --from")
    inputs["sft_model" if stage == "scst" else "start_model"] = str(start)
    inputs["scorer_dir"] = _grounding_scorer(grounding) if grounding else None
    return inputs


def _grounding_scorer(grounding: Path) -> str:
    """The scorer of a grounding step's output (its `scorer/` folder), for reward terms that need it."""
    scorer = Path(grounding) / "scorer"
    if not (scorer / "grounding.json").is_file():
        raise EcomcapError(f"--grounding {grounding}: no scorer/grounding.json there (give the grounding step's "
                           "output folder, which holds scorer/ and evaluator/)")
    return str(scorer)
