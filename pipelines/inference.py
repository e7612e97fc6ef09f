"""ingest(test) -> generate with the registry's `champion` -> caption_gen.jsonl.

    zenml pipeline run pipelines.inference.batch_inference_pipeline -c configs/local.yaml

`generate.chunks.fan_out: N` (N > 1) runs N `generate_<i>` steps in parallel (one GPU pod each
on Kubernetes), each captioning every N-th chunk into the shared `generate.chunks.parts_dir`,
then `merge_generated` writes caption_gen.jsonl with every id once (docs/kubernetes.md).
`generate.chunks.pods: N` runs one `generate_pods` command step on N pods instead (ZenML's
Kubernetes step operator, `pod_count` N), the same merge after it.

The champion captions with the prompt, decoding, pixel bounds and dtype its version records, as
`mlflow models serve` does (the config gives batch size, chunking and device).
"""
from __future__ import annotations

from zenml import pipeline
from zenml.config import CachePolicy

from ecomcap.command_steps import new_token
from ecomcap.config import RunConfig
from ecomcap.config_check import pipeline_input
from ecomcap.workflow import library_fingerprint, source_fingerprint
from steps import (
    champion_model,
    generate,
    generate_share,
    ingest_split_step,
    merge_generated,
    write_predictions,
)
from steps.nodes import generate_inputs, on_nodes

# `zenml pipeline run -c`: the YAML's parameters.config checked with one-line errors
CheckedConfig = pipeline_input(RunConfig)


@pipeline(enable_cache=True, cache_policy=CachePolicy(cache_func=library_fingerprint))
def batch_inference_pipeline(config: CheckedConfig = RunConfig(), output: str = ".run/caption_gen.jsonl") -> None:  # noqa: B008
    test = ingest_split_step(data=config.data, split="test", source_fingerprint=source_fingerprint(config.data))
    model = champion_model(config=config)
    fan_out, pods = config.generate.chunks.fan_out, config.generate.chunks.pods
    if pods > 1:  # one command step on `pods` pods, pod i captioning chunks i, i+pods, ...
        token = new_token()  # this run's handoff file (drawn at compile time: one per run)
        generate_inputs(config=config, token=token, model=model, data=test, id="generate_inputs")
        predictions = merge_generated(config=config, model=model, data=test, token=token,
                                      after=on_nodes("generate", config, pods, "generate_inputs", token))
    elif fan_out <= 1:
        predictions = generate(config=config, model=model, data=test, registered=True)  # as it is served
    else:
        shares = [f"generate_{i}" for i in range(fan_out)]
        for i, share in enumerate(shares):
            generate_share(config=config, model=model, data=test, index=i, id=share)
        predictions = merge_generated(config=config, model=model, data=test, after=shares)
    write_predictions(config=config, predictions=predictions, output=output)
