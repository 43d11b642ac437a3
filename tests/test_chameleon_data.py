"""The Chameleon baseline on precomputed VQ code ids (data.image_source "latents"): the pipeline
carries the ids exactly (int32 `latents` [B, M, h, w]), so its batches, after the step's
conversion (models/chameleon.py: token_batch), are the ones the step makes by encoding the
pixel pipeline's images for the same seed; a tiny Chameleon trains from them; and a folder of
the other family's kind fails at start, naming data.latents_dir and both kinds.

One VQ-VAE workdir serves the file: written as train_autoencoder writes one (config.json and an
Orbax checkpoint), with random weights. Training even two steps takes 40-70 s on the 2-core
machine, and code ids need only a fixed encoder; loading a trained VQ-VAE back is
test_autoencoder_train's. It is loaded by the real loader everywhere (precompute, the trainer).
"""
import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest

from transfusion_jax import precompute
from transfusion_jax.core.config import load_config
from transfusion_jax.data import latent_records
from transfusion_jax.data.documents import DocumentBuilder, SkipDocument, image_slot
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.models import chameleon, patches_per_image
from transfusion_jax.models.autoencoder import loader
from transfusion_jax.trainers import transfusion as trainer

TINY = "experiments/chameleon.py:tiny"
NUM_DOCS = 48  # the shapes source cut short: precomputing it takes a second
IDS = (8, 8)  # the tiny preset's VQ grid: 16x16 pixels, 2x downsampling
PAD = 0


@pytest.fixture(scope="module")
def vq_dir(tiny_vq_workdir):
    """The session's tiny VQ-VAE workdir (conftest.py: random weights, a real checkpoint)."""
    return tiny_vq_workdir


def chameleon_config(vq_dir, tok_path, **data):
    config = load_config(TINY)
    config.autoencoder.checkpoint = vq_dir
    config.data.update(shapes_num_documents=NUM_DOCS, tokenizer_model=tok_path, **data)
    return config


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tok"))
    get_tokenizer(load_config(TINY).data, folder)
    return os.path.join(folder, "tokenizer.model")


@pytest.fixture(scope="module")
def ids_dir(vq_dir, tok_path, tmp_path_factory):
    """The tiny Chameleon preset's image source, precomputed as code ids. Batches of 8 images:
    the shape in which the pixel step encodes a batch (8 rows of 1 slot)."""
    out = str(tmp_path_factory.mktemp("ids") / "out")
    manifest = precompute.precompute(chameleon_config(vq_dir, tok_path), out, shards=2,
                                     batch_size=8)  # --autoencoder: config.autoencoder.checkpoint
    assert manifest["kind"] == "vq" and manifest["dtype"] == "int32"
    assert tuple(manifest["latent_shape"]) == IDS and manifest["autoencoder"]["step"] == 1
    return out


def vae_folder(ids_dir, tmp_path):
    """A copy of `ids_dir` whose manifest says VAE latents: what the checks read first."""
    folder = tmp_path / "vae_latents"
    shutil.copytree(ids_dir, folder)
    manifest = json.loads((folder / latent_records.MANIFEST).read_text())
    manifest.update(kind="vae", dtype="float32", latent_shape=[*IDS, 8])
    (folder / latent_records.MANIFEST).write_text(json.dumps(manifest))
    return str(folder)


# ---------------------------------------------------------------- the pipeline

def test_code_ids_travel_as_int32_slots():
    key, shape, dtype = image_slot(16, IDS)
    assert (key, shape, dtype) == ("latents", IDS, np.int32)
    assert image_slot(16, (8, 8, 8))[2] == np.float32 and image_slot(16)[2] == np.float32
    assert latent_records.expected_kind(IDS) == "vq"
    assert latent_records.expected_kind((8, 8, 8)) == latent_records.expected_kind(None) == "vae"
    # Ids beyond float32's exact integers (2^24) come through unchanged.
    big = np.full(IDS, 2**24 + 1, np.int32)
    stored = latent_records.payload_latents(latent_records.latents_payload(big))
    builder = DocumentBuilder(None, patches_per_image=64, image_size=16, caption_first_prob=1.0,
                              p_uncond=0.0, num_timesteps=1000, latent_shape=IDS)
    assert builder._load(stored).dtype == np.int32 and (builder._load(stored) == big).all()
    with pytest.raises(SkipDocument, match="bad_image_shape"):  # float "ids": not code ids
        builder._load(big.astype(np.float32))


def test_batches_from_ids_equal_the_step_encoding_pixels(vq_dir, ids_dir, tok_path):
    """Same seed: the precomputed pipeline's batches are the pixel pipeline's with int32 code ids
    in place of the images, and token_batch of them (the step's conversion of
    batch["latents"]) equals token_batch of the VQ-VAE's ids of the pixels (the step's
    conversion of batch["images"], codec.encode_ids)."""
    config = chameleon_config(vq_dir, tok_path)
    tok = get_tokenizer(config.data, "")
    p = patches_per_image(config.model)
    assert p == IDS[0] * IDS[1]
    pixels = make_pipeline(config.data, patches_per_image=p, tokenizer=tok, shard_index=0,
                           shard_count=1)
    stored = make_pipeline(chameleon_config(vq_dir, tok_path, image_source="latents",
                                            latents_dir=ids_dir).data,
                           patches_per_image=p, tokenizer=tok, shard_index=0, shard_count=1,
                           latent_shape=IDS)
    codec = loader.load_codec(config.autoencoder, "chameleon")
    encode = jax.jit(codec.encode_ids)
    convert = jax.jit(lambda batch, ids: chameleon.token_batch(batch, ids, config.model, PAD))
    images = 0
    for _ in range(4):
        a, b = next(pixels), next(stored)
        assert set(b) == set(a) - {"images"} | {"latents"}
        for key in set(a) - {"images"}:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
        used = a["image_mask"]
        assert b["latents"].dtype == np.int32 and b["latents"].shape == (*used.shape, *IDS)
        assert not b["latents"][~used].any()  # empty slots: zeros
        ids = encode(codec.variables, a["images"])
        np.testing.assert_array_equal(b["latents"][used], np.asarray(ids)[used])
        ta = jax.device_get(convert(a, ids))
        tb = jax.device_get(convert(b, b["latents"].astype(np.int32)))
        assert set(ta) == set(tb)
        for key in ta:
            np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
        images += int(used.sum())
        assert len(np.unique(np.asarray(ids)[used])) > 1
    assert images > 0
    assert stored.metrics() == pixels.metrics()  # same documents, skips, splits, rows
    pixels.close()
    stored.close()


@pytest.mark.slow
def test_tiny_chameleon_trains_from_code_ids(vq_dir, ids_dir, tok_path, tmp_path):
    config = chameleon_config(vq_dir, tok_path, image_source="latents", latents_dir=ids_dir)
    config.update(total_steps=2, log_every=1, checkpoint_every=2, evals={})
    config.optimizer.warmup_steps = 1
    trainer.train(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["finite"] == 1.0 and m["image_tokens"] > 0 and m["lm_loss_image"] > 0
        assert m["data/images"] > 0


# ---------------------------------------------------------------- the wrong kind

def test_the_wrong_kind_fails_at_start_naming_the_folder(vq_dir, ids_dir, tok_path, tmp_path):
    tok = get_tokenizer(chameleon_config(vq_dir, tok_path).data, "")
    vae_dir = vae_folder(ids_dir, tmp_path)

    def pipeline(folder, latent_shape, patches):
        data = chameleon_config(vq_dir, tok_path, image_source="latents", latents_dir=folder)
        return make_pipeline(data.data, patches_per_image=patches, tokenizer=tok,
                             shard_index=0, shard_count=1, latent_shape=latent_shape)

    # VQ ids given to Transfusion (a VAE latent shape, or none: Transfusion's default).
    for shape in ((8, 8, 8), None):
        with pytest.raises(ValueError, match=r"data\.latents_dir = .*: it holds 'vq' code ids "
                                             r".*model\.family = 'transfusion' reads 'vae' "
                                             r"latents"):
            pipeline(ids_dir, shape, 16)
    # VAE latents given to Chameleon.
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*vae_latents.*: it holds 'vae' "
                                         r"latents .*model\.family = 'chameleon' reads 'vq' "
                                         r"code ids"):
        pipeline(vae_dir, IDS, 64)
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*shape \(8, 8\), but the model "
                                         r"expects \(4, 4\) \(model\.latent_size, "
                                         r"model\.latent_size\)"):
        pipeline(ids_dir, (4, 4), 16)

    # The trainer: before any step, whatever else is right.
    config = chameleon_config(vq_dir, tok_path, image_source="latents", latents_dir=vae_dir)
    config.update(total_steps=2, evals={})
    config.optimizer.warmup_steps = 1
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*: it holds 'vae' latents"):
        trainer.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")

    # check_autoencoder: the VQ-VAE has no latent_stats.json; its step is what must match.
    latent_records.check_autoencoder(ids_dir, vq_dir, "vq")
    with pytest.raises(ValueError, match=r"data\.latents_dir = .*'vq' code ids.*'transfusion'"):
        latent_records.check_autoencoder(ids_dir, vq_dir)  # "vae": Transfusion's
    with pytest.raises(ValueError, match=r"autoencoder\.checkpoint = .*encoded by"):
        latent_records.check_autoencoder(ids_dir, str(tmp_path), "vq")
    stale = tmp_path / "stale"
    shutil.copytree(ids_dir, stale)
    manifest = json.loads((stale / latent_records.MANIFEST).read_text())
    manifest["autoencoder"]["step"] = 7
    (stale / latent_records.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"autoencoder\.checkpoint = .*newest checkpoint is step "
                                         r"1, the code ids .* step 7"):
        latent_records.check_autoencoder(str(stale), vq_dir, "vq")

    # precompute: a Transfusion config with a VQ-VAE, before anything is written.
    transfusion = load_config("experiments/transfusion.py:tiny")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"--autoencoder = .*a 'vq' autoencoder, but the "
                                         r"config's model\.family = 'transfusion' reads 'vae'"):
        precompute.precompute(copy.deepcopy(transfusion), str(out), autoencoder=vq_dir)
    assert not out.exists()
