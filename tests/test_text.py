"""The metric tokeniser: the spec's example, and the vectorised path equal to the simple one."""
import random

from ecomcap.metrics.ngrams import encode_texts
from ecomcap.text import tokenize, tokenize_many


def test_spec_example():
    assert tokenize("ＸＬ码2024新款！") == ["xl", "码", "2024", "新", "款"]
    assert tokenize("Nike Air，  iPhone15 Pro Max！") == ["nike", "air", "iphone15", "pro", "max"]
    assert tokenize("") == [] and tokenize("。，！ \t\n") == []


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    pool = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    pool += list("，。！？ ABCxyz0123456789ＸＬ码\u0301é_-·×\t\u3000\ufffdÄß\n\r")
    pool += ["\U0001F600", "\U00020000", "ﬁ", "①", "Ⅻ", "㎏", "\u200b", "\ue000"]
    return [
        "".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)
    ] + ["", "ＸＬ码2024新款！"]


def test_vectorised_path_equals_per_text_tokenize():
    texts = _random_texts(5000)
    assert tokenize_many(texts) == [tokenize(t) for t in texts]
    assert tokenize_many([]) == []


def test_encode_texts_ids_follow_tokens():
    texts = _random_texts(500, seed=1)
    tok, length, n_ids, vocab = encode_texts(texts)
    flat = [t for toks in tokenize_many(texts) for t in toks]
    assert length.tolist() == [len(tokenize(t)) for t in texts]
    assert [vocab[t] for t in flat] == tok.tolist() and tok.max() < n_ids
    # with a fixed vocabulary, unseen tokens get fresh ids that match nothing known
    tok2, _, n2, _ = encode_texts(["新词ABC", "ＸＬ码"], vocab)
    assert n2 >= len(vocab) and tok2.max() < n2
