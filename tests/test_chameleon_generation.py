"""Chameleon generation (inference/generation.py, model.family "chameleon"), its tasks and its
evaluators: an image is tokens_per_image VQ code ids between BOI and EOI, decoded through the
VQ-VAE; text mode never writes image ids; classifier-free guidance on the image tokens' logits
checked against full forwards of both sequences without the cache. Random weights (a random
VQ-VAE from Autoencoder.init) except the slow end-to-end test, which trains a tiny workdir."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from transfusion_jax.core.config import load_config
from transfusion_jax.data.documents import load_image
from transfusion_jax.evaluators import denoising, ranked
from transfusion_jax.evaluators.common import Context
from transfusion_jax.inference import generation as gen
from transfusion_jax.inference.tasks import Sampling, run_tasks, to_uint8
from transfusion_jax.models import Chameleon, chameleon
from transfusion_jax.models.autoencoder.codec import Codec
from transfusion_jax.models.autoencoder.model import Autoencoder
from transfusion_jax.models.chameleon import text_vocab_size, tokens_per_image

TINY = "experiments/chameleon.py:tiny"
PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4
LENGTH = 128  # full forwards: one padded length, one compilation


class FakeTokenizer:
    """Characters as ids 10..409 (text ids of the tiny vocabulary)."""
    pad_id, bos_id, eos_id, boi_id, eoi_id = PAD, BOS, EOS, BOI, EOI

    def encode(self, text):
        return [10 + (ord(c) % 400) for c in text]

    def decode(self, ids):
        return "".join(chr(int(i) - 10) if int(i) >= 10 else "" for i in ids)


@pytest.fixture(scope="module")
def config():
    return load_config(TINY)


@pytest.fixture(scope="module")
def codec(config):
    """A random tiny VQ-VAE (experiments/autoencoder.py:tiny,kind=vq, untrained) as a Codec:
    its variables' shapes from Autoencoder.init, filled with normal noise (compiling the init
    itself takes longer than the rest of this file's fast tests)."""
    ae = load_config("experiments/autoencoder.py:tiny,kind=vq").model
    model = Autoencoder(ae)
    size = config.data.image_size
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(7), jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(7)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)
    assert ae.codebook_size == config.model.image_vocab_size
    return Codec("vq", model, variables=variables, ae_config=ae)


def random_params(cfg, seed=0, image_scale=1.0):
    """Init params perturbed so no layer is zero (test_generate.random_params' rule); the LM
    head's image-id columns times `image_scale` (large: image ids dominate every logit row,
    which text mode must then ban)."""
    inputs = chameleon.example_inputs(cfg, 16)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), inputs)
    params = nn.unbox(Chameleon(cfg).init(jax.random.key(seed), *zeros))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape)
                             for a, k in zip(leaves, keys)])
    kernel = params["params"]["lm_head"]["kernel"]
    image = jnp.arange(kernel.shape[1]) >= text_vocab_size(cfg)
    params["params"]["lm_head"]["kernel"] = jnp.where(image, kernel * image_scale, kernel)
    return params


def full_logits(cfg, params, tokens) -> np.ndarray:
    """Logits [n, V] of one sequence (one document from position 0), a plain forward without
    a cache; padded to LENGTH with empty elements (segment 0), which nothing attends to."""
    n = len(tokens)
    assert n <= LENGTH
    row = lambda x, fill: np.concatenate([x, np.full(LENGTH - n, fill)]).astype(np.int32)[None]
    batch = {"tokens": row(np.asarray(tokens), PAD), "segment_ids": row(np.ones(n), 0),
             "positions": row(np.arange(n), 0), "mask_pos": np.arange(LENGTH)[None],
             "patch_index": np.full((1, LENGTH), -1, np.int32)}
    return np.asarray(_forward(cfg)(params, batch)["logits"][0, :n])


_FORWARDS = {}


def _forward(cfg):
    if id(cfg) not in _FORWARDS:
        _FORWARDS[id(cfg)] = jax.jit(Chameleon(cfg).apply)
    return _FORWARDS[id(cfg)]


def prompt_tokens(prompt, r) -> list[int]:
    return [int(t) for t in prompt.chunk["tokens"][r, :int(prompt.lengths[r])]]


def test_build_prompt_writes_code_images_as_offset_ids_between_boi_and_eoi(config):
    cfg = config.model
    offset, p = text_vocab_size(cfg), tokens_per_image(cfg)
    ids = np.arange(p, dtype=np.int32).reshape(cfg.latent_size, -1) % cfg.image_vocab_size
    prompt = gen.build_prompt([[[7, 8], ids, [9]], [[5]]], cfg)
    assert prompt.images is None
    want = [BOS, 7, 8, BOI, *(offset + ids.reshape(-1)), EOI, 9]
    assert prompt_tokens(prompt, 0) == want and prompt_tokens(prompt, 1) == [BOS, 5]
    n = len(want)
    np.testing.assert_array_equal(prompt.chunk["mask_pos"][0], np.arange(n))
    assert np.all(np.asarray(prompt.chunk["patch_index"]) == -1)
    with pytest.raises(ValueError, match=r"code ids, int \(8, 8\)"):
        gen.build_prompt([[np.zeros((4, 4), np.int32)]], cfg)
    with pytest.raises(ValueError, match="model.image_vocab_size=64"):
        gen.build_prompt([[np.full((8, 8), 64, np.int32)]], cfg)
    with pytest.raises(ValueError, match=r"an image's code ids \(8, 8\)"):
        gen.build_prompt([[np.zeros((8, 8, 3))]], cfg)


@pytest.mark.slow
def test_images_are_p_code_ids_between_boi_and_eoi_and_text_never_image_ids(config):
    """The LM head favours image ids everywhere (image_scale): text mode still writes text, each
    text token the argmax over the allowed ids of a full forward (no cache) of the sequence
    before it, while the unrestricted argmax is an image id. Row 0 asks for an image first: P
    ids in the image range, sampled (temperature 1: not one repeated code), then EOI, and
    Generation.images holds them without the offset."""
    cfg = config.model
    offset, p, vocab = text_vocab_size(cfg), tokens_per_image(cfg), cfg.vocab_size
    params = random_params(cfg, image_scale=30.0)
    rng = np.random.default_rng(0)
    prompt = gen.build_prompt([[rng.integers(5, 400, 5), [BOI]], [rng.integers(5, 400, 4)]], cfg)
    g = gen.Generator(cfg, None, gen.Specials())  # greedy text, image tokens at temperature 1
    max_new, max_images = 8, 1
    out = g(params, prompt, jax.random.key(0), max_new_tokens=max_new, max_images=max_images)
    assert out.tokens.shape == (2, max_new + max_images * p)
    assert out.images.shape == (2, 1, cfg.latent_size, cfg.latent_size)
    assert out.images.dtype == jnp.int32
    banned_image_argmax = 0
    for r in range(2):
        n, before = int(out.num_tokens[r]), prompt_tokens(prompt, r)
        tokens = [int(t) for t in out.tokens[r, :n]]
        assert all(t == PAD for t in np.asarray(out.tokens[r, n:]))
        logits = full_logits(cfg, params, before + tokens)
        i, images, counted = 0, [], 0
        in_image = before[-1] == BOI
        while i < n:
            if in_image:  # P image ids, then EOI
                codes = tokens[i:i + p]
                assert len(codes) == p and all(offset <= t < vocab for t in codes), (r, codes)
                assert tokens[i + p] == EOI
                images.append(np.asarray(codes) - offset)
                i, counted, in_image = i + p + 1, counted + 1, False
                continue
            tok, row = tokens[i], logits[len(before) + i - 1].copy()
            assert tok < offset, (r, i, tok)
            banned_image_argmax += int(np.argmax(row)) >= offset
            row[[PAD, BOS, EOI]] = -np.inf
            row[offset:] = -np.inf
            if len(images) >= max_images or counted + 2 > max_new:
                row[BOI] = -np.inf
            assert tok == int(np.argmax(row)), (r, i)
            in_image, i, counted = tok == BOI, i + 1, counted + 1
        assert counted <= max_new and len(images) == int(out.num_images[r])
        for k, codes in enumerate(images):
            np.testing.assert_array_equal(np.asarray(out.images[r, k]).reshape(-1), codes)
    assert int(out.num_images[0]) == 1 and len(np.unique(out.images[0, 0])) > 1
    assert banned_image_argmax >= 5  # the ban did work: image ids led the raw logits


def test_guided_image_tokens_equal_full_forwards_of_both_sequences(config):
    """Text to image with guidance 5 at temperature 0: every image token is the argmax over the
    image vocabulary of l_u + 5 (l_c - l_u), l_c and l_u from plain forwards (no cache) of the
    conditional sequence and of BOS BOI with the same image tokens; guidance changes some."""
    cfg = config.model
    offset, p, vocab = text_vocab_size(cfg), tokens_per_image(cfg), cfg.vocab_size
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(1)
    prompt = gen.build_prompt([[rng.integers(5, 400, n), [BOI]] for n in (7, 3)], cfg)
    uncond = gen.build_prompt([[[BOI]]] * 2, cfg)
    g = gen.Generator(cfg, None, gen.Specials(), image_tokens=gen.TextSampling(0.0))
    out = g(params, prompt, jax.random.key(0), uncond=uncond, guidance=5.0, max_new_tokens=1,
            max_images=1)
    changed = 0
    for r in range(2):
        assert int(out.num_tokens[r]) == p + 1 and int(out.tokens[r, p]) == EOI
        codes = [int(t) for t in out.tokens[r, :p]]
        cond, free = prompt_tokens(prompt, r), [BOS, BOI]
        lc = full_logits(cfg, params, cond + codes)[len(cond) - 1:][:p, offset:vocab]
        lu = full_logits(cfg, params, free + codes)[len(free) - 1:][:p, offset:vocab]
        np.testing.assert_array_equal(np.argmax(lu + 5.0 * (lc - lu), -1) + offset, codes)
        changed += int(np.sum(np.argmax(lc, -1) + offset != codes))
        np.testing.assert_array_equal(np.asarray(out.images[r, 0]).reshape(-1),
                                      np.asarray(codes) - offset)
    assert changed > 0


@pytest.mark.slow
def test_run_tasks_decodes_the_generated_code_ids_through_the_vq_vae(config, codec, tmp_path):
    """Text to image (guidance 5) and image to text on a tiny Chameleon: each generated image's
    pixels are Codec.decode_ids of its code ids (the records' `latents`); captions hold no image
    ids; the grid is written."""
    cfg = config.model
    params = random_params(cfg, seed=2)
    size = config.data.image_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    sampling = Sampling(num_samples=2, guidance=5.0, max_new_tokens=6, temperature=1.0)
    records = run_tasks(config, params, FakeTokenizer(), sampling, prompts=["a red circle"],
                        images=[image], names=["noise"], out=str(tmp_path), codec=codec)
    assert [r["task"] for r in records] == ["text_to_image"] * 2 + ["image_to_text"] * 2
    decode = jax.jit(lambda ids: codec.decode_ids(codec.variables, ids))
    for rec in records[:2]:
        assert rec["images"] == 1 and len(rec["latents"]) == len(rec["pixels"]) == 1
        ids = rec["latents"][0]
        assert ids.shape == (cfg.latent_size, cfg.latent_size) and ids.dtype == np.int32
        assert 0 <= ids.min() and ids.max() < cfg.image_vocab_size
        np.testing.assert_array_equal(rec["pixels"][0], to_uint8(decode(ids[None])[0]))
    assert not np.array_equal(records[0]["latents"][0], records[1]["latents"][0])
    offset = text_vocab_size(cfg)
    for rec in records[2:]:
        assert rec["images"] == 0 and rec["latents"] == []
        assert all(ord(c) + 10 < offset for c in rec["text"])
    grid = np.asarray(Image.open(tmp_path / "text_to_image.png"))
    assert grid.shape == (size + 2, 2 * (size + 2), 3)


@pytest.mark.slow
def test_ranked_scores_the_image_as_code_ids_in_the_tokens(config, codec, monkeypatch):
    """A shapes question on a tiny Chameleon: the context's image is BOI, its VQ code ids
    (offset), EOI in the tokens, and each choice's log-likelihood is that of a plain forward.
    (The question is shortened: the fake tokenizer spends a token per character.)"""
    cfg = config.model
    params = random_params(cfg, seed=4)
    questions = ranked.shapes_questions
    monkeypatch.setattr(ranked, "shapes_questions", lambda *a: [
        dict(e, context="Colour?") for e in questions(*a)])
    evaluator = ranked.Evaluator(Context(config, FakeTokenizer(), codec, ""), num=1,
                                 batch_size=2)
    example = evaluator.examples[0]
    pixels = load_image(example["image"], config.data.image_size)
    ids = np.asarray(codec.encode_ids(codec.variables, jnp.asarray(pixels)[None])[0])
    head = [BOS, BOI, *(text_vocab_size(cfg) + ids.reshape(-1)), EOI]
    lls = evaluator.loglikelihoods(params)
    for k, doc in enumerate(evaluator.docs):
        tokens = [int(t) for t in doc["tokens"]]
        assert tokens[:len(head)] == head
        logp = jax.nn.log_softmax(full_logits(cfg, params, tokens))
        c = evaluator.scored[k]
        want = sum(float(logp[j - 1, tokens[j]]) for j in range(len(tokens) - c, len(tokens)))
        assert lls[k] == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_denoising_evaluator_refuses_chameleon_naming_the_family(config, codec):
    with pytest.raises(ValueError, match="model.family='chameleon'"):
        denoising.Evaluator(Context(config, FakeTokenizer(), codec, ""))


@pytest.fixture(scope="module")
def chameleon_workdir(tiny_vq_workdir, tmp_path_factory):
    """A tiny Chameleon run (3 steps) on the session's tiny VQ-VAE (conftest.py)."""
    from transfusion_jax.trainers import transfusion as trainer
    workdir = str(tmp_path_factory.mktemp("chameleon"))
    config = load_config(TINY)
    config.autoencoder.checkpoint = tiny_vq_workdir
    config.total_steps, config.optimizer.warmup_steps = 3, 1
    trainer.train(config, workdir)
    return workdir


@pytest.mark.slow
def test_evaluate_and_generate_entry_points_run_a_chameleon_workdir(chameleon_workdir, tmp_path):
    """`python -m transfusion_jax.evaluate` (in process) runs the text, caption, sample, FID
    (random network) and shapes evaluators on a Chameleon checkpoint, its VQ-VAE loaded for
    model.family; the denoising evaluator is refused naming model.family; the generate CLI
    writes images."""
    from transfusion_jax import evaluate, generate
    workdir = chameleon_workdir
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["evals"] = {
        "shapes": {"type": "shapes", "every": 0, "num": 2, "guidance": 5.0,
                   "batch": 1},  # two batches: prompts padded to one length (code ids)
        "perplexity": {"type": "perplexity", "every": 0, "tokens": 200},
        "ranked": {"type": "ranked", "every": 0, "num": 2},
        "captioning": {"type": "captioning", "every": 0, "num": 2, "batch": 2,
                       "max_new_tokens": 8},
        "samples": {"type": "sample_grid", "every": 0, "num": 2, "guidance": 5.0},
        "fid": {"type": "fid", "every": 0, "num": 4, "batch": 2, "random_weights": True,
                "dims": 64, "guidance": 5.0},
        "denoising": {"type": "denoising", "every": 0, "num": 2},
    }
    with open(path, "w") as f:
        json.dump(saved, f)
    results = evaluate.evaluate(workdir, only=("shapes", "perplexity", "ranked", "captioning",
                                               "samples", "fid"))
    assert results["shapes/text_to_image/items"] == 2
    assert 0 < results["shapes/text_to_image/code_usage"] <= 1
    assert 0 < results["shapes/text_to_image/data_code_usage"] <= 1
    assert "shapes/text_to_image/latent_std" not in results
    assert results["perplexity/perplexity"] > 1 and results["ranked/n"] == 2
    assert results["captioning/images"] == 2 and results["samples/images"] == 2
    assert np.isfinite(results["fid/fid64_random_weights"])
    report = open(os.path.join(workdir, "evals", "3", "shapes", "report.md")).read()
    assert "of the 64 codes" in report
    with pytest.raises(ValueError, match="model.family='chameleon'"):
        evaluate.evaluate(workdir, only=("denoising",))
    size = saved["data"]["image_size"]
    png = tmp_path / "in.png"
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(png)
    generate.main(["--workdir", workdir, "--prompt", "a red circle", "--image", str(png),
                   "--num-samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "g")])
    lines = [json.loads(line) for line in open(tmp_path / "g" / "generations.jsonl")]
    assert [r["task"] for r in lines] == ["text_to_image", "image_to_text"]
    assert lines[0]["images"] == 1
    assert (tmp_path / "g" / "text_to_image.png").exists()
