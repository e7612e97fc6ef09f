"""Pydantic settings, one model per concern, shared by the CLI, the ZenML steps and the YAML configs.

Unknown keys are errors (a typo in a YAML file must not be silently ignored).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from ecomcap.config_base import LoopConfig, _Strict  # noqa: F401  (re-exported)
from ecomcap.config_data import (  # noqa: F401  (re-exported: one import place for every config)
    AugmentConfig,
    BrandBalanceConfig,
    CleanConfig,
    DataConfig,
    IngestConfig,
    SynthConfig,
)
from ecomcap.config_encoders import GroundingConfig, RerankConfig, RewardConfig
from ecomcap.errors import EcomcapError


class TinyModelConfig(_Strict):
    """A tiny random-init model of the real Qwen2.5-VL classes, built locally (no download)."""

    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 512
    vision_depth: int = 4
    vision_hidden: int = 128
    vision_heads: int = 4
    image_size: int = Field(112, description="fixed resolution: 112 px -> 16 merged image tokens")
    seed: int = 0


class ModelConfig(_Strict):
    """Which model: a hub id or a local directory, loaded through one path for real and tiny."""

    name_or_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    tiny: TinyModelConfig | None = Field(
        None, description="build a tiny model at name_or_path (from the training captions) if missing"
    )
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="auto: flash_attention_2 for the vision tower where flash-attn is installed "
        "(16-bit), sdpa for the text decoder; else sdpa")
    patch_embed: Literal["matmul", "conv"] = Field(
        "matmul", description="the vision tower's stride=kernel Conv3d patch embedding run as one matmul on every "
        "path (same weights, float-rounding differences), or the stock conv")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    min_pixels: int | None = Field(None, description="image resolution lower bound (pixels)")
    max_pixels: int | None = Field(None, description="image resolution upper bound (pixels)")
    max_seq_len: int | None = Field(
        None, ge=1, description="prompt + image + answer tokens allowed; default the model's limit")
    prompt: str = "请为这张电商商品图生成中文描述，突出品类、颜色、图案和品牌。"


class FinetuneConfig(_Strict):
    """What is trained: one strategy field plus its knobs."""

    strategy: Literal["lora", "qlora", "partial", "freeze_llm", "full"] = "lora"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_vision: bool = Field(False, description="also put LoRA on the vision tower")
    partial_layers: tuple[int, int] | Literal["upper_half", "lower_half"] | float = Field(
        "upper_half", description="layers trained by 'partial': [i, j] (inclusive, negative counts "
        "from the end), 'upper_half'/'lower_half', or a fraction in (0, 1]: that share of the top "
        "layers; checked against the loaded model")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    train_vision: bool = Field(False, description="freeze_llm: also train the vision tower")


class SFTConfig(LoopConfig):
    """Supervised fine-tuning on the references."""

    label_smoothing: float = Field(0.1, ge=0, lt=1)
    references: Literal["sample", "expand"] = Field(
        "sample", description="a random reference per image per epoch, or every reference"
    )
    max_answer_tokens: int = Field(64, ge=1)
    loss_chunk_tokens: int = Field(
        1024, ge=0, description="answer tokens whose vocabulary logits exist at once in the loss (recomputed in "
        "backward; Liger's fused kernel on CUDA where installed); 0: the whole batch's. Memory only")
    packing: bool = Field(
        False, description="padding-free: a micro-batch's rows as one sequence (per-example 3D rope positions, "
        "attention kept inside each example: block-diagonal on sdpa, varlen on flash-attention 2); same loss and "
        "gradients as padded, less work where image sizes differ. Speed only")
    prompt_cache_mb: int = Field(
        1024, ge=0, description="processed training prompts (pixels, token ids) kept across epochs, MB per "
        "process, admitted until full (no eviction: epochs are reshuffled); 0: the processor runs every step. "
        "Speed only: not part of the run identity")
    prompt_cache_max_row_mb: float = Field(
        1.0, ge=0, description="rows (one image's processed prompt) larger than this are not cached: a real-size "
        "photo's fp32 patches are 5-10 MB, so a 1 GB cache would hold ~150 of a catalogue; speed only")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="image augmentation on the fly (deterministic per draw, so "
        "resume is exact); on: the prompt cache keeps decoded images and the processor runs after augmenting")


# Settings that change how fast a stage runs, never what it trains: left out of run identities
# and of the config hash that `retrain --if-changed` compares.
_LOOP_SPEED = {"gather_for_generation", "data_workers"}
SPEED_ONLY = {"sft": {"prompt_cache_mb", "prompt_cache_max_row_mb", "loss_chunk_tokens", "packing", *_LOOP_SPEED},
              "scst": _LOOP_SPEED, "dpo": _LOOP_SPEED,
              # not speed, but not the recipe either: where this run's grounding step left its scorer
              "generate": {"rerank": {"scorer_dir"}}}


_DATA_LENGTH = ("None: from the data - the 99th percentile reference length in the model's tokens + EOS + 10% "
                "(SFT records it in the model it exports; 40 where nothing is recorded)")


class SCSTConfig(LoopConfig):
    """Self-critical sequence training with a CIDEr-D reward, on top of the SFT output."""

    enabled: bool = True
    output_dir: Path = Path(".run/scst")
    max_steps: int = Field(200, ge=0)
    batch_size: int = Field(16, ge=1, description="images per micro-batch (x samples sequences)")
    lr: float = Field(1e-5, gt=0, description="small by default: SCST breaks captions at high LR")
    samples: int = Field(5, ge=1, description="K sampled captions per image")
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = None
    top_p: float | None = None
    baseline: Literal["mean", "greedy"] = Field(
        "mean", description="mean of the other K-1 samples (new self-critical) or the greedy caption"
    )
    length_normalize: bool = False
    xe_weight: float = Field(0.0, ge=0, description="cross-entropy on references mixed in")
    kl_weight: float = Field(0.0, ge=0, description="KL penalty to the frozen SFT policy (LoRA)")
    max_new_tokens: int | None = Field(None, ge=1, description=_DATA_LENGTH)
    max_answer_tokens: int = Field(64, ge=1, description="reference length cap for xe mixing")
    logprob_chunk: int = Field(
        0, ge=0, description="sequences per log-prob forward/backward (0: all batch_size x samples at "
        "once); each image is encoded once either way")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(strategy="lora"))
    reward: RewardConfig = Field(default_factory=RewardConfig)


class DPOConfig(LoopConfig):
    """Preference tuning after SFT (or after SCST): pairs from the model's own samples per training
    image (chosen: the best combined reward with every known attribute right; rejected: a wrong
    attribute, a loop, or a generic caption) and/or user pairs; DPO loss against the starting policy
    (its log-probs computed once, with the pairs)."""

    enabled: bool = False
    output_dir: Path = Path(".run/dpo")
    max_steps: int = Field(200, ge=0)
    batch_size: int = Field(8, ge=1, description="pairs per micro-batch")
    lr: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of the chosen captions' NLL per token (RPO)")
    pair_images: int = Field(512, ge=0, description="training images sampled for pairs; 0: all")
    samples: int = Field(4, ge=2, description="captions sampled per image to pick a pair from")
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = Field(40, ge=1)
    max_answer_tokens: int = Field(64, ge=1, description="chosen/rejected captions are cut to this many tokens")
    chosen_fallback: Literal["reference", "none"] = Field(
        "reference", description="when no sample has every known attribute right: a reference is chosen, or no pair")
    swap_rejected: bool = Field(True, description="when no sample is wrong, looping or generic: the chosen with "
                                "one attribute swapped is rejected")
    min_reward_gap: float = Field(0.3, ge=0, description="a 'generic' rejected must trail the chosen by this reward")
    loop_share: float = Field(0.3, ge=0, le=1, description="repeated 3-gram share that makes a sample a loop")
    pairs_file: Path | None = Field(None, description="user pairs, JSONL {image_id, chosen, rejected} (train ids)")
    own_pairs: bool = Field(True, description="build pairs from the model's own samples (off: pairs_file only)")
    reward: RewardConfig = Field(default_factory=RewardConfig)
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(strategy="lora"))

    @model_validator(mode="after")
    def _samples_fit_the_answer(self) -> "DPOConfig":
        if self.max_answer_tokens <= self.max_new_tokens:
            raise ValueError(f"dpo.max_answer_tokens ({self.max_answer_tokens}) must exceed dpo.max_new_tokens "
                             f"({self.max_new_tokens}): a sampled caption and its EOS must fit uncut")
        return self


class PostprocessConfig(_Strict):
    """Caption clean-up after decoding."""

    strip: bool = Field(True, description="special tokens, spaces between CJK characters")
    collapse_repeats: bool = True
    normalize_width: bool = Field(True, description="full-width digits/letters -> ASCII, units")


class ChunksConfig(_Strict):
    """Catalogue-scale batch inference: chunks of a dataset, worker processes, resumable parts."""

    chunk_size: int = Field(1024, ge=1, description="images per chunk: the unit of resume and of work sharing")
    workers: int = Field(1, ge=1, description="worker processes on this machine (one per GPU on a GPU node)")
    fan_out: int = Field(1, ge=1, description="batch_inference_pipeline: parallel generate steps (pods), "
                         "step i taking chunks i, i+fan_out, ...; parts_dir must then be a shared volume")
    pods: int = Field(1, ge=1, description="batch_inference_pipeline: one multi-pod command step (`generate_pods`, "
                      "ZenML's Kubernetes step operator with pod_count = pods), pod i taking chunks i, i+pods, ...; "
                      "parts_dir must then be a shared volume")
    parts_dir: Path | None = Field(None, description="where finished chunks are kept (default: next to the output)")

    @model_validator(mode="after")
    def _fan_out_shares_parts(self):
        for key in ("fan_out", "pods"):  # else each pod writes its own parts, the merge finds none
            if getattr(self, key) > 1 and self.parts_dir is None:
                raise ValueError(f"{key} {getattr(self, key)} needs parts_dir: a path every pod mounts (a shared "
                                 "volume, e.g. /data/ecomcap/generate_parts; docs/kubernetes.md)")
        if self.fan_out > 1 and self.pods > 1:
            raise ValueError("fan_out (N regular steps) and pods (one command step on N pods) are two ways to share "
                             "the chunks: set one of them")
        return self


class GenerateConfig(_Strict):
    """Batched caption generation."""

    num_beams: int = Field(5, ge=1)
    length_penalty: float = 1.0
    repetition_penalty: float = Field(1.0, gt=0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    penalty_scope: Literal["generated", "prompt"] = Field(
        "generated", description="which tokens the repetition penalty and n-gram blocking read: generated (the "
        "caption's own; the prompt's attribute words stay free) or prompt (HF generate's rule: prompt + caption)")
    max_new_tokens: int | None = Field(None, ge=1, description=_DATA_LENGTH)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = Field(16, ge=1)
    prefill: Literal["once", "hf"] = Field(
        "once", description="once: the fast path - prompt+image prefilled once per image, cache expanded to "
        "beams/samples, beam search in its own decode loop (ecomcap.inference.beam); "
        "hf: stock generate (expands inputs before prefill), kept for comparison")
    chunks: ChunksConfig = Field(default_factory=ChunksConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)


class RegistryConfig(_Strict):
    """The MLflow model registry and the promotion gate."""

    model_name: str = "ecomcap-captioner"
    tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI; default: the stack's tracker or MLFLOW_TRACKING_URI"
    )
    experiment: str = "ecomcap"
    primary_metric: str = Field("CIDEr-D", description="the metric the gate tests for a gain")
    guard_metrics: list[str] = Field(["BLEU-4", "ROUGE-L"], description="may trail the champion by `tolerance`")
    min_rel_gain: float = Field(
        0.0, ge=0, description="lower bound of the relative gain's bootstrap interval must reach this")
    confidence: float = Field(0.9, gt=0, lt=1, description="two-sided level of the gain's bootstrap interval")
    bootstrap_resamples: int = Field(1000, ge=100, description="paired resamples of the eval items")
    bootstrap_seed: int = 0
    tolerance: float = Field(0.01, ge=0, description="guard metrics may trail the champion by this")
    tolerances: dict[str, float] = Field(
        default_factory=dict, description="per-guard-metric tolerance overriding `tolerance`, e.g. {attr_mean: 0.02}")
    floor: float = Field(0.5, ge=0, description="absolute floor of the primary metric (its own scale)")
    minimums: dict[str, float] = Field(
        default_factory=dict, description="absolute minimums of other metrics the candidate reports, e.g. "
        "{index_recall10: 0.98} (the served index against exact search); a missing metric fails")
    samples_in_report: int = Field(24, ge=0, description="images shown in samples.html")


class LaunchConfig(_Strict):
    """How the training steps run: in processes of their own, N of them under `accelerate launch`
    (one per GPU of the machine or pod; see ecomcap/launch.py). The same path for 1 and N."""

    num_processes: int = Field(1, ge=1, description="training processes (GPUs) on the step's machine")
    config_file: str | None = Field(
        None, description="accelerate config: configs/accelerate/deepspeed_zero{2,3}.yaml; none: DDP")
    main_process_port: int | None = Field(None, description="rendezvous port; none: a free one (one node), "
                                          "the main pod's port (several nodes)")
    nodes: int = Field(1, ge=1, description="machines (pods) the stage spans, num_processes on each; > 1: the "
                       "training steps run as multi-pod command steps (docs/kubernetes.md#several-nodes)")
    rendezvous_timeout_s: int = Field(
        1800, ge=10, description="how long the pods of a multi-node stage wait for each other at start (a GPU "
        "pod pulling a large image starts minutes after the first)")


CAPTION_METRICS = ("CIDEr-D", "BLEU-4", "ROUGE-L")
GROUNDED_METRICS = ("attr_mean", "cap2img_R1")  # attribute accuracy (synthetic data), evaluator R@1
PER_IMAGE_METRICS = ("CIDEr-D", "ROUGE-L")  # corpus score == mean of per-image scores (not BLEU)


class RunConfig(_Strict):
    """A whole run: one section per concern (the YAML files under configs/ have this shape)."""

    @model_validator(mode="after")
    def _gate_metrics_exist(self) -> "RunConfig":
        """The gate's metrics must be ones captioning measures (a typo would fail only at promote)."""
        r = self.registry
        if r.primary_metric not in PER_IMAGE_METRICS:
            raise ValueError(f"registry.primary_metric must be one of {PER_IMAGE_METRICS} (a mean of "
                             f"per-image scores, which the paired bootstrap resamples), got {r.primary_metric!r}")
        unknown = [m for m in r.guard_metrics if m not in CAPTION_METRICS + GROUNDED_METRICS]
        if unknown:
            raise ValueError(f"registry.guard_metrics must be among {CAPTION_METRICS + GROUNDED_METRICS}, got {unknown}")
        if "cap2img_R1" in r.guard_metrics and not self.grounding.enabled:
            raise ValueError("registry.guard_metrics cap2img_R1 needs grounding.enabled (its evaluator encoder)")
        if "attr_mean" in r.guard_metrics and self.data.source != "synthetic":
            raise ValueError("registry.guard_metrics attr_mean needs attribute ground truth, which only the synthetic "
                             "set has (data.source: synthetic)")
        for stage in ("scst", "dpo"):
            sc = getattr(self, stage)
            if sc.enabled and sc.reward.needs_scorer and not self.grounding.enabled:
                raise ValueError(f"{stage}.reward clip / distinct use the grounding scorer: set grounding.enabled: true")
        if self.dpo.enabled and not (self.dpo.own_pairs or self.dpo.pairs_file):
            raise ValueError("dpo: own_pairs is off and no pairs_file is given: there are no pairs to train on")
        return self

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    scst: SCSTConfig = Field(default_factory=SCSTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)


def load_run_config(path: str | Path, model: type[BaseModel] | None = None) -> Any:
    """Read and validate a run YAML (unknown keys are errors).

    Accepts a ZenML run configuration (our settings under ``parameters.config``; ZenML checks
    its own keys) or a plain file holding the sections directly.
    """
    data = load_yaml(path)
    if "parameters" in data:
        params = data.get("parameters") or {}
        other = sorted(set(params) - {"config"}) if isinstance(params, dict) else ["(not a mapping)"]
        if other:
            raise EcomcapError(f"invalid config in {path}: unknown key parameters.{other[0]}: the run settings go under "
                               "parameters.config")
        data = params.get("config") or {}
    return parse_model(model or RunConfig, data, str(path))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error when the file is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise EcomcapError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:  # one line: the problem and where (PyYAML's own text spans several)
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise EcomcapError(f"{path} is not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise EcomcapError(f"{path} must hold a mapping at the top level")
    return data


def parse_model(model: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """Validate `data` into `model`; mistakes become one EcomcapError line (ecomcap/config_check.py:
    unknown keys with the closest valid one, expected types, renamed keys accepted with a warning)."""
    from ecomcap.config_check import parse_config

    return parse_config(model, data, where)
