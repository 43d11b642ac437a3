"""Perplexity evaluator (evaluators/perplexity.py): equal to a brute-force forward of each document
(window) in its own row; bits per byte by a closed form; the tiny preset; missing data named."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax.core.config import load_config
from transfusion_jax.data.shapes.text import text_corpus
from transfusion_jax.data.tokenizer import train_tokenizer
from transfusion_jax.evaluators import perplexity
from transfusion_jax.evaluators.common import Context
from transfusion_jax.models import Transfusion
from transfusion_jax.models.autoencoder.codec import IDENTITY
from test_generate import random_params

LINES = ["A small red circle in the top left.", "Question: How many shapes are there? "
         "Answer: two. " * 6, "café ☃ — naïve", "Here we see a big blue square at the center."
         " The square is below the circle. " * 3, "x"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(text_corpus(0, "train", 300), 512)


class ByteTokenizer:
    """One id per UTF-8 byte (10 + byte): token count = byte count."""
    pad_id, bos_id, eos_id, boi_id, eoi_id = 0, 1, 2, 3, 4

    def encode(self, text):
        return [10 + b for b in text.encode("utf-8")]


def tiny(seq_len=128, batch_size=8):
    config = load_config("experiments/transfusion.py:tiny")
    config.data.seq_len, config.data.batch_size = seq_len, batch_size
    return config


def brute_force(config, params, tok, texts):
    """Per document: [BOS] text [EOS], cut into windows of seq_len overlapping by one token,
    each window alone in a row of its own; -> (summed nll per document, targets per document)."""
    length = config.data.seq_len
    model = Transfusion(config.model)
    forward = jax.jit(lambda p, b: jax.nn.log_softmax(model.apply(p, b, None, None)["logits"]))
    nll, count = [], []
    for text in texts:
        tokens = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
        starts = range(0, len(tokens) - 1, length - 1) if len(tokens) > length else [0]
        total = 0.0
        for s in starts:
            piece = tokens[s:s + length]
            m = len(piece)
            row = {"tokens": np.zeros((1, length), np.int32), "segment_ids": np.zeros((1, length),
                   np.int32), "positions": np.arange(length, dtype=np.int32)[None],
                   "mask_pos": np.arange(length, dtype=np.int32)[None],
                   "patch_index": np.full((1, length), -1, np.int32)}
            row["tokens"][0, :m], row["segment_ids"][0, :m] = piece, 1
            logp = np.asarray(forward(params, {k: jnp.asarray(v) for k, v in row.items()}))[0]
            total -= sum(float(logp[i, piece[i + 1]]) for i in range(m - 1))
        nll.append(total)
        count.append(len(tokens) - 1)
    return nll, count


def write_lines(tmp_path, lines):
    path = tmp_path / "heldout.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_equals_brute_force_per_document(tmp_path, tok):
    config = tiny(seq_len=32, batch_size=3)  # long documents are cut into windows
    params = random_params(config.model)
    evaluator = perplexity.Evaluator(Context(config, tok, IDENTITY, str(tmp_path)),
                                     source="text_files", path=write_lines(tmp_path, LINES),
                                     tokens=10**9)
    result = evaluator.run(params, str(tmp_path))
    nll, count = brute_force(config, params, tok, LINES)
    assert max(count) > 2 * 32 and result["tokens"] == sum(count)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / sum(count)), rel=1e-5)
    size = sum(len(t.encode("utf-8")) for t in LINES)
    assert result["bits_per_byte"] == pytest.approx(sum(nll) / math.log(2) / size, rel=1e-5)
    docs = [json.loads(line) for line in open(tmp_path / "documents.jsonl")]
    assert [d["tokens"] for d in docs] == count
    np.testing.assert_allclose([d["nll"] for d in docs], nll, rtol=1e-5)


def test_bits_per_byte_closed_form(tmp_path):
    """Zero LM head: every target has log-probability -ln V. With one token per byte, a
    document of b bytes scores b + 1 targets (its EOS too): perplexity V and bits per byte
    (B + D) log2 V / B over D documents of B bytes. `tokens` takes whole documents until met."""
    config = tiny(seq_len=16, batch_size=2)
    params = random_params(config.model)
    params = {"params": {**params["params"], "lm_head": jax.tree.map(
        jnp.zeros_like, params["params"]["lm_head"])}}
    vocab = config.model.vocab_size
    context = Context(config, ByteTokenizer(), IDENTITY, str(tmp_path))
    path = write_lines(tmp_path, LINES)
    result = perplexity.Evaluator(context, source="text_files", path=path,
                                  tokens=10**9).run(params, str(tmp_path))
    size = sum(len(t.encode("utf-8")) for t in LINES)
    assert result["tokens"] == size + len(LINES)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(
        (size + len(LINES)) * math.log2(vocab) / size, rel=1e-5)
    first = len(LINES[0].encode("utf-8")) + 1
    some = perplexity.Evaluator(context, source="text_files", path=path, tokens=first + 1,
                                batch_size=1).run(params, str(tmp_path))
    assert some["tokens"] == first + len(LINES[1].encode("utf-8")) + 1  # two whole documents


def test_windows_target_every_token_once():
    tokens = np.arange(10)
    for length in (2, 3, 4, 9, 10, 11):
        pieces = perplexity.windows(tokens, length)
        assert all(len(p) <= length for p in pieces)
        targets = np.concatenate([p[1:] for p in pieces])
        np.testing.assert_array_equal(targets, tokens[1:])


def test_tiny_shapes_heldout_text_is_finite(tmp_path, tok):
    config = tiny()
    evaluator = perplexity.Evaluator(Context(config, tok, IDENTITY, str(tmp_path)), tokens=300,
                                     log_every=1)
    result = evaluator.run(random_params(config.model), str(tmp_path))
    assert result["tokens"] >= 300 and all(np.isfinite(v) for v in result.values())
    assert 1 < result["perplexity"] < 2 * config.model.vocab_size and result["bits_per_byte"] > 0


def test_tfds_mock_and_missing_sets_are_named(tmp_path, tok):
    import tensorflow_datasets as tfds
    config = tiny()
    context = Context(config, tok, IDENTITY, str(tmp_path))
    with pytest.raises(ValueError, match=r"TFDS data set 'c4/en' .*tfds build c4/en"):
        perplexity.Evaluator(context, source="tfds", tfds_name="c4/en",
                             tfds_data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="nowhere.txt"):
        perplexity.Evaluator(context, source="text_files", path=str(tmp_path / "nowhere.txt"))
    with pytest.raises(ValueError, match="source='images'"):
        perplexity.Evaluator(context, source="images")
    with tfds.testing.mock_data(num_examples=4):
        evaluator = perplexity.Evaluator(context, source="tfds", tfds_name="c4/en", tokens=50)
    result = evaluator.run(random_params(config.model), str(tmp_path))
    assert result["tokens"] >= 50 and np.isfinite(result["perplexity"])
