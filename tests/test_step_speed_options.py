"""Step-speed options compute the same function: every `model.remat` policy and
`model.logits_chunk` give the losses and gradients of the plain step (float32, tiny config; for
`logits_chunk` both families: Transfusion's LM loss, Chameleon's LM loss, split and z-loss), and
bad values are refused naming the field. (Their speed is measured in benchmarks/, not here.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
import ml_collections

from transfusion_jax import objectives
from transfusion_jax.core import checkpoint, train_state
from transfusion_jax.core.config import load_config
from transfusion_jax.models import (Chameleon, Transfusion, build_model, chameleon,
                                    patches_per_image, transformer)
from transfusion_jax.models.transfusion import padded_vocab_size
from transfusion_jax.trainers import transfusion as trainer
from rows import build_rows

ROWS = [[[3, "image", 2], [2, "image", "image", 1]],
        [["image", 4], [5]]]
LENGTH, SLOTS = 96, 3


def setup(cfg, seed=0):
    """Model, random params, batch, x_t, t, noise."""
    batch, _ = build_rows(ROWS, LENGTH, SLOTS, patches_per_image(cfg))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    shape = (len(ROWS), SLOTS, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    x = jax.random.normal(jax.random.key(seed), shape)
    t = jax.random.randint(jax.random.key(seed + 1), shape[:2], 0, 1000)
    noise = jax.random.normal(jax.random.key(seed + 4), shape)
    params = nn.unbox(Transfusion(cfg).init(jax.random.key(2), batch, x, t))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))  # no zero-initialised outputs
    params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    return params, batch, x, t, noise


def tiny(**overrides):
    """The tiny model config; a fresh ConfigDict so that remat may be a bool (as config.json
    files of older runs hold it) where the experiment has a str."""
    cfg = load_config("experiments/transfusion.py:tiny").model.to_dict()
    return ml_collections.ConfigDict(dict(cfg, **overrides))


def loss_and_grads(cfg, params, batch, x, t, noise):
    """The trainer's loss (chunked when cfg.logits_chunk) and its gradient, jitted."""
    model = Transfusion(cfg)

    def loss(params):
        out = model.apply(params, batch, x, t, logits=not cfg.logits_chunk)
        head = lambda h: model.apply(params, h, method=Transfusion.logits_of)
        return objectives.transfusion_loss(out, batch, noise, 5.0, None, head,
                                           cfg.logits_chunk)
    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return metrics, grads


def assert_close(got, expected, rtol=1e-6):
    """Relative to each array's largest magnitude (gradients have entries near zero)."""
    def check(a, b):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(float(np.abs(b).max()), 1e-30)
        assert float(np.abs(a - b).max()) <= rtol * scale, (np.abs(a - b).max(), scale)
    jax.tree.map(check, got, expected)


@pytest.fixture(scope="module")
def reference():
    cfg = tiny(remat="none", logits_chunk=0)
    inputs = setup(cfg)
    return inputs, loss_and_grads(cfg, *inputs)


@pytest.mark.slow  # the reference fixture compiles the tiny step: 16 s before the first case
@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "offload"])  # aliases:
# test_remat_names
def test_every_remat_policy_gives_the_loss_and_gradients_of_none(reference, remat):
    inputs, (metrics, grads) = reference
    got_metrics, got_grads = loss_and_grads(tiny(remat=remat, logits_chunk=0), *inputs)
    assert_close(got_metrics, metrics)
    assert_close(got_grads, grads)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [16, 20, 96, 500])  # divides L; remainder; L; more than L
def test_chunked_logits_give_the_loss_and_gradients_of_whole_logits(reference, chunk):
    inputs, (metrics, grads) = reference
    got_metrics, got_grads = loss_and_grads(tiny(remat="none", logits_chunk=chunk), *inputs)
    assert_close(got_metrics, metrics)
    assert_close(got_grads, grads)


@pytest.mark.slow
def test_chunked_logits_with_remat_in_the_trainers_step():
    """The trainer's own step (noise, forward, backward, AdamW): the chunked, remat'd step
    gives the plain step's metrics and parameters."""
    results = []
    for remat, chunk in (("none", 0), ("full", 32)):
        config = load_config("experiments/transfusion.py:tiny")
        config.model.update(remat=remat, logits_chunk=chunk)
        model, tx = trainer.model_and_optimizer(config)
        params, batch, x, _, _ = setup(config.model)
        batch = dict(batch, images=jnp.clip(x, -1, 1))
        state = nn.unbox(trainer.make_init_fn(config, model, tx, (batch, x, batch["max_timestep"]))(
            jax.random.key(0)))
        state = state.replace(params=params["params"])
        step = jax.jit(trainer.make_train_step(config, model, tx))
        results.append(step(state, batch))
    (state_a, metrics_a), (state_b, metrics_b) = results
    for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
        np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=1e-6)
    assert_close(state_b.params, state_a.params, rtol=1e-5)
    assert train_state.all_finite(state_b.params)


def test_remat_names():
    assert transformer.remat_name(True) == "full" and transformer.remat_name(False) == "none"
    assert transformer.remat_name("True") == "full" and transformer.remat_name("false") == "none"
    for name in transformer.REMAT_POLICIES:
        assert transformer.remat_name(name) == name
    with pytest.raises(ValueError, match="model.remat='fast'"):
        transformer.remat_name("fast")


def test_offload_without_host_memory_names_the_field(monkeypatch):
    cfg = tiny(remat="offload")
    monkeypatch.setattr(transformer, "can_offload", lambda device=None: False)
    batch, _ = build_rows(ROWS, LENGTH, SLOTS, patches_per_image(cfg))  # shapes only: traced
    shape = (len(ROWS), SLOTS, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    x, t = jnp.zeros(shape), jnp.zeros(shape[:2], jnp.int32)
    params = jax.eval_shape(Transfusion(tiny()).init, jax.random.key(2), batch, x, t)
    with pytest.raises(ValueError, match="model.remat='offload'.*dots_no_batch"):
        jax.eval_shape(Transfusion(cfg).apply, params, batch, x, t)


@pytest.mark.parametrize("field,value,expected", [
    ("remat", "fast", "one of ['none', 'full', 'dots', 'dots_no_batch', 'offload'], or true/false"),
    ("remat", 1, "one of ['none', 'full'"),
    ("remat", "Full", "one of ['none', 'full'"),
    ("logits_chunk", -1, "an integer >= 0"),
    ("logits_chunk", 1.5, "an integer >= 0"),
    ("logits_chunk", True, "an integer >= 0"),
])
def test_bad_values_are_refused_naming_the_field(field, value, expected):
    config = load_config("experiments/transfusion.py:tiny").to_dict()
    config["model"][field] = value
    with pytest.raises(ValueError) as error:
        trainer.check_config(ml_collections.ConfigDict(config), jax.device_count())
    assert f"model.{field}={value!r}" in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize("remat,chunk", [(True, 0), (False, 0), ("true", 0), ("False", 0),
                                         ("dots", 128), ("offload", 0)])
def test_good_values_are_accepted(remat, chunk):
    """Including booleans (Python configs, config.json) and their words (a command-line
    override of the str field: --config.model.remat=true)."""
    config = load_config("experiments/transfusion.py:tiny").to_dict()
    config["model"].update(remat=remat, logits_chunk=chunk)
    trainer.check_config(ml_collections.ConfigDict(config), jax.device_count())


def test_chunked_terms_refuse_a_bad_chunk():
    with pytest.raises(ValueError, match="model.logits_chunk=0"):
        objectives.chunked_lm_loss_terms(jnp.zeros((1, 4, 8)), lambda h: h, jnp.zeros((1, 4), int),
                                         jnp.ones((1, 4)), 0)


def test_a_run_saved_with_boolean_remat_resumes_and_builds(tmp_path):
    """An older run's config.json (remat true, no logits_chunk) resumes under today's config,
    which may change both freely; the model reads the saved boolean as "full"."""
    saved = load_config("experiments/transfusion.py:tiny").to_dict()
    saved["model"]["remat"] = True
    del saved["model"]["logits_chunk"]
    checkpoint.write_config(str(tmp_path), ml_collections.ConfigDict(saved))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    new = load_config("experiments/transfusion.py:tiny")
    new.model.logits_chunk = 64
    changed = checkpoint.check_resume(str(tmp_path), new, trainer.RESUME_FREE)
    assert changed == []  # both free: nothing to allow
    cfg = checkpoint.read_config(str(tmp_path)).model
    assert transformer.remat_name(cfg.remat) == "full"
    new.model.dim = 32
    with pytest.raises(ValueError, match="model.dim"):
        checkpoint.check_resume(str(tmp_path), new, trainer.RESUME_FREE)


# ---------------------------------------------------------------- the Chameleon baseline's loss
# The same chunking (objectives.chunked_sums) covers Chameleon's LM loss over text and image
# tokens, its text/image split and its z-loss; checked through the trainer's own loss function.

CHAMELEON_ROWS = [[[3, "image", 2], [5]],
                  [["image", 4], [2, "image"]]]
CHAMELEON_LENGTH, CHAMELEON_SLOTS = 160, 2  # 66 elements an image (8x8 codes, BOI, EOI)


def chameleon_config(chunk, z_loss=0.1, remat="none"):
    """The tiny Chameleon config; a z_loss weight large enough that its gradient shows."""
    config = load_config("experiments/chameleon.py:tiny")
    config.model.update(remat=remat, logits_chunk=chunk)
    config.z_loss = z_loss
    return config


def chameleon_setup(config):
    """(random params, a pipeline batch with precomputed code ids as `latents`)."""
    cfg = config.model
    batch, _ = build_rows(CHAMELEON_ROWS, CHAMELEON_LENGTH, CHAMELEON_SLOTS,
                          patches_per_image(cfg))
    size = cfg.latent_size
    ids = np.random.default_rng(0).integers(0, cfg.image_vocab_size,
                                            (len(CHAMELEON_ROWS), CHAMELEON_SLOTS, size, size))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["latents"] = jnp.asarray(ids, jnp.int32)
    tokens = chameleon.token_batch(batch, batch["latents"], cfg, pad_id=0)
    params = nn.unbox(Chameleon(cfg).init(jax.random.key(2), tokens))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))  # no zero-initialised outputs
    params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    return params, batch


def chameleon_loss_fn(config):
    """params, batch -> (summarized metrics, gradients): the trainer's Chameleon parts."""
    prepare, loss_fn, summarize = trainer._chameleon_parts(config, build_model(config.model),
                                                           None)

    def run(params, batch):
        inputs, normalizers, _ = prepare(batch, jax.random.key(0), None)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *inputs,
                                                                        normalizers)
        return summarize(metrics), grads
    return run


@pytest.fixture(scope="module")
def chameleon_reference():
    """z_loss -> (params, batch, (metrics, grads)) of the whole-logits loss."""
    cache = {}

    def get(z_loss):
        if z_loss not in cache:
            config = chameleon_config(0, z_loss)
            params, batch = chameleon_setup(config)
            cache[z_loss] = params, batch, jax.jit(chameleon_loss_fn(config))(params, batch)
        return cache[z_loss]
    return get


@pytest.mark.slow
# One case: a chunk that leaves a remainder of L (the shorter last chunk), z-loss on (its
# gradient through the chunked log Z). Divisors, chunks longer than L and z_loss=0 agreed too
# when this was written (rtol 1e-5) but cost 15 s of compiling each.
@pytest.mark.parametrize("z_loss,chunk", [(0.1, 48)])
def test_chameleon_chunked_logits_give_the_loss_metrics_and_gradients_of_whole_logits(
        chameleon_reference, z_loss, chunk):
    params, batch, (metrics, grads) = chameleon_reference(z_loss)
    assert set(metrics) >= {"loss", "lm_loss", "z_loss", "lm_loss_text", "lm_loss_image",
                            "lm_loss_sum", "lm_loss_text_sum", "lm_loss_image_sum",
                            "text_tokens", "image_tokens"}
    assert metrics["image_tokens"] > 0 and metrics["text_tokens"] > 0 and metrics["z_loss"] > 0
    got_metrics, got_grads = jax.jit(chameleon_loss_fn(chameleon_config(chunk, z_loss)))(
        params, batch)
    assert set(got_metrics) == set(metrics)
    assert_close(got_metrics, metrics, rtol=1e-5)
    assert_close(got_grads, grads, rtol=1e-5)


def test_chameleon_chunked_loss_never_holds_the_whole_logits():
    """The chunked loss's program (forward and backward) has no [B, L, vocab] array; the plain
    one has."""
    for chunk in (0, 48):
        config = chameleon_config(chunk)
        params, batch = chameleon_setup(config)
        text = str(jax.make_jaxpr(chameleon_loss_fn(config))(params, batch))
        b, length = batch["tokens"].shape
        whole_shape = f"f32[{b},{length},{padded_vocab_size(config.model)}]"
        assert (whole_shape in text) == (chunk == 0), (chunk, whole_shape)


@pytest.mark.slow
def test_chameleon_chunked_logits_with_remat_in_the_trainers_step():
    """The trainer's whole Chameleon step (forward, backward, AdamW) with logits_chunk and remat
    gives the plain step's metrics and parameters."""
    results = []
    for remat, chunk in (("none", 0), ("full", 48)):
        config = chameleon_config(chunk, z_loss=1e-5, remat=remat)
        model, tx = trainer.model_and_optimizer(config)
        params, batch = chameleon_setup(config)
        state = nn.unbox(trainer.make_init_fn(config, model, tx,
                                              trainer.init_inputs(config, CHAMELEON_SLOTS))(
            jax.random.key(0)))
        state = state.replace(params=params)
        results.append(jax.jit(trainer.make_train_step(config, model, tx))(state, batch))
    (state_a, metrics_a), (state_b, metrics_b) = results
    for key in ("loss", "lm_loss", "z_loss", "lm_loss_text", "lm_loss_image", "grad_norm"):
        np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=1e-5)
    assert_close(state_b.params, state_a.params, rtol=1e-5)
    assert train_state.all_finite(state_b.params)


def test_chameleon_config_accepts_logits_chunk():
    config = load_config("experiments/chameleon.py:tiny")
    config.model.logits_chunk = 48
    trainer.check_config(config, jax.device_count())
