"""ingest -> validate -> sft -> scst -> [dpo] -> generate -> evaluate -> promote; with `grounding.enabled`
a `grounding` step (scorer + independent evaluator encoders, from the train split) feeds the SCST
reward and the evaluation. With `launch.nodes` > 1 each training stage is `<stage>_inputs` -> `<stage>_nodes`
(a command step on that many pods) -> `<stage>` (the same outputs as the one-pod step).

    zenml pipeline run pipelines.training.training_pipeline -c configs/local.yaml
"""
from __future__ import annotations

from zenml import Model, pipeline
from zenml.config import CachePolicy

from ecomcap.command_steps import new_token
from ecomcap.config import RunConfig
from ecomcap.config_check import pipeline_input
from ecomcap.errors import EcomcapError
from ecomcap.workflow import library_fingerprint, source_fingerprint
from steps import dpo, evaluate, generate, grounding, ingest, promote, scst, sft, validate
from steps.nodes import dpo_from_nodes, on_nodes, scst_from_nodes, sft_from_nodes, stage_inputs

# `zenml pipeline run -c`: the YAML's parameters.config checked with one-line errors
CheckedConfig = pipeline_input(RunConfig)


def check_rerank_scorer(config: RunConfig) -> None:
    """Reranking needs a scorer: refused when the pipeline is compiled, not after training."""
    if config.generate.rerank.candidates and not config.grounding.enabled and not config.generate.rerank.scorer_dir:
        raise EcomcapError("generate.rerank.candidates is set but there is no grounding scorer: set "
                           "grounding.enabled: true (or generate.rerank.scorer_dir), or rerank.candidates: 0")


def _on_nodes(config: RunConfig, train, valid, scorers):
    """sft_inputs -> sft_nodes (N pods) -> sft, and the same for scst and dpo when on: the regular
    steps keep the names and outputs of the one-pod pipeline."""
    token = new_token()  # this run's handoff files (drawn at compile time: one per run)
    stage_inputs(config=config, stage="sft", token=token, train=train, valid=valid, id="sft_inputs", after="validate")
    sft_model = sft_from_nodes(config=config, token=token, train=train, valid=valid, id="sft",
                               after=on_nodes("sft", config, config.launch.nodes, "sft_inputs", token))
    model = scst_model = sft_model
    for stage, enabled in (("scst", config.scst.enabled and config.scst.max_steps > 0),
                           ("dpo", config.dpo.enabled and config.dpo.max_steps > 0)):
        if enabled:
            stage_inputs(config=config, stage=stage, token=token, train=train, valid=valid, model=model,
                         grounding=scorers, id=f"{stage}_inputs")
            adopt = scst_from_nodes if stage == "scst" else dpo_from_nodes
            model = adopt(config=config, token=token, train=train, valid=valid, grounding=scorers, id=stage,
                          after=on_nodes(stage, config, config.launch.nodes, f"{stage}_inputs", token))
            scst_model = model if stage == "scst" else scst_model
    return sft_model, scst_model, model


MODEL = Model(name="ecomcap-captioner", description="Chinese e-commerce product captioner (Qwen2.5-VL)")


@pipeline(model=MODEL, enable_cache=True, cache_policy=CachePolicy(cache_func=library_fingerprint))
def training_pipeline(config: CheckedConfig = RunConfig()) -> None:  # noqa: B008  (a value, not a call per run)
    check_rerank_scorer(config)
    train, valid = ingest(data=config.data, source_fingerprint=source_fingerprint(config.data))
    report = validate(config=config, train=train, valid=valid)
    # decided when the pipeline is compiled, from the run's config: no step at all when off
    scorers = grounding(config=config.grounding, data=config.data, train=train, valid=valid, after="validate") \
        if config.grounding.enabled else None
    if config.launch.nodes > 1:  # each stage a command step on launch.nodes pods (docs/kubernetes.md)
        sft_model, scst_model, model = _on_nodes(config, train, valid, scorers)
    else:
        sft_model = sft(config=config, train=train, valid=valid, after="validate")
        model = scst_model = scst(config=config, sft_model=sft_model, train=train, valid=valid, grounding=scorers)
        if config.dpo.enabled:  # preference tuning of what SCST handed on (the SFT model when SCST is off)
            model = dpo(config=config, model=scst_model, train=train, valid=valid, grounding=scorers)
    predictions = generate(config=config, model=model, data=valid, grounding=scorers)
    evaluation = evaluate(config=config, predictions=predictions, valid=valid, sft_model=sft_model, model=model,
                          grounding=scorers, scst_model=scst_model if config.dpo.enabled else None)
    promote(config=config, model=model, evaluation=evaluation, valid=valid, validation_report=report,
            grounding=scorers)
