"""U-Net patch encoder/decoder: shapes, conditioning, skips, self-attention, per-image
independence, sharding annotations, parameter count at paper scale, bfloat16."""
import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from transfusion_jax.models.unet import UNET_PRESETS, AttentionBlock, UNetDown, UNetUp, unet_config
from transfusion_jax.core.sharding import DEFAULT_RULES

N, H, C, D = 3, 8, 4, 32


def make(k, dtype=jnp.float32, dim=D, channels=C, preset="tiny"):
    cfg = unet_config(preset, k)
    return (UNetDown(dim=dim, patch_size=k, dtype=dtype, **cfg),
            UNetUp(out_channels=channels, patch_size=k, dtype=dtype, **cfg))


def inputs(seed=0, n=N, h=H, c=C):
    kx, kt = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, h, h, c)), jax.random.randint(kt, (n,), 0, 1000)


@functools.lru_cache(maxsize=None)
def abstract(k, dtype=jnp.float32):
    """Modules and the shapes of their (boxed) variables; no allocation, no RNG compile."""
    down, up = make(k, dtype)
    x, t = inputs()
    vd = jax.eval_shape(down.init, jax.random.key(1), x, t)
    h, skips = jax.eval_shape(down.apply, vd, x, t)
    vu = jax.eval_shape(up.init, jax.random.key(2), h, skips, t)
    return down, up, vd, vu


def randomized(variables, seed):
    """Unboxed params drawn with numpy, every leaf non-zero (so no zero-initialised conv hides an
    effect). Compiling the modules' own RNG init costs seconds per module on CPU; this costs
    nothing, and the real init is exercised once in test_real_init."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = math.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 25.0
        return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(fan_in), jnp.float32)

    return jax.tree.map(draw, nn.unbox(variables))


def random_pair(k, seed=0, dtype=jnp.float32):
    down, up, vd, vu = abstract(k, dtype)
    return down, up, randomized(vd, seed), randomized(vu, seed + 1)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_shapes(k):
    down, up, pd, pu = random_pair(k)
    x, t = inputs()
    h, skips = jax.jit(down.apply)(pd, x, t)
    assert h.shape == (N, H // k, H // k, D)
    assert len(skips) == (int(math.log2(k)) + 1) * (down.num_res_blocks + 1)
    eps = jax.jit(up.apply)(pu, h, skips, t)
    assert eps.shape == (N, H, H, C) and eps.dtype == jnp.float32
    assert np.all(np.isfinite(eps))


@pytest.mark.slow
def test_real_init():
    """The modules' own init (rbg keys: threefry init compiles several times slower on CPU)."""
    down, up, vd_shape, vu_shape = abstract(2)
    x, t = inputs()
    vd = jax.jit(down.init)(jax.random.key(1, impl="rbg"), x, t)
    h, skips = jax.jit(down.apply)(vd, x, t)
    vu = jax.jit(up.init)(jax.random.key(2, impl="rbg"), h, skips, t)
    for real, shape in ((vd, vd_shape), (vu, vu_shape)):
        assert jax.tree.structure(real) == jax.tree.structure(shape)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(real)))
    assert np.all(np.isfinite(h)) and np.std(h) > 0
    # ADM zero-initialises the last conv: the untrained decoder predicts eps = 0.
    assert not np.any(np.asarray(jax.jit(up.apply)(vu, h, skips, t)))


def test_bad_fields_raise():
    x, t = inputs()
    with pytest.raises(ValueError, match="channel_mult"):
        UNetDown(dim=D, patch_size=4, base_channels=8, channel_mult=(1, 2),
                 num_res_blocks=1).init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="channel_mult"):
        UNetUp(out_channels=C, patch_size=1, base_channels=8, channel_mult=(1, 2),
               num_res_blocks=1).init(jax.random.key(0), x, (x,), t)
    with pytest.raises(ValueError, match="patch_size"):
        UNetDown(dim=D, patch_size=3, base_channels=8, channel_mult=(1, 2),
                 num_res_blocks=1).init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="x: got shape"):
        UNetDown(dim=D, patch_size=16, base_channels=8, channel_mult=(1,) * 5,
                 num_res_blocks=1).init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="preset"):
        unet_config("huge", 2)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetDown(dim=D, patch_size=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(2,)).init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="attention_head_channels"):
        UNetDown(dim=D, patch_size=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), attention_head_channels=5).init(jax.random.key(0), x, t)


def test_every_skip_changes_eps():
    down, up, pd, params = random_pair(4, seed=3)
    x, t = inputs()
    h, skips = jax.jit(down.apply)(pd, x, t)
    apply = jax.jit(up.apply)
    base = apply(params, h, skips, t)
    for i in range(len(skips)):
        bumped = skips[:i] + (skips[i] + 1.0,) + skips[i + 1:]
        assert not np.allclose(apply(params, h, bumped, t), base), f"skip {i} is unused"


def test_timestep_conditions_both_halves():
    down, up, pd, pu = random_pair(2, seed=4)
    x, _ = inputs()
    t0, t1 = jnp.full((N,), 10), jnp.full((N,), 500)
    h0, skips = jax.jit(down.apply)(pd, x, t0)
    h1, _ = jax.jit(down.apply)(pd, x, t1)
    assert not np.allclose(h0, h1)
    up_apply = jax.jit(up.apply)
    assert not np.allclose(up_apply(pu, h0, skips, t0), up_apply(pu, h0, skips, t1))


@pytest.mark.slow  # test-fast stays under 2 minutes
def test_images_are_independent():
    down, up, pd, pu = random_pair(2, seed=6)

    @jax.jit
    def run(x, t):
        h, skips = down.apply(pd, x, t)
        return h, up.apply(pu, h, skips, t)

    x, t = inputs()
    h, eps = run(x, t)
    h2, eps2 = run(x.at[1].add(1.0), t)
    for a, b in ((h, h2), (eps, eps2)):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a[2], b[2], rtol=1e-6, atol=1e-6)
        assert not np.allclose(a[1], b[1])


def test_attention_blocks_where_improved_ddpm_has_them():
    """ADM self-attention after every ResBlock of the levels >= 1, in both halves (improved
    DDPM's 16x16 and 8x8 on 32x32 inputs); none at the latent's own resolution."""
    assert unet_config("tiny", 2)["attention_levels"] == (1,)
    assert unet_config("paper", 8)["attention_levels"] == (1, 2, 3)
    assert unet_config("paper", 1)["attention_levels"] == ()
    _, _, vd, vu = abstract(4)  # levels 0, 1, 2; one ResBlock per level (tiny)
    down, up = set(vd["params"]), set(vu["params"])
    assert {n for n in down if "_attn" in n} == {"down1_attn0", "down2_attn0"}
    assert {n for n in up if "_attn" in n} == {"up1_attn0", "up1_attn1", "up2_attn0",
                                               "up2_attn1"}


def test_attention_block_equals_a_reference():
    """GroupNorm, q/k/v, softmax over all positions of the image per head, projection,
    residual: numpy against the module (randomized params: the projection is zero at init)."""
    block = AttentionBlock(head_channels=8)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    params = randomized(jax.eval_shape(block.init, jax.random.key(0), x), 1)
    got = np.asarray(jax.jit(block.apply)(params, x))
    p = params["params"]
    xs = np.asarray(x, np.float64).reshape(2, 16, 32)
    groups = xs.reshape(2, 16, 32, 1)  # gcd(32, 32) = 32 groups of one channel
    mean, var = groups.mean(axis=1, keepdims=True), groups.var(axis=1, keepdims=True)
    y = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(2, 16, 32)
    y = y * np.asarray(p["norm"]["scale"]) + np.asarray(p["norm"]["bias"])
    qkv = y @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])
    q, k, v = np.split(qkv.reshape(2, 16, 12, 8), 3, axis=2)  # 4 heads of 8 channels
    s = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(8)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("nhqk,nkhd->nqhd", a, v).reshape(2, 16, 32)
    want = xs + o @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
    np.testing.assert_allclose(got.reshape(2, 16, 32), want, atol=1e-4, rtol=1e-4)
    # Each image on its own: the second image does not change the first's output.
    other = np.asarray(jax.jit(block.apply)(params, x.at[1].add(1.0)))
    np.testing.assert_allclose(other[0], got[0], atol=1e-6)


@pytest.mark.slow
def test_every_param_gets_gradient():
    down, up, pd, pu = random_pair(2, seed=8)
    x, t = inputs()
    w = jax.random.normal(jax.random.key(8), x.shape)

    def loss(pd, pu):
        h, skips = down.apply(pd, x, t)
        return jnp.sum(w * up.apply(pu, h, skips, t))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(pd, pu)
    dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
            if not np.any(np.asarray(g))]
    assert not dead, f"params with zero gradient: {dead}"


def test_partition_specs():
    _, _, vd, vu = abstract(4)
    known = {name for name, _ in DEFAULT_RULES}
    for variables in (vd, vu):
        specs = nn.get_partition_spec(variables)
        is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
        pairs = zip(jax.tree.leaves(nn.unbox(variables)), jax.tree.leaves(specs, is_leaf=is_spec))
        for leaf, spec in pairs:
            assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == leaf.ndim
            assert set(spec) - {None} <= known, spec
            names = [a for a in spec if a is not None]
            assert len(names) == len(set(names)), f"flax rejects repeated names: {spec}"
    down_specs = nn.get_partition_spec(vd)["params"]["proj_out"]
    up_specs = nn.get_partition_spec(vu)["params"]["proj_in"]
    assert tuple(down_specs["kernel"]) == ("channels", "embed")
    assert tuple(down_specs["bias"]) == ("embed",)
    assert tuple(up_specs["kernel"]) == ("embed", "channels")
    conv = nn.get_partition_spec(vd)["params"]["conv_in"]["kernel"]
    assert tuple(conv) == ("conv_h", "conv_w", "channels_in", "channels")


def paper_count(dim, k=2):
    """Encoder + decoder parameters at latent 32x32x8, counted from shapes only."""
    down, up = make(k, dim=dim, channels=8, preset="paper")
    x = jax.ShapeDtypeStruct((1, 32, 32, 8), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    vd = jax.eval_shape(down.init, jax.random.key(0), x, t)
    h, skips = jax.eval_shape(down.apply, vd, x, t)
    vu = jax.eval_shape(up.init, jax.random.key(0), h, skips, t)
    return sum(leaf.size for leaf in jax.tree.leaves(nn.unbox((vd, vu))))


def test_paper_parameter_count():
    counts = {dim: paper_count(dim) for dim in (768, 2048, 4096)}
    print("U-Net enc+dec params at 32x32x8, k=2:",
          {dim: f"{n / 1e9:.4f}B" for dim, n in counts.items()})
    assert abs(counts[4096] - 0.27e9) <= 0.1 * 0.27e9
    # "roughly independent of the transformer size": only the two D projections change.
    assert counts[4096] - counts[768] < 0.03 * counts[4096]


@pytest.mark.slow  # test-fast stays under 2 minutes
def test_bfloat16_compute_float32_params():
    down, up, vd, vu = abstract(2, jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox((vd, vu))))
    _, _, pd, pu = random_pair(2, seed=11, dtype=jnp.bfloat16)
    x, t = inputs()
    h, skips = jax.jit(down.apply)(pd, x, t)
    eps = jax.jit(up.apply)(pu, h, skips, t)
    assert h.dtype == jnp.bfloat16 and eps.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(eps, np.float32)))


def test_presets_truncate_channel_mult():
    for k, levels in ((1, 1), (2, 2), (4, 3), (8, 4)):
        for name in UNET_PRESETS:
            assert len(unet_config(name, k)["channel_mult"]) == levels
