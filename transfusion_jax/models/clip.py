"""CLIP (Radford et al., 2021) as open_clip builds it, in Flax Linen (NHWC), for the CLIP score
(evaluators/clip_score.py): the image and text towers, their weights from an open_clip checkpoint
that the user gives (read without torch; never downloaded), CLIP's BPE tokenizer and open_clip's
image preprocessing.

- Architectures: `ARCHS`, keyed by open_clip's model names; ViT-B/32 ("ViT-B-32") is the
  default, "ViT-L-14" works as well. The activation is not in the weights: checkpoints trained
  with QuickGELU (OpenAI's own, LAION-400M's) need the "-quickgelu" name, as in open_clip.
- Towers: open_clip's VisionTransformer (patch conv without bias, class token, learned
  positions, ln_pre, pre-norm residual blocks, ln_post on the class token, `proj`) and its text
  transformer (token and position embeddings, causal blocks, ln_final, the features at the
  end-of-text token, the highest id of each row, then `text_projection`). LayerNorm eps 1e-5,
  exact (erf) GELU or QuickGELU, float32 with the highest matmul precision.
- Weights: `load_clip` reads open_clip's state dict (open_clip_pytorch_model.bin, a torch.save
  file, or open_clip_model.safetensors; models/autoencoder/weight_files.py) and maps each tensor
  by name (`from_state_dict`), checking every shape against the architecture asked for.
- Tokenizer: `Tokenizer` is open_clip's SimpleTokenizer (clean="lower") over its BPE merges file
  bpe_simple_vocab_16e6.txt.gz (shipped inside the open_clip package; the user gives its path):
  ftfy's fix_text (when ftfy is installed; otherwise `_fix_text`'s subset), HTML unescaped twice,
  whitespace collapsed, lower case, the regex split without the `regex` package (`_pieces`),
  byte-level BPE, <start_of_text> ... <end_of_text>, zero-padded to 77; a longer text is cut
  and ends with <end_of_text>. `HashTokenizer` stands in for it without the BPE file, for a
  random-weight CLIP only (a pipeline check): pieces hashed to ids between the same markers.
- Random weights: `random_variables(config, seed)`, Flax's initialisation of the architecture
  (no file), for tests and the pipeline check `clip_score_random_weights` (not a CLIP score).
- Preprocessing: `resize_and_crop` is open_clip's eval transform, to the pixel (torchvision's
  Resize(224, bicubic) on a PIL image, i.e. PIL's resize with the shortest side to 224, and
  CenterCrop(224)); `normalize` is ToTensor and Normalize with OpenAI's mean and std (or
  Inception's 0.5, which some LAION checkpoints use, e.g. ViT-L-14 laion2b_s32b_b82k).
"""
import dataclasses
import gzip
import hashlib
import html
import os
import pickle
import unicodedata
from functools import lru_cache

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from transfusion_jax.models.autoencoder import weight_files

HIGHEST = jax.lax.Precision.HIGHEST
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
NORMALIZATIONS = {"openai": (OPENAI_MEAN, OPENAI_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD)}


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """One architecture, as open_clip's model config JSON gives it (vision_heads: the width over
    the head width, 64; 80 for ViT-H-14)."""
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    quick_gelu: bool = False


def _vit(embed, size, patch, width, layers, heads, t_width, t_layers, t_heads, quick=False):
    return ClipConfig(embed, size, patch, width, layers, heads, t_width, t_layers, t_heads,
                      quick_gelu=quick)


ARCHS = {  # open_clip/model_configs/<name>.json
    "ViT-B-32": _vit(512, 224, 32, 768, 12, 12, 512, 12, 8),
    "ViT-B-32-quickgelu": _vit(512, 224, 32, 768, 12, 12, 512, 12, 8, quick=True),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, 12, 512, 12, 8),
    "ViT-B-16-quickgelu": _vit(512, 224, 16, 768, 12, 12, 512, 12, 8, quick=True),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-L-14-quickgelu": _vit(768, 224, 14, 1024, 24, 16, 768, 12, 12, quick=True),
    "ViT-L-14-336": _vit(768, 336, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-L-14-336-quickgelu": _vit(768, 336, 14, 1024, 24, 16, 768, 12, 12, quick=True),
    "ViT-H-14": _vit(1024, 224, 14, 1280, 32, 16, 1024, 24, 16),  # head width 80
}
DEFAULT_ARCH = "ViT-B-32"


def arch(name) -> ClipConfig:
    """ARCHS[name] (a ClipConfig passes through), or a ValueError naming the known ones."""
    if isinstance(name, ClipConfig):
        return name
    if name not in ARCHS:
        raise ValueError(f"CLIP model {name!r}: expected one of {sorted(ARCHS)} (open_clip's "
                         "model names; '-quickgelu' for checkpoints trained with QuickGELU)")
    return ARCHS[name]


# ---------------------------------------------------------------------------------- network

def _layer_norm(name):
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


def _dense(features, name):
    return nn.Dense(features, precision=HIGHEST, name=name)


class Attention(nn.Module):
    """torch.nn.MultiheadAttention (self-attention): one in_proj for q, k, v; out_proj."""
    width: int
    heads: int

    @nn.compact
    def __call__(self, x, causal: bool):
        b, n, _ = x.shape
        d = self.width // self.heads
        q, k, v = jnp.split(_dense(3 * self.width, "in_proj")(x), 3, -1)
        q, k, v = (t.reshape(b, n, self.heads, d) for t in (q, k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / np.sqrt(d)
        if causal:
            logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v, precision=HIGHEST)
        return _dense(self.width, "out_proj")(out.reshape(b, n, self.width))


class Mlp(nn.Module):
    width: int
    hidden: int
    quick_gelu: bool

    @nn.compact
    def __call__(self, x):
        x = _dense(self.hidden, "c_fc")(x)
        x = x * jax.nn.sigmoid(1.702 * x) if self.quick_gelu else jax.nn.gelu(x, approximate=False)
        return _dense(self.width, "c_proj")(x)


class ResidualAttentionBlock(nn.Module):
    width: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool

    @nn.compact
    def __call__(self, x, causal: bool):
        x = x + Attention(self.width, self.heads, name="attn")(_layer_norm("ln_1")(x), causal)
        mlp = Mlp(self.width, int(self.width * self.mlp_ratio), self.quick_gelu, name="mlp")
        return x + mlp(_layer_norm("ln_2")(x))


class Transformer(nn.Module):
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool
    causal: bool

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.width, self.heads, self.mlp_ratio, self.quick_gelu,
                                       name=f"resblocks_{i}")(x, self.causal)
        return x


class VisionTransformer(nn.Module):
    """Normalized images [N, S, S, 3] -> image features [N, embed_dim] (not L2-normalized)."""
    config: ClipConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        grid = c.image_size // c.patch_size
        x = nn.Conv(c.vision_width, (c.patch_size, c.patch_size), (c.patch_size, c.patch_size),
                    padding="VALID", use_bias=False, precision=HIGHEST, name="conv1")(x)
        x = x.reshape(x.shape[0], grid * grid, c.vision_width)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.vision_width,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.vision_width)), x], 1)
        x = x + self.param("positional_embedding", nn.initializers.normal(0.01),
                           (grid * grid + 1, c.vision_width))
        x = _layer_norm("ln_pre")(x)
        x = Transformer(c.vision_width, c.vision_layers, c.vision_heads, c.mlp_ratio,
                        c.quick_gelu, causal=False, name="transformer")(x)
        x = _layer_norm("ln_post")(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(0.02), (c.vision_width, c.embed_dim))
        return jnp.dot(x, proj, precision=HIGHEST)


class CLIP(nn.Module):
    """open_clip's CLIP: `encode_image(images)` and `encode_text(ids)` -> features
    [N, embed_dim], L2-normalized (encode_*(..., normalize=True) in open_clip)."""
    config: ClipConfig

    def setup(self):
        c = self.config
        self.visual = VisionTransformer(c)
        self.token_embedding = nn.Embed(c.vocab_size, c.text_width)
        self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                               (c.context_length, c.text_width))
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.mlp_ratio,
                                       c.quick_gelu, causal=True)
        self.ln_final = _layer_norm(None)
        self.text_projection = self.param("text_projection", nn.initializers.normal(0.02),
                                          (c.text_width, c.embed_dim))

    def encode_image(self, images):
        return _l2_normalize(self.visual(images))

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x))
        x = x[jnp.arange(x.shape[0]), jnp.argmax(ids, -1)]  # the end-of-text token: highest id
        return _l2_normalize(jnp.dot(x, self.text_projection, precision=HIGHEST))

    def __call__(self, images, ids):
        return self.encode_image(images), self.encode_text(ids)


def _l2_normalize(x):  # F.normalize(x, dim=-1): x / max(||x||, 1e-12)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------- weights

def _shapes(config: ClipConfig):
    """The variables' tree of shapes, without computing anything."""
    c = config
    return jax.eval_shape(CLIP(c).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, c.image_size, c.image_size, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, c.context_length), jnp.int32))


def _torch_name(path) -> str:
    """('params', 'visual', 'transformer', 'resblocks_0', 'attn', 'in_proj', 'kernel') ->
    'visual.transformer.resblocks.0.attn.in_proj_weight'; ('params', 'ln_final', 'scale') ->
    'ln_final.weight'."""
    *modules, leaf = [p.key for p in path[1:]]
    modules = [m.replace("resblocks_", "resblocks.") for m in modules]
    torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    if modules and modules[-1] == "in_proj":  # nn.MultiheadAttention's in_proj_weight / _bias
        return ".".join(modules[:-1] + [f"in_proj_{torch_leaf}"])
    return ".".join(modules + [torch_leaf])


_UNUSED = ("logit_scale", "logit_bias", "attn_mask", "text.attn_mask", "visual.attn_mask")


def from_state_dict(state: dict, config=DEFAULT_ARCH) -> dict:
    """open_clip's state dict {name: numpy array} -> Flax variables of CLIP(config). Linear
    weights [out, in] become kernels [in, out], the patch conv [O, I, kh, kw] becomes
    [kh, kw, I, O]; logit_scale is not used. A missing tensor, one of another shape, or one this
    network has no place for (another kind of open_clip model) is an error naming it."""
    config = arch(config)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # open_clip's DDP checkpoints
    used = set()

    def convert(path, shape):
        name = _torch_name(path)
        if name not in state:
            raise ValueError(f"CLIP weights: {name!r} is missing (expected open_clip's state dict "
                             f"of a {_describe(config)})")
        value = np.asarray(state[name], np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif path[-1].key == "kernel":
            value = value.T
        if value.shape != shape.shape:
            raise ValueError(f"CLIP weights: {name!r} has shape {value.shape}; the "
                             f"{_describe(config)} expects {shape.shape} (as Flax lays it out): "
                             "the file is another architecture; choose the matching model name")
        used.add(name)
        return jnp.asarray(value)

    variables = jax.tree_util.tree_map_with_path(convert, _shapes(config))
    extra = sorted(set(state) - used - set(_UNUSED))
    if extra:
        raise ValueError(f"CLIP weights: {len(extra)} tensors this {_describe(config)} does not "
                         f"use, e.g. {extra[:4]}: not a plain open_clip ViT CLIP of that "
                         "architecture")
    return variables


def _describe(config: ClipConfig) -> str:
    names = [k for k, v in ARCHS.items() if v == config]
    return f"CLIP {names[0]}" if names else f"CLIP ({config})"


def load_clip(path: str, config=DEFAULT_ARCH) -> dict:
    """Flax variables from an open_clip checkpoint file (open_clip_pytorch_model.bin or
    open_clip_model.safetensors; a training checkpoint's "state_dict" works too), without torch."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weight file {path!r} not found ({WEIGHTS_HELP})")
    try:
        state = weight_files.read_weights(path)
    except pickle.UnpicklingError as e:
        raise ValueError(f"CLIP weight file {path!r}: {e}; OpenAI's TorchScript files are not "
                         "read: take open_clip's copy of those weights (the '-quickgelu' model, "
                         "open_clip_pytorch_model.bin of the hub repo "
                         "timm/vit_base_patch32_clip_224.openai)") from None
    return from_state_dict(state, config)


WEIGHTS_HELP = (
    "an open_clip checkpoint: open_clip_pytorch_model.bin or open_clip_model.safetensors, e.g. "
    "the file open_clip.create_model_and_transforms('ViT-B-32', pretrained='laion2b_s34b_b79k') "
    "downloads into its Hugging Face cache (hub repo laion/CLIP-ViT-B-32-laion2B-s34B-b79K); "
    "nothing is downloaded at run time")
VOCAB_HELP = (
    f"CLIP's BPE merges file {VOCAB_FILE}, which ships inside the open_clip package "
    "(python -c 'import open_clip.tokenizer as t; print(t.default_bpe())') and in OpenAI's CLIP "
    "repository (clip/bpe_simple_vocab_16e6.txt.gz)")


def random_variables(config=DEFAULT_ARCH, seed: int = 0) -> dict:
    """A random network (for tests and pipeline checks; its scores mean nothing)."""
    c = arch(config)
    return jax.jit(CLIP(c).init)(
        jax.random.key(seed), jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32),
        jnp.zeros((1, c.context_length), jnp.int32))


# -------------------------------------------------------------------------------- tokenizer

@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) map of the 256 bytes to printable characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_SPECIALS = ("<start_of_text>", "<end_of_text>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_FOLD = {**{c: c + 32 for c in range(ord("A"), ord("Z") + 1)}, 0x17F: ord("s")}  # IGNORECASE
_SINGLE_QUOTES = dict.fromkeys(map(ord, "\u02bc\u2018\u2019\u201a\u201b"), "'")
_DOUBLE_QUOTES = dict.fromkeys(map(ord, "\u201c\u201d\u201e\u201f"), '"')
_WIDTH = {0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(i)) != chr(i)}}


def _fix_text(text: str) -> str:
    """ftfy.fix_text when ftfy is installed (open_clip's basic_clean); otherwise what it changes
    in well-formed text: curly quotes, full-width forms, NFC (its mojibake repair is skipped)."""
    try:
        import ftfy
    except ImportError:
        text = text.translate(_SINGLE_QUOTES).translate(_DOUBLE_QUOTES).translate(_WIDTH)
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def _kind(c: str) -> str:
    """The class of one character in CLIP's split pattern (`regex`, IGNORECASE):
    L = \\p{L}, N = \\p{N}, S = \\s (not matched: skipped), O = the rest. The four controls are
    not \\s for `regex` (str.isspace says they are); U+0345 matches no class there."""
    cat = unicodedata.category(c)
    if cat[0] == "L":
        return "L"
    if cat[0] == "N":
        return "N"
    if (c.isspace() and c not in "\x1c\x1d\x1e\x1f") or c == "\u0345":
        return "S"
    return "O"


def _pieces(text: str) -> list[str]:
    """re.findall(<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
    [^\\s\\p{L}\\p{N}]+, text) as `regex` gives it, without `regex` (to the Unicode version of
    Python's unicodedata)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] in "'<":  # the literal alternatives, first; case-insensitive as in `regex`
            match = next((len(s) for s in _SPECIALS + _CONTRACTIONS
                          if text[i:i + len(s)].translate(_FOLD) == s), 0)
            if match:
                out.append(text[i:i + match])
                i += match
                continue
        kind = _kind(text[i])
        j = i + 1
        if kind in "LO":
            while j < n and _kind(text[j]) == kind:
                j += 1
        if kind != "S":
            out.append(text[i:j])
        i = j
    return out


class HashTokenizer:
    """The stand-in for `Tokenizer` where CLIP's BPE file is not at hand, for a random-weight
    CLIP only (the pipeline check `clip_score_random_weights`, whose numbers mean nothing, so the
    tokenizer's exactness means nothing either): the text cleaned as `Tokenizer` cleans it (HTML
    unescaped, whitespace collapsed, lower case), split by CLIP's pattern (`_pieces`), each piece
    mapped to an id by a stable hash (the first 8 bytes of its SHA-256, modulo vocab_size - 2),
    between <start_of_text> (vocab_size - 2) and <end_of_text> (vocab_size - 1, the highest id,
    where the text tower reads its features), zero-padded to context_length; a longer text is
    cut and ends with <end_of_text>. Deterministic across processes and machines (not Python's
    salted hash()). Same interface as `Tokenizer`: `encode(text)`, `__call__(texts)`."""

    def __init__(self, context_length: int = 77, vocab_size: int = 49408):
        if vocab_size < 3:
            raise ValueError(f"HashTokenizer: vocab_size={vocab_size}; expected >= 3")
        self.sot, self.eot = vocab_size - 2, vocab_size - 1
        self.vocab_size, self.context_length = vocab_size, context_length

    def encode(self, text: str) -> list[int]:
        text = " ".join(html.unescape(html.unescape(text)).split()).lower()
        return [int.from_bytes(hashlib.sha256(piece.encode("utf-8")).digest()[:8], "little")
                % (self.vocab_size - 2) for piece in _pieces(text)]

    def __call__(self, texts, context_length: int | None = None) -> np.ndarray:
        return _rows(self, texts, context_length or self.context_length)


def _rows(tokenizer, texts, length: int) -> np.ndarray:
    """Texts -> int32 [N, length]: <start_of_text> ids <end_of_text>, zero-padded; a longer
    text is cut and ends with <end_of_text> (open_clip's tokenize)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = np.zeros((len(texts), length), np.int32)
    for row, text in zip(out, texts):
        ids = [tokenizer.sot] + tokenizer.encode(text) + [tokenizer.eot]
        if len(ids) > length:
            ids = ids[:length - 1] + [tokenizer.eot]
        row[:len(ids)] = ids
    return out


class Tokenizer:
    """open_clip's SimpleTokenizer (clean="lower"), from CLIP's BPE merges file: `encode(text)`
    -> BPE ids; `__call__(texts)` -> int32 [N, context_length]."""

    def __init__(self, vocab_path: str, context_length: int = 77):
        if not vocab_path or not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"CLIP vocabulary file {vocab_path!r} not found ({VOCAB_HELP})")
        try:
            with gzip.open(vocab_path) as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"CLIP vocabulary file {vocab_path!r}: not a gzipped BPE merges file "
                             f"({e}); expected {VOCAB_HELP}") from None
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
        if len(merges) != 49152 - 256 - 2 or any(len(m) != 2 for m in merges):
            raise ValueError(f"CLIP vocabulary file {vocab_path!r}: {len(merges)} merges, or a "
                             f"malformed line; expected {VOCAB_HELP}")
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + list(_SPECIALS)
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in _SPECIALS}
        self.sot, self.eot = self.encoder[_SPECIALS[0]], self.encoder[_SPECIALS[1]]
        self.vocab_size, self.context_length = len(self.encoder), context_length

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(_fix_text(text))).strip()
        text = " ".join(text.split()).strip().lower()
        ids = []
        for piece in _pieces(text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def __call__(self, texts, context_length: int | None = None) -> np.ndarray:
        return _rows(self, texts, context_length or self.context_length)


# --------------------------------------------------------------------------- preprocessing

def resize_and_crop(image, size: int = 224) -> np.ndarray:
    """One image (uint8 [H, W, 3] or a PIL image) -> uint8 [size, size, 3]: open_clip's eval
    transform up to ToTensor (torchvision's Resize(size, bicubic) on a PIL image: the shortest
    side to `size`, the other int(size * long / short); CenterCrop(size); RGB)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def normalize(images, mean=OPENAI_MEAN, std=OPENAI_STD):
    """uint8 [N, S, S, 3] -> float32, as ToTensor (/255) and Normalize((x - mean) / std)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
