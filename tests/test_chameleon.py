"""The Chameleon baseline: its batch (images as code ids in `tokens`) checked element by element
against the contract, the norm re-ordering and z-loss switches, and a tiny run that trains,
resumes bit for bit and reads its images through the VQ-VAE."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax import objectives
from transfusion_jax.core import sharding
from transfusion_jax.core.config import load_config
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.inference.loading import load_for_inference
from transfusion_jax.models import Chameleon, build_model, chameleon, patches_per_image
from transfusion_jax.models.transformer import Block
from transfusion_jax.trainers import transfusion as trainer

TINY = "experiments/chameleon.py:tiny"
PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def pipeline_batch(tmp_path_factory):
    """(config, one pipeline batch of the tiny Chameleon preset, code ids for its slots)."""
    cfg = load_config(TINY)
    tok = get_tokenizer(cfg.data, str(tmp_path_factory.mktemp("tok")))
    pipe = make_pipeline(cfg.data, patches_per_image=patches_per_image(cfg.model),
                         tokenizer=tok, shard_index=0, shard_count=1)
    batch = next(pipe)
    pipe.close()
    b, m = batch["image_mask"].shape
    size = cfg.model.latent_size
    ids = np.random.default_rng(0).integers(0, cfg.model.image_vocab_size, (b, m, size, size))
    return cfg, batch, ids.astype(np.int32)


def test_token_batch_follows_the_contract_element_by_element(pipeline_batch):
    """Images as offset code ids in raster order between BOI and EOI, patch_index -1,
    mask_pos = index; the target of every element is the next element of its document (image
    tokens and EOI included), weight 1 there; padding weighs 0. Written from the rows'
    document structure (BOI ... EOI), not from the function's own gathers."""
    cfg, batch, ids = pipeline_batch
    out = jax.device_get(chameleon.token_batch(batch, jnp.asarray(ids), cfg.model, PAD))
    offset, p = chameleon.text_vocab_size(cfg.model), chameleon.tokens_per_image(cfg.model)
    assert offset == cfg.model.vocab_size - cfg.model.image_vocab_size
    b, length = batch["tokens"].shape
    images_seen = 0
    for r in range(b):
        tok, seg = batch["tokens"][r], batch["segment_ids"][r]
        expected, slot, i = tok.copy(), 0, 0
        while i < length:
            if tok[i] == BOI and seg[i] > 0:
                expected[i + 1:i + 1 + p] = offset + ids[r, slot].reshape(-1)
                assert tok[i + 1 + p] == EOI
                slot, i, images_seen = slot + 1, i + p + 2, images_seen + 1
            else:
                i += 1
        np.testing.assert_array_equal(out["tokens"][r], expected)
        for q in range(length):
            same = q + 1 < length and seg[q + 1] == seg[q] != 0
            assert out["targets"][r, q] == (expected[q + 1] if same else PAD), (r, q)
            assert out["text_weights"][r, q] == float(same), (r, q)
            next_image = same and expected[q + 1] >= offset
            assert out["image_weights"][r, q] == float(next_image), (r, q)
    assert images_seen > 0
    assert np.all(out["patch_index"] == -1)
    np.testing.assert_array_equal(out["mask_pos"], np.broadcast_to(np.arange(length), (b, length)))
    np.testing.assert_array_equal(out["positions"], batch["positions"])
    np.testing.assert_array_equal(out["segment_ids"], batch["segment_ids"])
    assert out["tokens"].max() < cfg.model.vocab_size


@pytest.mark.slow
def test_norm_reorder_normalises_each_branch_output():
    """With norm_reorder the attention branch adds norm(attn(x)): with the MLP branch's norm
    scale 0 and the attention norm scale s, every element moves by a vector of RMS s exactly.
    Llama's pre-norm (the default) does not."""
    cfg = load_config(TINY).model
    x = jax.random.normal(jax.random.key(0), (2, 16, cfg.dim))
    seg = jnp.ones((2, 16), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def moved_rms(reorder):
        c = cfg.copy_and_resolve_references()
        c.norm_reorder = reorder
        block = Block(c)
        params = block.init(jax.random.key(1), x, seg, pos, pos)["params"]
        params = jax.tree_util.tree_map_with_path(
            lambda path, v: (jnp.zeros_like(v) if "mlp_norm" in str(path)
                             else 0.7 * jnp.ones_like(v) if "attn_norm" in str(path) else v),
            params)
        y, _ = block.apply({"params": params}, x, seg, pos, pos)
        return jnp.sqrt(jnp.mean(jnp.square(y - x), axis=-1))

    np.testing.assert_allclose(moved_rms(True), 0.7, rtol=1e-3)  # eps 1e-5 in the norm
    assert not np.allclose(moved_rms(False), 0.7, rtol=1e-2)


def test_z_loss_and_the_loss_split():
    """z-loss = mean over weighted elements of logsumexp(logits)^2 (brute force); the total is
    LM + weight * z; the text and image parts add up to the LM sum."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 6, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 6)).astype(np.int32)
    weights = (rng.random((2, 6)) < 0.7).astype(np.float32)
    image_weights = weights * (rng.random((2, 6)) < 0.5)
    batch = {"targets": targets, "text_weights": weights, "image_weights": image_weights}
    loss, m = objectives.chameleon_loss(jnp.asarray(logits), batch, z_loss=0.1)
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    n = weights.sum()
    np.testing.assert_allclose(m["z_loss"], (log_z ** 2 * weights).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(m["lm_loss"], (ce * weights).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(loss, m["lm_loss"] + 0.1 * m["z_loss"], rtol=1e-6)
    np.testing.assert_allclose(m["lm_loss_image_sum"], (ce * image_weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(m["lm_loss_text_sum"] + m["lm_loss_image_sum"], m["lm_loss_sum"])
    assert m["text_tokens"] + m["image_tokens"] == n


def test_config_is_the_matched_transfusion_config_but_for_the_baseline_fields():
    """experiments/chameleon.py at a size = experiments/transfusion.py at that size, except the
    fields the baseline changes (so a sweep compares the two at the same data and compute)."""
    for size in ("tiny", "demo", "0.16b", "7b"):
        c = load_config(f"experiments/chameleon.py:{size}")
        t = load_config(f"experiments/transfusion.py:{size}")
        assert c.seed == t.seed
        # The demo is matched in time on the 2-core CPU (experiments/chameleon.py: DEMO_STEPS),
        # the other sizes in steps.
        assert c.total_steps == (540 if size == "demo" else t.total_steps)
        for key in ("seed", "text_source", "image_source", "caption_first_prob", "p_uncond",
                    "text_to_patch_ratio", "image_size", "batch_size", "tokenizer_vocab_size"):
            assert c.data[key] == t.data[key], (size, key)
        assert c.data.mix_patches_per_image == patches_per_image(t.model)
        for key in ("dim", "depth", "heads", "mlp_dim", "rope_theta", "dtype"):
            if size == "demo" and key in ("dim", "heads", "mlp_dim"):
                continue  # the Chameleon demo keeps its measured 4 x 128 (DEMO_MODEL)
            assert c.model[key] == t.model[key], (size, key)
        if size == "demo":
            assert (c.model.dim, c.model.heads, c.model.mlp_dim) == (128, 4, 512)
        assert c.model.vocab_size == t.model.vocab_size + c.model.image_vocab_size
        assert (c.model.family, c.model.qk_norm, c.model.norm_reorder) == ("chameleon", True, True)
        assert c.z_loss == 1e-5 and c.autoencoder.kind == "vq"
        assert c.model.latent_size * c.autoencoder.downsample == c.data.image_size
        if size in ("0.16b", "7b"):
            assert c.optimizer.lr == 1e-4 and t.optimizer.lr == 3e-4
            assert chameleon.tokens_per_image(c.model) == 1024  # 256x256 at 8x (paper 4.2)
            assert c.model.image_vocab_size == 16384


def test_chameleon_rejects_images_as_latents():
    cfg = load_config(TINY).model
    model = Chameleon(cfg)
    batch = {k: jnp.zeros((1, 8), jnp.int32) for k in
             ("tokens", "segment_ids", "positions", "mask_pos", "patch_index")}
    with pytest.raises(ValueError, match="token ids"):
        model.init(jax.random.key(0), batch, jnp.zeros((1, 1, 8, 8, 8)), jnp.zeros((1, 1)))
    assert isinstance(build_model(cfg), Chameleon)


@pytest.fixture(scope="module")
def tiny_vq(tiny_vq_workdir):
    return tiny_vq_workdir


def _tiny_config(vq, **overrides):
    config = load_config(TINY)
    config.autoencoder.checkpoint = vq
    config.total_steps = 4
    config.checkpoint_every = 2
    config.optimizer.warmup_steps = 1
    config.evals = {}
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.slow
def test_tiny_chameleon_trains_and_resumes_bit_for_bit(tiny_vq, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    trainer.train(_tiny_config(tiny_vq), straight)
    # Stopped at a step that is no checkpoint_every multiple (3; checkpoints every 2): the stop's
    # checkpoint must hold that step's data state (a read-ahead batch once made resumes skip one).
    trainer.train(_tiny_config(tiny_vq, stop_at_step=3), resumed)
    trainer.train(_tiny_config(tiny_vq), resumed)

    def lines(workdir):
        with open(f"{workdir}/metrics.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items()
                     if k.endswith("loss") or k in ("step", "grad_norm", "data/images")}
                    for line in f]

    a, b = lines(straight), lines(resumed)
    assert [m["step"] for m in a] == [1, 2, 3, 4] and a == b
    assert all(m["lm_loss"] > 0 and m["z_loss"] > 0 for m in a)
    _, pa = load_for_inference(straight)
    _, pb = load_for_inference(resumed)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert np.array_equal(x, y)


@pytest.mark.slow
def test_the_step_reads_images_through_the_vq_encoder(tiny_vq, pipeline_batch):
    """The step's image tokens are the VQ-VAE's code ids of the batch's pixels: its image loss
    equals the model's cross-entropy on token_batch(batch, codec.encode_ids(pixels))."""
    from transfusion_jax.models.autoencoder import loader
    cfg, batch, _ = pipeline_batch
    cfg = _tiny_config(tiny_vq)
    codec = loader.load_codec(cfg.autoencoder, "chameleon")
    model, tx = trainer.model_and_optimizer(cfg)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(cfg.sharding_rules)):
        state = jax.jit(trainer.make_init_fn(cfg, model, tx, trainer.init_inputs(cfg, 1)))(
            jax.random.key(0))
        state = nn.unbox(state)
        _, metrics = jax.jit(trainer.make_train_step(cfg, model, tx, codec))(
            state, batch, codec.variables)
        ids = codec.encode_ids(codec.variables, jnp.asarray(batch["images"]))
        tokens = chameleon.token_batch(batch, ids, cfg.model, PAD)
        logits = model.apply({"params": state.params}, tokens)["logits"]
        _, ref = objectives.chameleon_loss(logits, tokens, cfg.z_loss)
    assert ids.shape == batch["images"].shape[:2] + (cfg.model.latent_size,) * 2
    np.testing.assert_allclose(metrics["lm_loss_image_sum"], ref["lm_loss_image_sum"], rtol=1e-5)
    assert float(metrics["image_tokens"]) == float(batch["image_mask"].sum()) * \
        chameleon.tokens_per_image(cfg.model)


def _streams(cfg, tok, rows):
    """(text elements in row order, images in slot order) of the first `rows` rows of a config's
    pipeline: what remains of the documents once packing is undone."""
    pipe = make_pipeline(cfg.data, patches_per_image=patches_per_image(cfg.model), tokenizer=tok,
                         shard_index=0, shard_count=1)
    text, images = [], []
    for _ in range(rows // cfg.data.batch_size):
        batch = next(pipe)
        for r in range(cfg.data.batch_size):
            keep = (batch["segment_ids"][r] > 0) & (batch["patch_index"][r] < 0)
            text.extend(batch["tokens"][r][keep].tolist())
            images.extend(batch["images"][r][batch["image_mask"][r]])
    pipe.close()
    return text, images


def test_matched_pair_reads_the_same_documents_in_the_same_order(tmp_path):
    """For one seed the Transfusion and Chameleon pipelines of a size yield the same documents
    in the same order: the same text and the same images, though rows differ (an image is 16
    patches in one, 64 code ids in the other, so Chameleon's rows hold fewer documents)."""
    t_cfg, c_cfg = load_config("experiments/transfusion.py:tiny"), load_config(TINY)
    assert patches_per_image(t_cfg.model) != patches_per_image(c_cfg.model)
    tok = get_tokenizer(t_cfg.data, str(tmp_path))
    t_text, t_images = _streams(t_cfg, tok, 16)
    c_text, c_images = _streams(c_cfg, tok, 48)
    n_text, n_images = min(len(t_text), len(c_text)), min(len(t_images), len(c_images))
    assert n_text > 500 and n_images > 20, (n_text, n_images)
    assert t_text[:n_text] == c_text[:n_text]
    for a, b in zip(t_images[:n_images], c_images[:n_images]):
        np.testing.assert_array_equal(a, b)
    # Without the matched mix (an image counted as its own 64 tokens) the documents differ.
    c_cfg.data.mix_patches_per_image = 0
    other_text, _ = _streams(c_cfg, tok, 48)
    assert other_text[:n_text] != t_text[:n_text]
