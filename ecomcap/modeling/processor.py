"""Loading the Qwen2.5-VL processor, with a fallback for machines without torchvision.

transformers builds the video processor with torchvision; CPU boxes here have no torchvision
wheel. Captioning needs no video, so when the stock processor cannot be built we load the
same tokenizer, image processor and chat template into `ImageOnlyQwenProcessor`, which
behaves like `Qwen2_5_VLProcessor` for images and text.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

log = logging.getLogger(__name__)

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
EOS_TOKEN = "<|im_end|>"


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the (torchvision-only) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_processor(
    path: str | Path,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
):
    """The stock processor when it can be built here, else `ImageOnlyQwenProcessor`."""
    pixel_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    try:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **pixel_kwargs)
        if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
            return proc
    except (ImportError, OSError, ValueError, AttributeError, TypeError) as exc:
        log.debug("stock processor unavailable (%s); using the image-only processor", exc)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(
        path, trust_remote_code=trust_remote_code, **pixel_kwargs
    )
    return ImageOnlyQwenProcessor(image_processor, tokenizer, chat_template=_chat_template(path, tokenizer))


def _chat_template(path: str | Path, tokenizer) -> str | None:
    """The processor's template: `chat_template.jinja` (transformers 5 saves), else the hub
    releases' `chat_template.json`, else the tokenizer's own."""
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        import json

        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    return getattr(tokenizer, "chat_template", None)


def special_token_ids(processor) -> dict[str, int]:
    """Ids of the chat/vision special tokens the tokenizer knows (unknown ones left out)."""
    tok = processor.tokenizer
    out = {}
    for t in (*VISION_TOKENS, EOS_TOKEN, "<|im_start|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if i is not None and i != tok.unk_token_id:
            out[t] = int(i)
    return out


def eos_token_id(processor) -> int:
    """The end of an assistant turn: ``<|im_end|>`` for Qwen chat models."""
    ids = special_token_ids(processor)
    return ids.get(EOS_TOKEN, processor.tokenizer.eos_token_id)


def suppressed_token_ids(processor) -> list[int]:
    """Tokens a caption must never contain: vision placeholders and turn starts.

    Sampling one of them breaks the next forward ("image features and image tokens do not
    match"); generation suppresses them and the SCST log-prob pass masks the same set.
    """
    ids = special_token_ids(processor)
    return sorted(v for k, v in ids.items() if k != EOS_TOKEN)


def save_processor(processor, out_dir: str | Path) -> None:
    """Save, recording the stock class so a machine with torchvision builds the stock processor."""
    import json

    processor.save_pretrained(out_dir)
    pc = Path(out_dir) / "processor_config.json"
    data = json.loads(pc.read_text(encoding="utf-8")) if pc.is_file() else {}
    data["processor_class"] = "Qwen2_5_VLProcessor"
    pc.write_text(json.dumps(data, indent=2), encoding="utf-8")
