"""Ranked classification (evaluators/ranked.py): lm-eval's pair encoding and metrics; packed
scores equal one full forward per (context, choice); known answers; the shapes set on tiny."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax.core.config import load_config
from transfusion_jax.data.documents import load_image
from transfusion_jax.data.shapes.text import text_corpus
from transfusion_jax.data.tokenizer import train_tokenizer
from transfusion_jax.evaluators import common, ranked, shapes_choices
from transfusion_jax.evaluators.common import Context
from transfusion_jax.inference.generation import Specials, build_prompt
from transfusion_jax.models import Transfusion
from transfusion_jax.models.autoencoder.codec import IDENTITY
from test_generate import random_params
from test_perplexity import ByteTokenizer

TASK = [
    {"context": "Question: How many shapes are there? Answer:", "choices": ["one", "two",
     "three", "zero"], "label": 1},
    {"context": "A small red circle in the top left. Question: What colour is the shape in "
     "the top left? Answer: ", "choices": ["red", "blue", "green"], "label": 0},
    {"context": "", "choices": ["A big square.", "A small circle at the center."], "label": 1},
    # lm-eval's partial evaluation (winogrande): the choices are contexts, one continuation.
    {"contexts": ["The circle is left of the square because the circle",
                  "The circle is left of the square because the square"],
     "continuation": "is drawn first.", "label": 0},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(text_corpus(0, "train", 300), 512)


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return str(path)


def brute_force(config, params, tok, examples, latents=None):
    """Each (context, choice) in a row of its own, through build_prompt (the generator's prompt
    layout) and one full forward; lm-eval's split written out here again."""
    model = Transfusion(config.model)
    forward = jax.jit(lambda params, chunk, images: jax.nn.log_softmax(model.apply(
        params, chunk, images, None if images is None else jnp.zeros(images.shape[:2],
                                                                      jnp.int32))["logits"]))
    out = []
    for i, e in enumerate(examples):
        lls = []
        if "contexts" in e:  # lm-eval's multiple inputs: (context_j, " " + continuation)
            pairs = [(c, " " + e["continuation"]) for c in e["contexts"]]
        else:
            pairs = [(e["context"], " " + choice) for choice in e["choices"]]
        for context, continuation in pairs:
            spaces = len(context) - len(context.rstrip())
            ctx_text, cont_text = context[:len(context) - spaces], context[len(context) - spaces:]
            ctx = tok.encode(ctx_text) if ctx_text else []
            cont = tok.encode(ctx_text + cont_text + continuation)[len(ctx):]
            parts = ([] if latents is None else [latents[i]]) + [ctx + cont]
            p = build_prompt([parts], config.model, Specials.from_tokenizer(tok),
                             length=config.data.seq_len)
            logp = np.asarray(forward(params, p.chunk, p.images))[0]
            n = int(p.lengths[0])
            seq = np.asarray(p.chunk["tokens"][0])
            lls.append(sum(float(logp[j - 1, seq[j]]) for j in range(n - len(cont), n)))
        out.append(lls)
    return out


def test_encode_pair_and_metrics_follow_lm_eval():
    tok = ByteTokenizer()
    ctx, cont = ranked.encode_pair(tok, "Q: a ", " b")
    assert ctx == tok.encode("Q: a") and cont == tok.encode("  b")  # trailing space moves
    assert ranked.encode_pair(tok, "", " b") == ([], tok.encode(" b"))
    m = ranked.choice_accuracy([-2.0, -6.0], ["ab", "abcdefghij"], 1)
    assert (m["pred"], m["pred_norm"], m["acc"], m["acc_norm"]) == (0, 1, 0.0, 1.0)
    m = ranked.choice_accuracy([-1.0, -1.0], ["a", "b"], 0)  # ties: the first, as np.argmax
    assert (m["acc"], m["acc_norm"]) == (1.0, 1.0)


@pytest.mark.slow
def test_jsonl_scores_equal_one_forward_per_choice(tmp_path, tok):
    config = load_config("experiments/transfusion.py:tiny")
    config.data.batch_size = 2  # 9 pairs, several per row: packed rows over 2+ batches
    params = random_params(config.model)
    evaluator = ranked.Evaluator(Context(config, tok, IDENTITY, str(tmp_path)),
                                 path=write_jsonl(tmp_path / "task.jsonl", TASK))
    result = evaluator.run(params, str(tmp_path))
    expected = brute_force(config, params, tok, TASK)
    records = [json.loads(line) for line in open(tmp_path / "scores.jsonl")]
    for r, lls, e in zip(records, expected, TASK):
        np.testing.assert_allclose(r["loglikelihoods"], lls, rtol=1e-5, atol=1e-5)
        assert r["pred"] == int(np.argmax(lls))
        lengths = [len(c) for c in e.get("contexts", e.get("choices"))]  # lm-eval's doc_to_choice
        assert r["pred_norm"] == int(np.argmax(np.array(lls) / np.array(lengths)))
    assert records[3]["contexts"] == TASK[3]["contexts"] and "choices" not in records[3]
    acc = np.mean([int(np.argmax(lls)) == e["label"] for lls, e in zip(expected, TASK)])
    assert result["acc"] == acc and result["n"] == 4


@pytest.mark.slow
def test_shapes_questions_with_images_equal_one_forward_per_choice(tmp_path, tok):
    config = load_config("experiments/transfusion.py:tiny")
    params = random_params(config.model)
    evaluator = ranked.Evaluator(Context(config, tok, IDENTITY, str(tmp_path)), num=3, seed=1)
    result = evaluator.run(params, str(tmp_path))
    examples = evaluator.examples
    latents = [load_image(e["image"], config.data.image_size) for e in examples]  # identity
    expected = brute_force(config, params, tok, examples, latents)
    records = [json.loads(line) for line in open(tmp_path / "scores.jsonl")]
    for r, lls in zip(records, expected):
        np.testing.assert_allclose(r["loglikelihoods"], lls, rtol=1e-5, atol=1e-5)
    assert result["n"] == 3 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1


def test_known_answer_pattern(tmp_path):
    """Zero LM head: log p = -ln V per token; with a byte tokenizer the continuation " c" has
    len(c) + 1 tokens, so acc picks the shortest choice and acc_norm the longest."""
    config = load_config("experiments/transfusion.py:tiny")
    params = random_params(config.model)
    params = {"params": {**params["params"], "lm_head": jax.tree.map(
        jnp.zeros_like, params["params"]["lm_head"])}}
    choices = [["aaa", "a", "aaaaaa", "aa"], ["bb", "bbbb", "b", "bbb"]]
    labels = [1, 2, 2, 1, 3]  # shortest, shortest, longest, longest, neither
    task = [{"context": f"Example {i}:", "choices": choices[i % 2], "label": label}
            for i, label in enumerate(labels)]
    evals = {"known": {"type": "ranked", "every": 0,
                       "path": write_jsonl(tmp_path / "known.jsonl", task)}}
    built = common.from_config(evals, Context(config, ByteTokenizer(), IDENTITY, str(tmp_path)))
    results = common.run(built, params, 0, str(tmp_path))
    assert results == {"known/acc": 0.4, "known/acc_norm": 0.4, "known/n": 5}
    records = [json.loads(line) for line in open(tmp_path / "evals/0/known/scores.jsonl")]
    assert [r["acc"] for r in records] == [1, 1, 0, 0, 0]
    assert [r["acc_norm"] for r in records] == [0, 0, 1, 1, 0]


def test_shapes_choices_are_deterministic_and_well_formed():
    a = shapes_choices.shapes_questions(12, 16, seed=0)
    b = shapes_choices.shapes_questions(12, 16, seed=0)
    c = shapes_choices.shapes_questions(12, 16, seed=1)
    strip = lambda qs: [{k: v for k, v in q.items() if k != "image"} for q in qs]
    assert strip(a) == strip(b) and strip(a) != strip(c)
    for q in a:
        assert len(set(q["choices"])) == 4 and q["choices"][q["label"]] == q["answer"]
        assert q["context"].startswith("Question: ") and q["context"].endswith(" Answer:")
        assert q["image"].shape == (16, 16, 3) and q["image"].dtype == np.uint8


def test_missing_or_bad_jsonl_is_named(tmp_path):
    config = load_config("experiments/transfusion.py:tiny")
    context = Context(config, ByteTokenizer(), IDENTITY, str(tmp_path))
    with pytest.raises(ValueError, match="nowhere.jsonl': no such file"):
        ranked.Evaluator(context, path=str(tmp_path / "nowhere.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TASK[0]) + "\n" + json.dumps({"context": "x", "choices": ["a"],
                                                            "label": 0}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: expected"):
        ranked.Evaluator(context, path=str(bad))
    bad.write_text(json.dumps({"contexts": ["a", "b"], "continuation": "c", "label": 2}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: expected.*contexts"):
        ranked.Evaluator(context, path=str(bad))
    with pytest.raises(ValueError, match="num=0"):
        ranked.Evaluator(context, path=str(bad), num=0)


def test_num_takes_the_first_examples(tmp_path):
    config = load_config("experiments/transfusion.py:tiny")
    context = Context(config, ByteTokenizer(), IDENTITY, str(tmp_path))
    path = write_jsonl(tmp_path / "task.jsonl", TASK)
    assert ranked.Evaluator(context, path=path, num=2).examples == TASK[:2]
    assert ranked.Evaluator(context, path=path).examples == TASK
    assert len(ranked.Evaluator(context).examples) == 64  # shapes questions by default
