"""CIDEr-D (evaluators/cider.py) against pycocoevalcap's Cider scorer, a hand-checked case, the
tokenizer, and the captioning evaluator on the tiny preset."""
import json
import math

import numpy as np
import pytest

from transfusion_jax.core.config import load_config
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.evaluators import captioning, common
from transfusion_jax.evaluators.cider import cider_d, tokenize
from test_generate import random_params

WORDS = "a the red blue small big circle square triangle in at top left right of is".split()


def generated_set(n=50, seed=0):
    """n images, 1-5 references each, candidates from a small vocabulary (so n-grams are shared)
    and edge cases: empty, one word, identical to a reference, repeated words, long."""
    rng = np.random.default_rng(seed)

    def sentence(lo=1, hi=12):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    refs = [[sentence(3) for _ in range(int(rng.integers(1, 6)))] for _ in range(n)]
    cands = [sentence() for _ in range(n)]
    cands[0], cands[1], cands[2] = "", "circle", refs[2][0]
    cands[3] = "red red red red circle circle"
    refs[3] = ["red circle", "a red circle red"]
    cands[4] = " ".join(rng.choice(WORDS, 40))
    refs[5] = [cands[5]]  # one reference, identical
    return cands, refs


def test_parity_with_pycocoevalcap():
    from pycocoevalcap.cider import cider  # the reference package (the test extra installs it)
    cands, refs = generated_set()
    score, per_image = cider_d(cands, refs)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    ref_score, ref_per_image = cider.Cider().compute_score(gts, res)
    assert score == pytest.approx(ref_score, abs=1e-6)
    np.testing.assert_allclose(per_image, ref_per_image, rtol=0, atol=1e-6)
    assert per_image[0] == 0.0 and per_image[5] > per_image[6:].max() and 0 < score < 10


def test_hand_checked_case():
    # Image 0: candidate = its only reference, n-grams nowhere else: every order's cosine is 1,
    # no length penalty: 10 * mean(1, 1, 1, 1) = 10. Image 1: "x y" against "x y z", every
    # n-gram with df 1 (weight log 2): unigrams 2 / sqrt(2 * 3), bigrams 1 / sqrt(1 * 2), no
    # 3-/4-grams; bigram counts 1 vs 2 give the penalty exp(-1 / (2 * 6^2)):
    # 10 / 4 * (2 / sqrt(6) + 1 / sqrt(2)) * exp(-1 / 72) = 3.75647...
    score, per_image = cider_d(["a b c d", "x y"], [["a b c d"], ["x y z"]])
    image_1 = 10 / 4 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72)
    assert per_image == pytest.approx([10.0, image_1], abs=1e-12)
    assert score == pytest.approx((10 + image_1) / 2, abs=1e-12)
    # One image: idf = log(1) - log(1) = 0 for every n-gram, so CIDEr-D is 0 (as pycocoevalcap).
    assert cider_d(["a b"], [["a b"]])[0] == 0.0
    with pytest.raises(ValueError, match="2 candidates for 1"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["a"], [[]])


def test_tokenize_lowercases_and_drops_punctuation_as_ptb():
    assert tokenize("A small red circle, in the Top-Left.") == "a small red circle in the top-left"
    assert tokenize("It's the dog's toy; don't (really)!") == "it 's the dog 's toy do n't really"
    assert tokenize('"Two" shapes: 3.5 and 1,000...\n') == "two shapes 3.5 and 1,000"


@pytest.mark.slow
def test_evaluator_on_tiny(tmp_path):
    config = load_config("experiments/transfusion.py:tiny")
    context = common.Context(config, get_tokenizer(config.data, str(tmp_path)), None,
                             str(tmp_path))
    evaluator = captioning.Evaluator(context, num=5, references=3, max_new_tokens=8, batch=2)
    assert all(len(set(r)) == 3 for r in evaluator.references)  # distinct phrasings
    scores = evaluator.run(random_params(config.model), str(tmp_path))
    assert np.isfinite(scores["cider"]) and scores["cider"] >= 0
    assert scores["images"] == 5 and scores["references"] == 3
    (compiled,) = evaluator.generator._compiled.values()  # 3 batches, the last padded
    assert compiled._cache_size() == 1
    saved = json.loads((tmp_path / "captions.json").read_text())
    assert saved["cider"] == scores["cider"] and len(saved["captions"]) == 5
    assert saved["captions"][0]["references"] == evaluator.references[0]
    with pytest.raises(ValueError, match="batch=0"):
        captioning.Evaluator(context, batch=0)
