"""Mixed-modal generation (paper section 3, "Inference"), on a functional KV cache.

LM mode samples text tokens one at a time. When a row samples BOI it switches to diffusion mode:
P noise patches are denoised against the cached prefix (the prefix is causal, so its keys and
values never change while the image is denoised: each step runs only the P patches, which see the
prefix and each other), then one pass writes the finished image (at t = 0, as a finished image is
read in training's t = 0 limit) and EOI into the cache, and LM mode resumes. Any mixture of text
and images comes out; every shape is static and the whole loop is one jitted `lax.while_loop`.

Rows carry their own state (cache length, mode, counts), so prompts of different lengths and rows
in different modes share a batch. Classifier-free guidance doubles the rows: rows [0, B) are the
conditional generation, rows [B, 2B) the same generation with the prompt replaced by `uncond`
(for text to image: BOS BOI); both run in one forward and eps = eps_u + s (eps_c - eps_u).

    gen = Generator(config.model, schedule, Specials.from_tokenizer(tok), ImageSampling(...))
    out = gen(params, build_prompt(rows, config.model, specials), key, max_new_tokens=64)

The Chameleon baseline (model.family "chameleon", paper section 4.2) runs through the same
`Generator` and `build_prompt`: an image is `tokens_per_image` VQ code ids in the token stream,
sampled one token at a time (`Generator._generate_tokens`, its docstring has the rules); prompt
images are code-id grids [h, w] and `Generation.images` holds the generated code ids.

Tasks built on it (text to image, captions, grids) are in inference/tasks.py; the command line
is `python -m transfusion_jax.generate --workdir DIR`.
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax import diffusion
from transfusion_jax.models import Transfusion, build_model, family, patches_per_image
from transfusion_jax.models import attention
from transfusion_jax.models.chameleon import text_vocab_size, tokens_per_image
from transfusion_jax.models.kv_cache import KVCache, advance, init_cache


@dataclasses.dataclass(frozen=True)
class Specials:
    """The reserved token ids (batch contract); ours are PAD=0, BOS=1, EOS=2, BOI=3, EOI=4."""
    pad: int = 0
    bos: int = 1
    eos: int = 2
    boi: int = 3
    eoi: int = 4

    @classmethod
    def from_tokenizer(cls, tok) -> "Specials":
        return cls(tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id)


@dataclasses.dataclass(frozen=True)
class TextSampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off


@dataclasses.dataclass(frozen=True)
class ImageSampling:
    sampler: str = "ddpm"     # diffusion.SAMPLERS
    steps: int = 250          # the paper's DDPM-250
    eta: float = 0.0          # DDIM only
    clip_x0: float = 0.0      # > 0: clip predicted x0 (pixel models: 1), see diffusion.sampler_tables
    prediction: str = "eps"   # what the model's diffusion head predicts (config.diffusion.prediction)


class Prompt(NamedTuple):
    """Per row one document from cache index 0: batch-contract arrays [B, Lp] (no targets or
    weights), clean image latents [B, M, H, W, C] (None without images) and lengths [B]."""
    chunk: dict
    images: jax.Array | None
    lengths: jax.Array


# Chameleon's image tokens: plain sampling at temperature 1 (Generator._generate_tokens).
IMAGE_TOKENS = TextSampling(temperature=1.0)


class Generation(NamedTuple):
    """Transfusion: `tokens` int32 [B, max_new_tokens] (text, BOI/EOI around each image; PAD
    after), `images` float32 [B, max(max_images, 1), H, W, C] (the generated latents x0, in
    order). Chameleon: `tokens` int32 [B, max_new_tokens + max(max_images, 1) * P] (the whole
    stream: text, and BOI, the image's P = tokens_per_image ids (text_vocab_size + code), EOI for
    each image), `images` int32 [B, max(max_images, 1), h, w] (each image's code ids, the
    VQ-VAE's, without the offset: Codec.decode_ids takes them). `num_tokens` and `num_images`
    int32 [B] count what is in use."""
    tokens: jax.Array
    num_tokens: jax.Array
    images: jax.Array
    num_images: jax.Array


# ---------------------------------------------------------------------------------------------
# Prompts and chunks (numpy / jnp arrays in cache coordinates, see kv_cache.py).

def build_prompt(rows, cfg, specials: Specials = Specials(), length: int | None = None) -> Prompt:
    """rows: per row a list of parts, each a sequence of token ids or an image: a latent
    [H, W, C] (Transfusion) or the VQ-VAE's code ids [h, w] (Chameleon, model.family; they become
    the text elements BOI, text_vocab_size + code in raster order, EOI, and the Prompt has no
    images). BOS is prepended, images are wrapped in BOI ... EOI; a row may end with
    [specials.boi] to ask for an image first. Rows are padded to `length` (default: the
    longest)."""
    p, size, ch = patches_per_image(cfg), cfg.latent_size, cfg.latent_channels
    codes = _code_image(cfg) if family(cfg) == "chameleon" else None
    elements = [_row_elements(parts, p, (size, size, ch), specials, codes) for parts in rows]
    lengths = [len(e) for e, _ in elements]
    length = length or max(lengths)
    if max(lengths) > length:
        raise ValueError(f"build_prompt: a row has {max(lengths)} elements; length={length}")
    m = max(len(imgs) for _, imgs in elements)
    b = len(rows)
    chunk = {k: np.zeros((b, length), np.int32) for k in
             ("tokens", "segment_ids", "positions", "mask_pos")}
    chunk["patch_index"] = np.full((b, length), -1, np.int32)
    chunk["patch_positions"] = np.zeros((b, max(m, 1), p), np.int32)
    images = np.zeros((b, max(m, 1), size, size, ch), np.float32)
    for r, (elems, imgs) in enumerate(elements):
        for i, (token, slot, patch) in enumerate(elems):
            chunk["tokens"][r, i], chunk["segment_ids"][r, i], chunk["positions"][r, i] = token, 1, i
            chunk["mask_pos"][r, i] = i if slot < 0 else i + p - 1 - patch
            if slot >= 0:
                chunk["patch_index"][r, i] = slot * p + patch
                chunk["patch_positions"][r, slot, patch] = i
        if imgs:
            images[r, :len(imgs)] = np.stack(imgs)
    chunk["mask_pos"][chunk["segment_ids"] == 0] = np.nonzero(chunk["segment_ids"] == 0)[1]
    return Prompt({k: jnp.asarray(v) for k, v in chunk.items()},
                  jnp.asarray(images) if m else None, jnp.asarray(lengths, jnp.int32))


def _code_image(cfg):
    """(first image id, codebook size, grid shape) of a Chameleon config."""
    return text_vocab_size(cfg), cfg.image_vocab_size, (cfg.latent_size, cfg.latent_size)


def _code_elements(arr, codes, specials):
    """A Chameleon prompt image (code ids [h, w]) -> its text elements BOI, ids, EOI."""
    offset, count, shape = codes
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"prompt image {arr.dtype} {arr.shape}: a Chameleon prompt image is the "
                         f"VQ-VAE's code ids, int {shape} (model.latent_size^2; Codec.encode_ids)")
    if arr.min() < 0 or arr.max() >= count:
        raise ValueError(f"prompt image code ids in [{arr.min()}, {arr.max()}]: expected "
                         f"0 .. {count - 1} (model.image_vocab_size={count})")
    return ([(specials.boi, -1, 0)] + [(offset + int(c), -1, 0) for c in arr.reshape(-1)]
            + [(specials.eoi, -1, 0)])


def _row_elements(parts, p, image_shape, specials, codes=None):
    """[(token, slot or -1, patch)], [images] of one row; `codes` (_code_image): a Chameleon
    row, whose images are code-id grids."""
    elems, imgs = [(specials.bos, -1, 0)], []
    for part in parts:
        arr = np.asarray(part)
        if codes is not None and arr.ndim == 2 and arr.size:
            elems += _code_elements(arr, codes, specials)
        elif codes is None and arr.ndim == 3:
            if arr.shape != image_shape:
                raise ValueError(f"prompt image shape {arr.shape}: expected {image_shape} "
                                 "(model.latent_size, latent_size, latent_channels)")
            elems += [(specials.boi, -1, 0)] + [(specials.pad, len(imgs), j) for j in range(p)]
            elems.append((specials.eoi, -1, 0))
            imgs.append(arr)
        elif arr.ndim == 1 or arr.size == 0:
            elems += [(int(t), -1, 0) for t in arr.reshape(-1)]
        else:
            image = (f"an image's code ids {codes[2]}" if codes is not None
                     else f"an image latent {image_shape}")
            raise ValueError(f"prompt part of shape {arr.shape}: expected token ids [n] or "
                             f"{image}")
    return elems, imgs


def text_chunk(tokens, start, active):
    """One text element per row at `start` [B]; inactive rows write an empty (segment 0) slot."""
    b = tokens.shape[0]
    pos = start[:, None]
    return {"tokens": tokens[:, None], "segment_ids": active.astype(jnp.int32)[:, None],
            "positions": pos, "mask_pos": pos, "patch_index": jnp.full((b, 1), -1, jnp.int32)}


def image_chunk(start, active, p: int, eoi: int | None = None):
    """P patches (and EOI when `eoi` is given) per row at `start` [B]; one image slot."""
    b, n = start.shape[0], p + (eoi is not None)
    idx = jnp.arange(n, dtype=jnp.int32)
    is_patch = idx < p
    return {"tokens": jnp.broadcast_to(jnp.where(is_patch, 0, 0 if eoi is None else eoi), (b, n)).astype(jnp.int32),
            "segment_ids": jnp.broadcast_to(active.astype(jnp.int32)[:, None], (b, n)),
            "positions": start[:, None] + idx,
            "mask_pos": start[:, None] + jnp.where(is_patch, p - 1, idx),
            "patch_index": jnp.broadcast_to(jnp.where(is_patch, idx, -1), (b, n)),
            "patch_positions": jnp.broadcast_to(idx[:p], (b, 1, p))}


# ---------------------------------------------------------------------------------------------
# The cached model calls. `model` is a Transfusion (or, for prefill and decode_text, a
# Chameleon: the same extend signature); every function is pure.

def pad_chunk(chunk, multiple: int):
    """A prompt chunk padded with empty elements (segment 0) to a multiple of `multiple`, so a
    fused attention kernel can tile it (attention.kernel_tile). The padding writes empty cache
    slots past each row's length, which later chunks overwrite."""
    length = chunk["tokens"].shape[1]
    extra = -length % multiple
    if not extra:
        return chunk
    out = {}
    for key, x in chunk.items():
        if key == "patch_positions":
            out[key] = x
        elif key == "mask_pos":  # padding: its own index, as build_prompt writes it
            idx = jnp.arange(length, length + extra, dtype=x.dtype)
            out[key] = jnp.concatenate([x, jnp.broadcast_to(idx, (x.shape[0], extra))], 1)
        else:
            fill = -1 if key == "patch_index" else 0
            out[key] = jnp.pad(x, ((0, 0), (0, extra)), constant_values=fill)
    return out


def prefill(model, params, cache: KVCache, prompt: Prompt):
    """Write the prompts at index 0 -> (cache, logits [B, V] after each row's last element).
    The chunk is padded to the attention kernel's tile, if it has one, so prefill runs fused."""
    tile = attention.kernel_tile(model.cfg.attention)
    if tile and cache.capacity >= -(-prompt.chunk["tokens"].shape[1] // tile) * tile:
        prompt = prompt._replace(chunk=pad_chunk(prompt.chunk, tile))
    images, t = prompt.images, None
    if images is not None:
        t = jnp.zeros(images.shape[:2], jnp.int32)  # prompt images are clean (t = 0)
    out, cache = model.apply(params, prompt.chunk, images, t, cache, method=type(model).extend)
    last = jnp.take_along_axis(out["logits"], (prompt.lengths - 1)[:, None, None], axis=1)
    return advance(cache, prompt.lengths), last[:, 0]


def decode_text(model, params, cache: KVCache, tokens, active):
    """Append one token per active row -> (cache, logits [B, V] after it)."""
    out, cache = model.apply(params, text_chunk(tokens, cache.length, active), None, None, cache,
                             method=type(model).extend)
    return advance(cache, active.astype(jnp.int32)), out["logits"][:, 0]


def denoise(model, params, cache: KVCache, x_t, t, active):
    """The diffusion head's output (eps, v or x0: config.diffusion.prediction) for the noisy
    image x_t [B, H, W, C] at timestep t (scalar or [B]), placed at each row's `length`
    against the cached prefix. The cache is not changed (the patches are written only into the
    copy this call attends to)."""
    p = patches_per_image(model.cfg)
    timesteps = jnp.broadcast_to(jnp.reshape(t, (-1, 1)), (x_t.shape[0], 1)).astype(jnp.int32)
    out, _ = model.apply(params, image_chunk(cache.length, active, p), x_t[:, None], timesteps,
                         cache, logits=False, method=Transfusion.extend)
    return out["prediction"][:, 0]


def commit_image(model, params, cache: KVCache, x0, active, eoi: int):
    """Write the finished image (t = 0) and EOI for active rows -> (cache, logits after EOI)."""
    p = patches_per_image(model.cfg)
    t = jnp.zeros((x0.shape[0], 1), jnp.int32)
    out, cache = model.apply(params, image_chunk(cache.length, active, p, eoi), x0[:, None], t,
                             cache, method=Transfusion.extend)
    return advance(cache, (p + 1) * active.astype(jnp.int32)), out["logits"][:, p]


def guided(eps_c, eps_u, scale):
    """Classifier-free guidance: eps_u + s (eps_c - eps_u); s = 1 is the conditional model.
    Applied to v or x0 outputs alike: both are affine in eps at a given x_t, so guiding them
    guides eps the same way."""
    return eps_u + scale * (eps_c - eps_u)


def sample_image(model, params, cache: KVCache, key, active, tables, guidance=None):
    """Denoise one image per row against the cache -> x0 [B, H, W, C] (B = the conditional rows).
    With `guidance` (a scale) the cache holds 2B rows, the unconditional ones second."""
    cfg = model.cfg
    double = guidance is not None
    b = active.shape[0] // (2 if double else 1)
    key_noise, key_sampler = jax.random.split(key)
    x_T = jax.random.normal(key_noise, (b, cfg.latent_size, cfg.latent_size, cfg.latent_channels))

    def eps_fn(x, t):
        if not double:
            return denoise(model, params, cache, x, t, active)
        eps = denoise(model, params, cache, jnp.concatenate([x, x]), t, active)
        return guided(eps[:b], eps[b:], guidance)

    return diffusion.sample(eps_fn, x_T, key_sampler, tables)


# ---------------------------------------------------------------------------------------------
# Text sampling.

def sample_token(key, logits, sampling: TextSampling, banned=None):
    """One token per row from logits [B, V]; `banned` bool [B, V] or [V] is never sampled."""
    logits = logits.astype(jnp.float32)
    if banned is not None:
        logits = jnp.where(banned, -jnp.inf, logits)
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first always).
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
            drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The generation loop.

class _State(NamedTuple):
    cache: KVCache
    logits: jax.Array   # [B, V] the next-token logits of the conditional rows
    step: jax.Array     # loop iteration (keys fold it in)
    pending: jax.Array  # bool [B]: the last element is BOI, an image is due
    done: jax.Array     # bool [B]
    out: Generation


class _TokenState(NamedTuple):
    """The Chameleon loop's state (Generator._generate_tokens)."""
    cache: KVCache
    logits: jax.Array      # [R, V] the next-token logits of every row (R = 2B with guidance)
    step: jax.Array        # loop iteration (keys fold it in)
    image_left: jax.Array  # int32 [B]: 0 in text mode; k > 1: k - 1 image tokens, then EOI; 1: EOI
    counted: jax.Array     # int32 [B]: tokens of the max_new_tokens budget (all but image ids)
    done: jax.Array        # bool [B]
    out: Generation


class Generator:
    """Jitted mixed-modal generation for one model config and sampler settings.

    __call__(params, prompt, key, uncond=None, guidance=1.0, max_new_tokens, max_images,
    allow_images) -> Generation. `uncond` (a Prompt, same rows) turns on classifier-free
    guidance for the images with scale `guidance` (a runtime value: no recompilation).

    The model is config.model's family (models.build_model). Transfusion: images are diffused
    with `image` (ImageSampling; `schedule` the diffusion schedule). Chameleon: images are
    sampled as tokens with `image_tokens` (`image` and `schedule` are not used; schedule may
    be None); see _generate_tokens. `text` samples text in both."""

    def __init__(self, cfg, schedule: diffusion.Schedule | None, specials: Specials = Specials(),
                 image: ImageSampling = ImageSampling(), text: TextSampling = TextSampling(),
                 image_tokens: TextSampling = IMAGE_TOKENS):
        self.model, self.specials, self.text = build_model(cfg), specials, text
        self.image_tokens = image_tokens
        self.tokens_only = family(cfg) == "chameleon"
        self.tables = None
        if not self.tokens_only:
            self.tables = diffusion.sampler_tables(schedule, image.sampler, image.steps,
                                                   image.eta, clip_x0=image.clip_x0,
                                                   prediction=image.prediction)
        self._compiled = {}

    def __call__(self, params, prompt: Prompt, key, uncond: Prompt | None = None,
                 guidance: float = 1.0, max_new_tokens: int = 64, max_images: int = 1,
                 allow_images: bool = True) -> Generation:
        if max_new_tokens < 1 or max_images < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}, max_images={max_images}; "
                             "expected >= 1 and >= 0")
        if uncond is not None and uncond.lengths.shape != prompt.lengths.shape:
            raise ValueError(f"uncond has {uncond.lengths.shape[0]} rows; expected "
                             f"{prompt.lengths.shape[0]}, one per prompt row")
        static = (max_new_tokens, max_images, allow_images, uncond is not None)
        if static not in self._compiled:
            loop = self._generate_tokens if self.tokens_only else self._generate
            self._compiled[static] = jax.jit(functools.partial(loop, *static))
        return self._compiled[static](params, prompt, uncond, key, jnp.float32(guidance))

    def _generate(self, max_new, max_images, allow_images, use_cfg, params, prompt, uncond, key,
                  guidance):
        model, sp = self.model, self.specials
        p, cfg = patches_per_image(model.cfg), model.cfg
        b = prompt.lengths.shape[0]
        tile = (lambda x: jnp.concatenate([x, x])) if use_cfg else (lambda x: x)
        prompt_len = max(prompt.chunk["tokens"].shape[1],
                         uncond.chunk["tokens"].shape[1] if use_cfg else 0)
        cache = init_cache(cfg, b * (2 if use_cfg else 1),
                           prompt_len + max_new + max_images * p)
        both = concat_prompts(prompt, uncond) if use_cfg else prompt
        cache, logits = prefill(model, params, cache, both)
        last = jnp.take_along_axis(prompt.chunk["tokens"], (prompt.lengths - 1)[:, None], 1)[:, 0]
        shape = (cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        out = Generation(jnp.full((b, max_new), sp.pad, jnp.int32), jnp.zeros(b, jnp.int32),
                         jnp.zeros((b, max(max_images, 1), *shape)), jnp.zeros(b, jnp.int32))
        state = _State(cache, logits[:b], jnp.int32(0), last == sp.boi, jnp.zeros(b, bool), out)
        rows = jnp.arange(b)

        def text_phase(s: _State) -> _State:
            o = s.out
            active = ~s.done
            # BOI only when an image, its EOI and the budgets fit.
            no_image = (o.num_images >= max_images) | (o.num_tokens + 2 > max_new)
            no_image = no_image | (not allow_images)
            banned = jnp.zeros((b, s.logits.shape[-1]), bool)
            banned = banned.at[:, jnp.array([sp.pad, sp.bos, sp.eoi])].set(True)
            banned = banned.at[:, sp.boi].set(no_image)
            tok = sample_token(jax.random.fold_in(key, s.step), s.logits, self.text, banned)
            cache, logits = decode_text(model, params, s.cache, tile(tok), tile(active))
            slot = jnp.minimum(o.num_tokens, max_new - 1)
            tokens = o.tokens.at[rows, slot].set(jnp.where(active, tok, o.tokens[rows, slot]))
            n = o.num_tokens + active
            done = s.done | (active & ((tok == sp.eos) | (n >= max_new)))
            return s._replace(cache=cache, logits=jnp.where(active[:, None], logits[:b], s.logits),
                              pending=active & (tok == sp.boi) & ~done, done=done,
                              out=o._replace(tokens=tokens, num_tokens=n))

        def image_phase(s: _State) -> _State:
            o, active = s.out, s.pending
            x0 = sample_image(model, params, s.cache, jax.random.fold_in(key, s.step),
                              tile(active), self.tables, guidance if use_cfg else None)
            cache, logits = commit_image(model, params, s.cache, tile(x0), tile(active), sp.eoi)
            slot = jnp.minimum(o.num_images, max(max_images, 1) - 1)
            images = o.images.at[rows, slot].set(
                jnp.where(active[:, None, None, None], x0, o.images[rows, slot]))
            tslot = jnp.minimum(o.num_tokens, max_new - 1)
            tokens = o.tokens.at[rows, tslot].set(jnp.where(active, sp.eoi, o.tokens[rows, tslot]))
            n = o.num_tokens + active
            return s._replace(cache=cache, logits=jnp.where(active[:, None], logits[:b], s.logits),
                              pending=jnp.zeros_like(active), done=s.done | (active & (n >= max_new)),
                              out=o._replace(tokens=tokens, num_tokens=n, images=images,
                                             num_images=o.num_images + active))

        def body(s: _State) -> _State:
            s = jax.lax.cond(s.pending.any(), image_phase, text_phase, s)
            return s._replace(step=s.step + 1)

        limit = max_new + max_images + 1  # every iteration adds a token or an image
        state = jax.lax.while_loop(lambda s: (s.step < limit) & ~(s.done.all()), body, state)
        return state.out


    def _generate_tokens(self, max_new, max_images, allow_images, use_cfg, params, prompt, uncond,
                         key, guidance):
        """The Chameleon loop (paper section 4.2: images as VQ-VAE tokens): one token per row
        per iteration, on the same KV cache and prompt layout as Transfusion's loop.

        Text mode samples with `self.text` (greedy by default, the paper's text decoding) from
        the conditional rows' logits; image ids (>= text_vocab_size), PAD, BOS and EOI are
        banned, BOI too unless an image, its EOI and the budgets fit. A row that samples BOI
        (or whose prompt ends in BOI) then samples exactly P = tokens_per_image ids, one at a
        time, from the logits restricted to the image vocabulary [text_vocab_size, vocab_size),
        and EOI is written after them (not sampled); text mode resumes.

        Image tokens with classifier-free guidance: logits l_u + s (l_c - l_u) of the
        conditional rows [0, B) and the unconditional ones [B, 2B), as Chameleon guides its
        image tokens (the paper's scale 5 for Chameleon, section 4.1); both halves append the
        sampled token. (On raw logits or log-probabilities alike: they differ by a constant per
        row, which no softmax sees.) They are sampled with `self.image_tokens`, by default at
        temperature 1 without top-k/top-p: greedy decoding of image tokens is degenerate (the
        argmax code repeats, flat patches and stripes), so autoregressive image models sample
        them; temperature 0 still gives the argmax (tests).

        max_new_tokens counts text tokens, BOI and EOI, as Transfusion's does; an image's P
        ids come on top (Generation's docstring has the shapes)."""
        model, sp, cfg = self.model, self.specials, self.model.cfg
        p, offset = tokens_per_image(cfg), text_vocab_size(cfg)
        b, slots = prompt.lengths.shape[0], max(max_images, 1)
        width = max_new + slots * p
        tile = (lambda x: jnp.concatenate([x, x])) if use_cfg else (lambda x: x)
        prompt_len = max(prompt.chunk["tokens"].shape[1],
                         uncond.chunk["tokens"].shape[1] if use_cfg else 0)
        cache = init_cache(cfg, b * (2 if use_cfg else 1), prompt_len + width)
        both = concat_prompts(prompt, uncond) if use_cfg else prompt
        cache, logits = prefill(model, params, cache, both)
        last = jnp.take_along_axis(prompt.chunk["tokens"], (prompt.lengths - 1)[:, None], 1)[:, 0]
        zeros = jnp.zeros(b, jnp.int32)
        out = Generation(jnp.full((b, width), sp.pad, jnp.int32), zeros,
                         jnp.zeros((b, slots, p), jnp.int32), zeros)
        state = _TokenState(cache, logits, jnp.int32(0), jnp.where(last == sp.boi, p + 1, 0),
                            zeros, jnp.zeros(b, bool), out)
        ids = jnp.arange(logits.shape[-1])
        text_banned = (ids >= offset) | jnp.isin(ids, jnp.array([sp.pad, sp.bos, sp.eoi]))
        image_banned = (ids < offset) | (ids >= cfg.vocab_size)
        rows = jnp.arange(b)

        def next_token(s: _TokenState):
            """-> (token [B], whether it is an image id [B])."""
            key_text, key_image = jax.random.split(jax.random.fold_in(key, s.step))
            no_image = (s.out.num_images >= max_images) | (s.counted + 2 > max_new)
            no_image = no_image | (not allow_images)
            banned = jnp.broadcast_to(text_banned, s.logits[:b].shape).at[:, sp.boi].set(no_image)
            text = sample_token(key_text, s.logits[:b], self.text, banned)
            image_logits = guided(s.logits[:b], s.logits[b:], guidance) if use_cfg else s.logits
            image = sample_token(key_image, image_logits, self.image_tokens, image_banned)
            is_code = s.image_left > 1
            token = jnp.where(s.image_left == 1, sp.eoi, jnp.where(is_code, image, text))
            return token, is_code

        def body(s: _TokenState) -> _TokenState:
            o, active = s.out, ~s.done
            token, is_code = next_token(s)
            cache, logits = decode_text(model, params, s.cache, tile(token), tile(active))
            at = jnp.minimum(o.num_tokens, width - 1)
            tokens = o.tokens.at[rows, at].set(jnp.where(active, token, o.tokens[rows, at]))
            code, slot = is_code & active, jnp.minimum(o.num_images, slots - 1)
            j = jnp.clip(p + 1 - s.image_left, 0, p - 1)  # the code's place in its image
            images = o.images.at[rows, slot, j].set(
                jnp.where(code, token - offset, o.images[rows, slot, j]))
            finished = active & (s.image_left == 1)  # this token is the image's EOI
            counted = s.counted + (active & ~code)
            started = active & (s.image_left == 0) & (token == sp.boi)
            image_left = jnp.where(active & (s.image_left > 0), s.image_left - 1,
                                   jnp.where(started, p + 1, s.image_left))
            eos = active & (s.image_left == 0) & (token == sp.eos)
            done = s.done | eos | (active & (counted >= max_new))
            return _TokenState(
                cache, jnp.where(tile(active)[:, None], logits, s.logits), s.step + 1,
                image_left, counted, done,
                Generation(tokens, o.num_tokens + active, images, o.num_images + finished))

        limit = width + 1  # every iteration adds a token
        state = jax.lax.while_loop(lambda s: (s.step < limit) & ~(s.done.all()), body, state)
        o = state.out
        return o._replace(images=o.images.reshape(b, slots, cfg.latent_size, cfg.latent_size))


def concat_prompts(a: Prompt, b: Prompt) -> Prompt:
    """The rows of a then of b, padded to one length and one number of image slots."""
    length = max(a.chunk["tokens"].shape[1], b.chunk["tokens"].shape[1])
    slots = max(x.chunk["patch_positions"].shape[1] for x in (a, b))

    def pad(x: Prompt):
        c = dict(x.chunk)
        extra = length - c["tokens"].shape[1]
        for k in ("tokens", "segment_ids", "positions"):
            c[k] = jnp.pad(c[k], ((0, 0), (0, extra)))
        c["patch_index"] = jnp.pad(c["patch_index"], ((0, 0), (0, extra)), constant_values=-1)
        c["mask_pos"] = jnp.concatenate(
            [c["mask_pos"], jnp.broadcast_to(jnp.arange(c["mask_pos"].shape[1], length),
                                             (c["mask_pos"].shape[0], extra))], axis=1)
        c["patch_positions"] = jnp.pad(c["patch_positions"],
                                       ((0, 0), (0, slots - c["patch_positions"].shape[1]), (0, 0)))
        return c, x.images

    (ca, ia), (cb, ib) = pad(a), pad(b)
    chunk = {k: jnp.concatenate([ca[k], cb[k]]) for k in ca}
    images = None
    if ia is not None or ib is not None:
        shape = (slots, *(ia if ia is not None else ib).shape[2:])
        fill = lambda im, n: (jnp.zeros((n, *shape)) if im is None else
                              jnp.pad(im, ((0, 0), (0, slots - im.shape[1])) + ((0, 0),) * 3))
        images = jnp.concatenate([fill(ia, a.lengths.shape[0]), fill(ib, b.lengths.shape[0])])
    return Prompt(chunk, images, jnp.concatenate([a.lengths, b.lengths]))
