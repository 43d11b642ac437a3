"""Generation on the KV cache, checked against full forwards of the whole sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from transfusion_jax import diffusion
from transfusion_jax.inference import generation as gen
from transfusion_jax.core.config import load_config
from transfusion_jax.models import Transfusion, patches_per_image
from transfusion_jax.models.kv_cache import init_cache
from rows import BOI, EOI, build_rows

TOL = 1e-5


def tiny(**overrides):
    cfg = load_config("experiments/transfusion.py:tiny").model
    cfg.update(overrides)
    return cfg


def random_params(cfg, seed=0):
    """Init params perturbed so that no layer is zero (zero-initialised outputs hide bugs)."""
    p = patches_per_image(cfg)
    batch, _ = build_rows([[[2, "image"]]], 2 * p + 16, 1, p)
    shape = (1, 1, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    params = nn.unbox(Transfusion(cfg).init(jax.random.key(seed), batch, jnp.zeros(shape),
                                            jnp.zeros((1, 1), jnp.int32)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def full_row(cfg, docs, slots, length, seed=0):
    """A batch-contract row per document structure (one document each), with random images."""
    p = patches_per_image(cfg)
    batch, info = build_rows([[d] for d in docs], length, slots, p)
    shape = (len(docs), slots, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    images = jax.random.normal(jax.random.key(seed), shape)
    return {k: jnp.asarray(v) for k, v in batch.items()}, images, info


def prompt_from_row(batch, images, lengths):
    """The first `lengths[r]` elements of each row as a Prompt (cache coordinates = row index)."""
    keys = ("tokens", "segment_ids", "positions", "mask_pos", "patch_index", "patch_positions")
    chunk = {k: batch[k] for k in keys}
    keep = jnp.arange(batch["tokens"].shape[1])[None] < jnp.asarray(lengths)[:, None]
    chunk["segment_ids"] = jnp.where(keep, chunk["segment_ids"], 0)
    return gen.Prompt(chunk, images, jnp.asarray(lengths, jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "blockwise", "pallas_gpu", "splash"])
def test_cached_text_decoding_equals_full_recompute(attention, monkeypatch):
    """Two rows of different prompt lengths: prefill, decode text token by token (an image in
    between, written by commit_image), and every step's logits equal the full forward's. The
    kernels (Pallas interpreter here) run the prefill, padded to their tile; a spy checks."""
    from transfusion_jax.models import attention_gpu, attention_tpu
    calls = []
    for module, name in ((attention_gpu, "range_attention"), (attention_tpu, "splash_attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=real, **k: calls.append(1) or _f(*a, **k))
    cfg = tiny(attention=attention, attention_block=16 if attention == "blockwise" else 128)
    model, params = Transfusion(cfg), random_params(cfg)
    p = patches_per_image(cfg)
    batch, images, info = full_row(cfg, [[3, "image", 4], [6, "image", 1]], 1, 2 * p + 16)
    t0 = jnp.zeros(images.shape[:2], jnp.int32)
    reference = np.asarray(jax.jit(model.apply)(params, batch, images, t0)["logits"])
    starts = [2, 5]  # prefill lengths; both rows then decode text up to their BOI
    apply = jax.jit(lambda f, *a: f(model, params, *a), static_argnums=0)
    cache = init_cache(cfg, 2, 2 * p + 16)
    cache, logits = apply(gen.prefill, cache, prompt_from_row(batch, images, starts))
    got = {(r, s - 1): logits[r] for r, s in enumerate(starts)}
    tokens = np.asarray(batch["tokens"])
    boi = [int(np.flatnonzero(tokens[r] == BOI)[0]) for r in range(2)]
    pos = np.array(starts)
    while (pos <= boi).any():  # text up to and including each row's BOI, rows out of step
        active = pos <= np.array(boi)
        cache, logits = apply(gen.decode_text, cache, jnp.asarray(tokens[[0, 1], pos]),
                              jnp.asarray(active))
        for r in np.flatnonzero(active):
            got[(r, pos[r])] = logits[r]
        pos = pos + active
    cache, logits = apply(gen.commit_image, cache, images[:, 0], jnp.ones(2, bool), EOI)
    pos = pos + p  # now at EOI
    for r in range(2):
        got[(r, pos[r])] = logits[r]
    valid = np.asarray(info["doc"] > 0)
    for _ in range(2):  # text after the image
        pos = pos + 1
        active = valid[[0, 1], pos] & (pos < valid.sum(1) - 1)
        cache, logits = apply(gen.decode_text, cache, jnp.asarray(tokens[[0, 1], pos]),
                              jnp.asarray(active))
        for r in np.flatnonzero(active):
            got[(r, pos[r])] = logits[r]
    assert len(got) >= 12
    assert bool(calls) == (attention in ("pallas_gpu", "splash")), calls
    for (r, i), value in got.items():
        np.testing.assert_allclose(value, reference[r, i], atol=TOL, rtol=TOL,
                                   err_msg=f"row {r}, element {i}")


@pytest.mark.slow
@pytest.mark.parametrize("patch", ["linear", "unet"])
def test_cached_denoising_step_equals_full_forward(patch):
    """Prefix = text, an earlier (clean) image, text, BOI; the P noisy patches against the cache
    give the eps of a full forward over prefix + noisy image at the same t."""
    cfg = tiny(patch=patch)
    model, params = Transfusion(cfg), random_params(cfg)
    p = patches_per_image(cfg)
    batch, images, _ = full_row(cfg, [[2, "image", 3, "image"], [5, "image", 1, "image"]], 2,
                                3 * p + 16, seed=1)
    t = jnp.array([[0, 537], [0, 120]], jnp.int32)  # the earlier image is finished: t = 0
    prefix = [int(np.flatnonzero(np.asarray(batch["tokens"][r]) == BOI)[1]) + 1 for r in range(2)]
    t2 = jnp.array([[0, 999], [0, 3]], jnp.int32)

    twice = patch == "linear"  # the cache property once; the U-Net's skips at one t

    @jax.jit  # one compilation for both paths (the U-Net dominates compile time)
    def both_paths(prompt):
        full = lambda t: model.apply(params, batch, images, t)["prediction"][:, 1]
        cache, _ = gen.prefill(model, params, init_cache(cfg, 2, 3 * p + 16), prompt)
        step = lambda t: gen.denoise(model, params, cache, images[:, 1], t, jnp.ones(2, bool))
        # Two steps on the same cache: a step leaves the cache as it was.
        first = (step(t[:, 1]), full(t))
        return first + ((step(t2[:, 1]), full(t2)) if twice else ())

    results = both_paths(prompt_from_row(batch, images, prefix))
    for cached, full in zip(results[::2], results[1::2]):
        np.testing.assert_allclose(cached, full, atol=TOL, rtol=TOL)
    assert len(results) == (4 if twice else 2)


def full_recompute_sample(model, params, prompt, key, tables, guidance=None, uncond=None):
    """The reference sampler: every step runs the whole sequence (prompt + noisy image)."""
    cfg = model.cfg
    p = patches_per_image(cfg)

    def eps_of(pr, x):
        def eps_fn(x_t, t):
            b, lp = pr.lengths.shape[0], pr.chunk["tokens"].shape[1]
            chunk = gen.image_chunk(pr.lengths, jnp.ones(b, bool), p)
            full = {k: jnp.concatenate([pr.chunk[k], chunk[k]], 1) for k in
                    ("tokens", "segment_ids", "positions", "mask_pos")}
            # The prompt's padding must not sit between prompt and image: place the image right
            # after each row's prompt by indexing, as one sequence of lp + p elements.
            full["patch_index"] = jnp.concatenate(
                [jnp.full((b, lp), -1, jnp.int32), chunk["patch_index"]], 1)
            full["patch_positions"] = (lp + jnp.arange(p))[None, None].repeat(b, 0)
            imgs = x_t[:, None]
            return model.apply(params, full, imgs, jnp.full((b, 1), t, jnp.int32))["prediction"][:, 0]
        return eps_fn

    def eps_fn(x, t):
        e = eps_of(prompt, x)(x, t)
        if guidance is None:
            return e
        return gen.guided(e, eps_of(uncond, x)(x, t), guidance)

    key_noise, key_sampler = jax.random.split(key)
    b = prompt.lengths.shape[0]
    x_T = jax.random.normal(key_noise, (b, cfg.latent_size, cfg.latent_size, cfg.latent_channels))
    return diffusion.sample(eps_fn, x_T, key_sampler, tables)


def text_prompts(cfg, rows, seed=0):
    rng = np.random.default_rng(seed)
    return gen.build_prompt([[rng.integers(5, 400, n), [BOI]] for n in rows], cfg)


@pytest.mark.slow
@pytest.mark.parametrize("sampler,steps", [("dpm++2m", 5)])  # second order: uses x0_prev
def test_cached_text_to_image_equals_full_recompute_with_guidance(sampler, steps):
    cfg = tiny()
    model, params = Transfusion(cfg), random_params(cfg)
    schedule = diffusion.cosine_schedule(1000)
    tables = diffusion.sampler_tables(schedule, sampler, steps)
    prompt, uncond = text_prompts(cfg, [7, 3]), gen.build_prompt([[[BOI]], [[BOI]]], cfg)
    both = gen.concat_prompts(prompt, uncond)
    p = patches_per_image(cfg)
    cache = init_cache(cfg, 4, both.chunk["tokens"].shape[1] + p + 1)
    key = jax.random.key(5)

    @jax.jit
    def cached(cache):
        cache, _ = gen.prefill(model, params, cache, both)
        return gen.sample_image(model, params, cache, key, jnp.ones(4, bool), tables, 3.0)

    # The mask vectors place each image right after its row's prompt; the shorter prompt's
    # padding (segment 0, invisible) sits between them in the full sequence's arrays.
    full = jax.jit(lambda: full_recompute_sample(model, params, prompt, key, tables, 3.0, uncond))
    cached, full = np.asarray(cached(cache)), np.asarray(full())
    scale = np.abs(full).max()  # random weights and guidance 3 give large latents
    np.testing.assert_allclose(cached / scale, full / scale, atol=1e-5)


def generator(cfg, **image):
    return gen.Generator(cfg, diffusion.cosine_schedule(1000), gen.Specials(),
                         gen.ImageSampling(**{"sampler": "ddim", "steps": 4, **image}),
                         gen.TextSampling(temperature=1.0, top_k=50))


@pytest.mark.slow
def test_same_seed_same_output_and_guidance_one_is_conditional():
    cfg = tiny()
    params = random_params(cfg)
    g = generator(cfg, sampler="ddpm")
    prompt, uncond = text_prompts(cfg, [6, 2]), gen.build_prompt([[[BOI]], [[BOI]]], cfg)
    run = lambda seed, **kw: g(params, prompt, jax.random.key(seed), max_new_tokens=4, **kw)
    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.images, c.images)
    assert np.all(np.asarray(a.num_images) == 1) and np.all(np.asarray(a.tokens[:, 0]) == EOI)
    guided1 = run(1, uncond=uncond, guidance=1.0)
    scale = np.abs(np.asarray(a.images)).max()  # random weights give large latents
    np.testing.assert_allclose(guided1.images / scale, a.images / scale, atol=1e-6)
    np.testing.assert_array_equal(guided1.tokens, a.tokens)
    guided3 = run(1, uncond=uncond, guidance=3.0)
    assert not np.allclose(guided3.images, a.images, atol=1e-3)


def sequence_batch(tokens, p):
    """One row of text tokens where each BOI is followed by P patches of the next image slot ->
    (batch-contract arrays [1, L], element index of every token in `tokens`)."""
    seq, mask_pos, patch_index, where, slots = [], [], [], [], []
    for tok in tokens:
        where.append(len(seq))
        seq.append(tok), mask_pos.append(len(seq) - 1), patch_index.append(-1)
        if tok == BOI:
            start, slot = len(seq), len(slots)
            slots.append(list(range(start, start + p)))
            seq += [0] * p
            mask_pos += [start + p - 1] * p
            patch_index += [slot * p + j for j in range(p)]
    n = len(seq)
    batch = {"tokens": seq, "segment_ids": [1] * n, "positions": list(range(n)),
             "mask_pos": mask_pos, "patch_index": patch_index}
    batch = {k: jnp.asarray([v], jnp.int32) for k, v in batch.items()}
    batch["patch_positions"] = jnp.asarray([slots or [[0] * p]], jnp.int32)
    return batch, where


@pytest.mark.slow
def test_mixed_generation_rows_in_different_modes_match_the_full_sequence():
    """Row 0 starts with an image (its prompt ends in BOI) while row 1 writes text; greedy text.
    Every generated text token is the argmax (banned ids aside) of a full forward over the whole
    sequence before it, the generated images in place."""
    cfg = tiny()
    model, params = Transfusion(cfg), random_params(cfg)
    p = patches_per_image(cfg)
    rng = np.random.default_rng(3)
    prompt = gen.build_prompt([[rng.integers(5, 400, 4), [BOI]], [rng.integers(5, 400, 6)]], cfg)
    g = gen.Generator(cfg, diffusion.cosine_schedule(1000), gen.Specials(),
                      gen.ImageSampling("ddim", 3), gen.TextSampling())
    max_new, max_images = 6, 1
    out = g(params, prompt, jax.random.key(0), max_new_tokens=max_new, max_images=max_images)
    assert int(out.num_images[0]) == 1 and int(out.tokens[0, 0]) == EOI
    checked = 0
    for r in range(2):
        n_prompt, n = int(prompt.lengths[r]), int(out.num_tokens[r])
        tokens = [int(t) for t in prompt.chunk["tokens"][r, :n_prompt]]
        tokens += [int(t) for t in out.tokens[r, :n]]
        batch, where = sequence_batch(tokens, p)
        m = int(out.num_images[r])
        images = out.images[r:r + 1, :max(m, 1)]
        logits = np.asarray(model.apply(params, batch, images, jnp.zeros((1, max(m, 1)),
                                                                         jnp.int32))["logits"][0])
        images_so_far = tokens[:n_prompt].count(BOI)
        for j in range(n_prompt, len(tokens)):
            tok, before = tokens[j], logits[where[j] - 1].copy()
            images_so_far += tok == BOI
            if tok == EOI:  # written by the image phase, not sampled
                continue
            before[[0, 1, 4]] = -np.inf  # PAD, BOS, EOI
            if images_so_far - (tok == BOI) >= max_images or (j - n_prompt) + 2 > max_new:
                before[BOI] = -np.inf
            assert tok == int(np.argmax(before)), (r, j)
            checked += 1
    assert checked >= 6


def test_text_sampling_rules():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]] * 4000))
    key = jax.random.key(0)
    greedy = gen.sample_token(key, logits, gen.TextSampling())
    assert np.all(np.asarray(greedy) == 1)
    banned = jnp.array([False, True, False, False])
    assert np.all(np.asarray(gen.sample_token(key, logits, gen.TextSampling(), banned)) == 3)
    counts = lambda s: np.bincount(np.asarray(gen.sample_token(key, logits, s)), minlength=4) / 4000
    np.testing.assert_allclose(counts(gen.TextSampling(1.0)), [0.1, 0.5, 0.15, 0.25], atol=0.03)
    np.testing.assert_allclose(counts(gen.TextSampling(1.0, top_k=2)), [0, 2 / 3, 0, 1 / 3],
                               atol=0.03)
    # top_p = 0.7: 0.5 + 0.25 reaches it, so {1, 3} are kept
    np.testing.assert_allclose(counts(gen.TextSampling(1.0, top_p=0.7)), [0, 2 / 3, 0, 1 / 3],
                               atol=0.03)
    hot = counts(gen.TextSampling(0.5))  # sharper: p^2 normalised
    np.testing.assert_allclose(hot, np.array([0.01, 0.25, 0.0225, 0.0625]) / 0.345, atol=0.03)


def test_bad_arguments_name_the_field():
    cfg = tiny()
    g = generator(cfg)
    prompt = text_prompts(cfg, [3])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        g(None, prompt, jax.random.key(0), max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt image shape"):
        gen.build_prompt([[np.zeros((2, 2, 3))]], cfg)
