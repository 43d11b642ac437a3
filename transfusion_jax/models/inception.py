"""InceptionV3 as FID measures with it, in Flax Linen (NHWC).

The paper reports FID (section 4.1, "Evaluation") as everyone does: with the TensorFlow
Inception graph of Heusel et al., which pytorch-fid ports (`pytorch_fid/inception.py`:
`fid_inception_v3`, torchvision's Inception3 with the FIDInceptionA/C/E blocks). This is that
network, block for block and with torchvision's module names, so that pytorch-fid's weight file
`pt_inception-2015-12-05-6726825d.pth` loads as is (`load_inception`, without torch):

- input: `preprocess` resizes to 299x299 as F.interpolate(mode="bilinear",
  align_corners=False) does (no antialiasing) and maps [0, 1] to [-1, 1]
  (pytorch-fid's resize_input=True, normalize_input=True);
- BasicConv2d: conv without bias, BatchNorm in inference mode (eps 0.001), ReLU;
- FIDInceptionA/C/E_1 average-pool without counting the padding, FIDInceptionE_2 max-pools;
- output: the global average pool of the last block asked for. `dims` picks it as pytorch-fid's
  --dims does: 64, 192, 768 or 2048 (pool3, the FID features).
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax.models.autoencoder import weight_files

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
DIMS = {64: 0, 192: 1, 768: 2, 2048: 3}  # pytorch-fid's InceptionV3.BLOCK_INDEX_BY_DIM
SIZE = 299


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 0.001, running stats) -> ReLU."""
    features: int
    kernel: tuple = (1, 1)
    stride: int = 1
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, (self.stride, self.stride),
                    padding=[(p, p) for p in self.padding], use_bias=False,
                    precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def conv(name, features, kernel=1, stride=1, padding=0):
    return BasicConv2d(features, _pair(kernel), stride, _pair(padding), name=name)


def avg_pool3(x):  # F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool3(x, stride=2):  # F.max_pool2d(x, 3, stride) (stride 1: padding 1, FIDInceptionE_2)
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), (stride, stride), pad)


class InceptionA(nn.Module):  # FIDInceptionA
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = conv("branch1x1", 64)(x)
        b5 = conv("branch5x5_2", 64, 5, padding=2)(conv("branch5x5_1", 48)(x))
        b3 = conv("branch3x3dbl_1", 64)(x)
        b3 = conv("branch3x3dbl_3", 96, 3, padding=1)(conv("branch3x3dbl_2", 96, 3, padding=1)(b3))
        bp = conv("branch_pool", self.pool_features)(avg_pool3(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):  # torchvision's InceptionB (Mixed_6a)
    @nn.compact
    def __call__(self, x):
        b3 = conv("branch3x3", 384, 3, stride=2)(x)
        bd = conv("branch3x3dbl_2", 96, 3, padding=1)(conv("branch3x3dbl_1", 64)(x))
        bd = conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
        return jnp.concatenate([b3, bd, max_pool3(x)], -1)


class InceptionC(nn.Module):  # FIDInceptionC
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = conv("branch1x1", 192)(x)
        b7 = conv("branch7x7_1", c7)(x)
        b7 = conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = conv("branch7x7dbl_1", c7)(x)
        for i, (features, k, p) in enumerate([(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)),
                                              (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))]):
            bd = conv(f"branch7x7dbl_{i + 2}", features, k, padding=p)(bd)
        bp = conv("branch_pool", 192)(avg_pool3(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):  # torchvision's InceptionD (Mixed_7a)
    @nn.compact
    def __call__(self, x):
        b3 = conv("branch3x3_2", 320, 3, stride=2)(conv("branch3x3_1", 192)(x))
        b7 = conv("branch7x7x3_1", 192)(x)
        b7 = conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, max_pool3(x)], -1)


class InceptionE(nn.Module):  # FIDInceptionE_1 (avg pool) / FIDInceptionE_2 (max pool)
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        def split(name, y):  # a (1, 3) and a (3, 1) conv side by side
            return jnp.concatenate([conv(f"{name}a", 384, (1, 3), padding=(0, 1))(y),
                                    conv(f"{name}b", 384, (3, 1), padding=(1, 0))(y)], -1)

        b1 = conv("branch1x1", 320)(x)
        b3 = split("branch3x3_2", conv("branch3x3_1", 384)(x))
        bd = conv("branch3x3dbl_2", 384, 3, padding=1)(conv("branch3x3dbl_1", 448)(x))
        bd = split("branch3x3dbl_3", bd)
        pooled = max_pool3(x, stride=1) if self.max_pool else avg_pool3(x)
        bp = conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
    """x: [N, 299, 299, 3] in [-1, 1] (see `preprocess`) -> features [N, dims]."""
    dims: int = 2048

    @nn.compact
    def __call__(self, x):
        if self.dims not in DIMS:
            raise ValueError(f"dims={self.dims}: expected one of {sorted(DIMS)}")
        last = DIMS[self.dims]
        x = conv("Conv2d_1a_3x3", 32, 3, stride=2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = max_pool3(conv("Conv2d_2b_3x3", 64, 3, padding=1)(x))
        if last >= 1:
            x = max_pool3(conv("Conv2d_4a_3x3", 192, 3)(conv("Conv2d_3b_1x1", 80)(x)))
        if last >= 2:
            for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
                x = InceptionA(pool, name=name)(x)
            x = InceptionB(name="Mixed_6a")(x)
            for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                             ("Mixed_6e", 192)):
                x = InceptionC(c7, name=name)(x)
        if last >= 3:
            x = InceptionD(name="Mixed_7a")(x)
            x = InceptionE(False, name="Mixed_7b")(x)
            x = InceptionE(True, name="Mixed_7c")(x)
        return x.mean((1, 2))  # adaptive_avg_pool2d to 1x1 (fid_score.py pools every block)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of F.interpolate(mode="bilinear", align_corners=False) along one
    axis: source index (i + 0.5) * n_in / n_out - 0.5, clamped at 0, no antialiasing. As torch
    computes it: the scale in float32, the index as one fused multiply-add rounded to float32
    (a float64 index moves the weights by up to ~1e-5 at 300 pixels)."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32).astype(np.float64)
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m.astype(np.float32)


def preprocess(images):
    """uint8 [N, H, W, 3] (0..255) or float in [0, 1] -> float32 [N, 299, 299, 3] in [-1, 1]:
    pytorch-fid's ToTensor, resize_input and normalize_input."""
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 \
        else images.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", bilinear_matrix(x.shape[1], SIZE), x, precision=hi)
    x = jnp.einsum("pw,nowc->nopc", bilinear_matrix(x.shape[2], SIZE), x, precision=hi)
    return 2 * x - 1


def _shapes():
    """The variables' tree of shapes (the full network), without computing anything."""
    return jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))


def _torch_name(path) -> str:
    """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'"""
    *modules, leaf = [p.key for p in path[1:]]
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}[leaf]
    return ".".join(modules + [torch_leaf])


def from_state_dict(state: dict) -> dict:
    """pytorch-fid's state dict {name: numpy array} -> Flax variables {params, batch_stats}.
    Conv weights [O, I, kh, kw] become kernels [kh, kw, I, O]; fc.* (logits) is not used."""
    def convert(path, shape):
        name = _torch_name(path)
        if name not in state:
            raise ValueError(f"InceptionV3 weights: {name!r} is missing (expected pytorch-fid's "
                             f"{FID_WEIGHTS_FILE})")
        value = np.asarray(state[name], np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        if value.shape != shape.shape:
            raise ValueError(f"InceptionV3 weights: {name!r} has shape {value.shape}; "
                             f"expected {shape.shape} (as [kh, kw, in, out] for kernels)")
        return jnp.asarray(value)

    return jax.tree_util.tree_map_with_path(convert, _shapes())


def load_inception(path: str) -> dict:
    """Flax variables from pytorch-fid's weight file (a torch state dict, read without torch)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"InceptionV3 weight file {path!r} not found: FID needs pytorch-fid's "
            f"{FID_WEIGHTS_FILE}; download it from {FID_WEIGHTS_URL} and give its path "
            "(nothing is downloaded at run time)")
    return from_state_dict(weight_files.read_weights(path))


def random_variables(seed: int = 0) -> dict:
    """A random network (He-normal kernels, BatchNorm the identity): for tests and for runs
    without the weight file, whose numbers are then not FID."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(_shapes())
    rng, out = np.random.default_rng(seed), []
    for path, shape in leaves:
        leaf = path[-1].key
        if leaf == "kernel":
            fan_in = np.prod(shape.shape[:3])
            out.append(rng.standard_normal(shape.shape, np.float32) * np.sqrt(2.0 / fan_in))
        else:
            out.append(np.full(shape.shape, 1.0 if leaf in ("scale", "var") else 0.0, np.float32))
    return jax.tree.unflatten(tree, [jnp.asarray(a) for a in out])
