"""The Transfusion model: information flow, packing, implementations, sharding, sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from transfusion_jax import objectives as losses
from transfusion_jax.core import sharding
from transfusion_jax.core.config import load_config
from transfusion_jax.models import Transfusion, patches_per_image
from transfusion_jax.models.patching import patchify
from rows import brute_force_mask, build_rows

ROWS = [[[3, "image", 2], [2, "image", "image", 1]],
        [["image", 4], [5]]]
LENGTH, SLOTS = 96, 3


def tiny(**overrides):
    cfg = load_config("experiments/transfusion.py:tiny").model
    cfg.update(overrides)
    return cfg


def setup_model(cfg, rows=ROWS, length=LENGTH, slots=SLOTS, seed=0):
    """Model, random params (no zero-initialised output layers), batch, x_t, t."""
    p = patches_per_image(cfg)
    batch, info = build_rows(rows, length, slots, p)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    shape = (len(rows), slots, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    x = jax.random.normal(jax.random.key(seed), shape)
    t = jax.random.randint(jax.random.key(seed + 1), shape[:2], 0, 1000)
    model = Transfusion(cfg)
    params = nn.unbox(model.init(jax.random.key(2), batch, x, t))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = tree.unflatten([a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    return model, params, batch, info, x, t


def _patch_outputs(eps, cfg, info, batch):
    """eps [B,M,H,W,C] -> per element of the row its patch's output [B, L, k*k*C] (0 for text)."""
    b, m = eps.shape[:2]
    k = cfg.patch_size
    grid = patchify(eps.reshape(b * m, *eps.shape[2:]), k).reshape(b, -1, k * k * cfg.latent_channels)
    index = np.maximum(np.asarray(batch["patch_index"]), 0)
    out = np.take_along_axis(np.asarray(grid), index[..., None], axis=1)
    return np.where((info["image"] >= 0)[..., None], out, 0.0)


def _changed(apply, o1, batch2, x2, t2, cfg, info, batch):
    """bool [B, L]: which elements' outputs (logits for text, eps for patches) changed."""
    o2 = apply(batch2, x2, t2)
    is_text = info["image"] < 0
    d_logits = np.abs(np.asarray(o1["logits"] - o2["logits"])).max(-1)
    d_eps = np.abs(_patch_outputs(o1["prediction"], cfg, info, batch)
                   - _patch_outputs(o2["prediction"], cfg, info, batch)).max(-1)
    diff = np.where(is_text, d_logits, d_eps)
    valid = info["doc"] > 0
    return (diff > 1e-5) & valid, diff


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_perturbing_one_element_changes_exactly_what_may_see_it(attention):
    cfg = tiny(attention=attention, attention_block=32)
    model, params, batch, info, x, t = setup_model(cfg)
    apply = jax.jit(lambda b, x, t: model.apply(params, b, x, t))
    base = apply(batch, x, t)
    allowed = brute_force_mask(info)  # [B, q, k]
    k = cfg.patch_size
    checked = {"text": 0, "patch": 0}
    for r in range(len(ROWS)):
        for j in np.flatnonzero(info["doc"][r] > 0):
            batch2, x2 = dict(batch), x
            if info["image"][r, j] < 0:
                batch2["tokens"] = batch["tokens"].at[r, j].set((batch["tokens"][r, j] + 7) % 500)
                kind = "text"
            else:  # move the latent pixels under this patch
                slot, p = divmod(int(batch["patch_index"][r, j]), patches_per_image(cfg))
                gy, gx = divmod(p, cfg.latent_size // k)
                x2 = x.at[r, slot, gy * k:(gy + 1) * k, gx * k:(gx + 1) * k].add(1.0)
                kind = "patch"
            changed, diff = _changed(apply, base, batch2, x2, t, cfg, info, batch)
            expect = np.zeros_like(changed)
            expect[r] = allowed[r, :, j] & (info["doc"][r] > 0)
            assert np.array_equal(changed, expect), (kind, r, j, np.argwhere(changed != expect))
            # Elements that may not see j are bit-for-bit unaffected.
            assert np.all(diff[~expect] < 1e-6)
            checked[kind] += 1
    assert checked["text"] > 20 and checked["patch"] > 50


@pytest.mark.slow
def test_document_packed_with_others_equals_document_alone():
    cfg = tiny()
    p = patches_per_image(cfg)
    doc = [2, "image", 3, "image", 1]
    packed_rows = [[[4, "image"], doc, [3]]]
    model, params, batch, info, x, t = setup_model(cfg, packed_rows)
    alone, info_alone = build_rows([[doc]], LENGTH, SLOTS, p)
    where = np.flatnonzero(info["doc"][0] == 2)
    n = len(where)
    for key in ("tokens", "targets"):  # the same random text as in the packed row
        alone[key][0, :n] = batch[key][0, where]
    alone = {k: jnp.asarray(v) for k, v in alone.items()}
    # The document's images sit in slots 1, 2 when packed, 0, 1 alone.
    x_alone = jnp.zeros_like(x).at[:, :2].set(x[:, 1:3])
    t_alone = jnp.zeros_like(t).at[:, :2].set(t[:, 1:3])
    out = model.apply(params, batch, x, t)
    ref = model.apply(params, alone, x_alone, t_alone)
    np.testing.assert_allclose(out["logits"][0, where], ref["logits"][0, :n], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["prediction"][0, 1:3], ref["prediction"][0, :2], atol=1e-5, rtol=1e-5)
    assert np.array_equal(info_alone["doc"][0, :n], np.full(n, 1))


def _loss_fn(model, batch, x, t):
    def loss(params):
        out = model.apply(params, batch, x, t)
        return losses.transfusion_loss(out, batch, jnp.ones_like(out["prediction"]))[0]
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("patch", ["linear"])  # the patch layers do not touch attention
def test_blockwise_model_equals_dense_in_values_and_gradients(patch):
    dense = tiny(patch=patch)
    model_d, params, batch, info, x, t = setup_model(dense)
    model_b = Transfusion(tiny(patch=patch, attention="blockwise", attention_block=16))
    out_d, out_b = model_d.apply(params, batch, x, t), model_b.apply(params, batch, x, t)
    for key in ("logits", "prediction"):
        np.testing.assert_allclose(out_b[key], out_d[key], atol=1e-5, rtol=1e-5)
    g_d = jax.jit(jax.grad(_loss_fn(model_d, batch, x, t)))(params)
    g_b = jax.jit(jax.grad(_loss_fn(model_b, batch, x, t)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4), g_d, g_b)


@pytest.mark.slow
@pytest.mark.parametrize("patch", ["linear", "unet"])
def test_sharded_forward_on_2x2x2_mesh_equals_single_device(patch):
    cfg = load_config(f"experiments/transfusion.py:tiny,patch={patch}")
    rows = ROWS * 2  # batch of 4: divisible by data * fsdp = 4
    model, params, batch, info, x, t = setup_model(cfg.model, rows)
    expected = jax.jit(model.apply)(params, batch, x, t)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch, x, t)
    param_shardings = sharding.logical_shardings(abstract, mesh, cfg.sharding_rules)
    assert any(s.spec != jax.sharding.PartitionSpec() and "tensor" in str(s.spec)
               for s in jax.tree.leaves(param_shardings)), "expected tensor-sharded params"
    data = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(cfg.sharding_rules)):
        sharded_params = jax.device_put(params, param_shardings)
        args = jax.device_put((batch, x, t), data)
        got = jax.jit(model.apply)(sharded_params, *args)
    assert len(got["logits"].sharding.device_set) == 8
    for key in ("logits", "prediction"):
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5, rtol=1e-5)


def _transformer_params(cfg):
    b, l, m = 1, 8, 1
    batch = {k: jnp.zeros((b, l), jnp.int32) for k in
             ("tokens", "segment_ids", "positions", "mask_pos", "patch_index")}
    batch["patch_positions"] = jnp.zeros((b, m, patches_per_image(cfg)), jnp.int32)
    x = jnp.zeros((b, m, cfg.latent_size, cfg.latent_size, cfg.latent_channels))
    shapes = jax.eval_shape(Transfusion(cfg).init, jax.random.key(0), batch, x,
                            jnp.zeros((b, m), jnp.int32))["params"]
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
    patch = count(shapes["patch_encoder"]) + count(shapes["patch_decoder"])
    return count(shapes) - patch, patch


@pytest.mark.parametrize("size,billions", [("0.16b", 0.16), ("0.37b", 0.37), ("0.76b", 0.76),
                                           ("1.4b", 1.4), ("7b", 7.0)])
def test_table2_parameter_counts(size, billions):
    cfg = load_config(f"experiments/transfusion.py:{size}").model
    transformer, linear_patch = _transformer_params(cfg)
    print(f"{size}: transformer {transformer / 1e9:.3f}B, linear patch layers {linear_patch / 1e6:.2f}M")
    assert abs(transformer / (billions * 1e9) - 1) < 0.05
    assert linear_patch / transformer < 0.005  # paper 4.1: under 0.5% of the total


def test_unet_patch_layers_at_paper_scale():
    cfg = load_config("experiments/transfusion.py:7b,patch=unet,patch_size=2").model
    assert (cfg.latent_size, cfg.latent_channels) == (32, 8)
    _, unet = _transformer_params(cfg)
    print(f"U-Net patch layers at latent 32x32x8, 2x2 patches, D=4096: {unet / 1e9:.3f}B "
          "(paper: 0.27B)")
    assert abs(unet / 0.27e9 - 1) < 0.10


@pytest.mark.parametrize("k,elements", [(1, 1024), (2, 256), (4, 64), (8, 16)])
@pytest.mark.parametrize("patch", ["linear", "unet"])
def test_elements_per_256px_image(k, elements, patch):
    cfg = load_config(f"experiments/transfusion.py:tiny,patch={patch},patch_size={k}").model
    cfg.update(latent_size=32, latent_channels=8)  # a 256x256 image through the 8x VAE
    assert patches_per_image(cfg) == elements
    from transfusion_jax.models.patching import patch_layers
    encoder, _ = patch_layers(cfg)
    x = jnp.zeros((2, 32, 32, 8))
    t = jnp.zeros((2,), jnp.int32)
    grid, _ = jax.eval_shape(lambda: encoder.init_with_output(jax.random.key(0), x, t)[0])
    assert grid.shape == (2, 32 // k, 32 // k, cfg.dim) and grid.shape[1] * grid.shape[2] == elements


def test_wrong_latent_shape_names_the_fields():
    cfg = tiny()  # shapes only: the check runs when the model is traced
    batch, _ = build_rows(ROWS, LENGTH, SLOTS, patches_per_image(cfg))
    shape = (len(ROWS), SLOTS, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    x, t = jnp.zeros(shape), jnp.zeros(shape[:2], jnp.int32)
    model = Transfusion(cfg)
    params = jax.eval_shape(model.init, jax.random.key(2), batch, x, t)
    with pytest.raises(ValueError, match="model.latent_size"):
        jax.eval_shape(model.apply, params, batch, x[:, :, :4], t)
    with pytest.raises(ValueError, match="a divisor of the batch's 2 rows"):  # grouped layout
        jax.eval_shape(model.apply, params, batch, jnp.zeros((3, *shape[1:])),
                       jnp.zeros((3, SLOTS), jnp.int32))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_outputs():
    cfg = tiny(dtype="bfloat16")
    model, params, batch, info, x, t = setup_model(cfg)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    out = model.apply(params, batch, x, t)
    ref = Transfusion(tiny()).apply(params, batch, x, t)
    assert out["logits"].dtype == jnp.float32 and np.all(np.isfinite(out["logits"]))
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=0.1, rtol=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_kernel_model_equals_dense(impl, monkeypatch):
    """The whole model with a fused kernel (Pallas interpreter on CPU) against dense; a spy
    makes sure the kernel ran, not the blockwise fallback. (Gradients: tests/test_attention.py,
    through the same `attend`.)"""
    from transfusion_jax.models import attention_gpu, attention_tpu
    module, name = {"splash": (attention_tpu, "splash_attention"),
                    "pallas_gpu": (attention_gpu, "range_attention")}[impl]
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    model_d, params, batch, info, x, t = setup_model(tiny(), length=128)
    model_k = Transfusion(tiny(attention=impl, attention_block=128))
    out_d, out_k = model_d.apply(params, batch, x, t), model_k.apply(params, batch, x, t)
    assert calls, f"{impl} never ran"
    for key in ("logits", "prediction"):
        np.testing.assert_allclose(out_k[key], out_d[key], atol=2e-5, rtol=2e-5)
