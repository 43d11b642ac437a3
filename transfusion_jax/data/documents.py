"""Source records -> documents: decoded, validated, tokenised, with image placeholders.

A source record is a dict of one of three kinds:
  {"text": str | bytes}                                   text-only document
  {"image": IMAGE, "caption": str | bytes | [str | bytes]} caption-image pair (one caption is
                                                           drawn when several are given)
  {"parts": [{"text": ...} | {"image": IMAGE}, ...]}       interleaved document
where IMAGE is a uint8 array [H, W] or [H, W, 1|3|4], a file path, or encoded image bytes.
Records of precomputed latents (data.image_source "latents", see latent_records.py) have the
same kinds with IMAGE a float32 VAE latent array [h, w, C] (Transfusion) or an int32 array of
VQ-VAE code ids [h, w] (Chameleon), or {"error": reason} where the image failed to load when it
was encoded.

A document is a dict of arrays, the unit the mixer and the packer work on:
  tokens [n] int32: BOS ... EOS with BOI, P PAD placeholders, EOI for each image
  boi [k] int32: index of each image's BOI in tokens
  images [k, S, S, 3] float32 in [-1, 1] (or [k, h, w, C] float32 raw VAE latents, or
      [k, h, w] int32 VQ code ids: `image_slot`)
  max_timestep [k] int32: T, or T // 2 for an image that text follows (the noise limit, paper
      section 4.1 and Table 8; `noise_limit=False`, data.noise_limit, gives every image T)
  counts: counter vector (counters.py)
A record that cannot become a document gives an empty document (n = 0) whose counts say why:
bad input is counted, never fatal and never silent.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from transfusion_jax.data import counters


class SkipDocument(Exception):
    def __init__(self, reason: str):
        assert reason in counters.SKIP_REASONS, reason
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Text and images.

def decode_text(value, empty_reason: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SkipDocument("invalid_utf8") from None
    if not isinstance(value, str):
        raise SkipDocument("bad_record")
    try:
        value.encode("utf-8")  # lone surrogates (e.g. from JSON "\udc80") are not UTF-8
    except UnicodeEncodeError:
        raise SkipDocument("invalid_utf8") from None
    if not value.strip():
        raise SkipDocument(empty_reason)
    return value


def _open_image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        ok = (value.dtype == np.uint8 and value.ndim in (2, 3) and min(value.shape) >= 1
              and (value.ndim == 2 or value.shape[-1] in (1, 3, 4)))
        if not ok:
            raise SkipDocument("bad_image_shape")
        return Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value)
    if isinstance(value, (str, os.PathLike)):
        if not os.path.exists(value):
            raise SkipDocument("missing_image")
        source = value
    elif isinstance(value, bytes):
        source = io.BytesIO(value)
    else:
        raise SkipDocument("bad_record")
    try:
        image = Image.open(source)
        image.load()  # decode now: truncated files fail here, not later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise SkipDocument("corrupt_image") from None
    return image


def load_image(value, size: int) -> np.ndarray:
    """float32 [size, size, 3] in [-1, 1]: RGB, shorter side resized to `size`, centre-cropped."""
    image = _open_image(value).convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, np.float32) / 127.5 - 1.0


def load_latents(value, shape: tuple[int, ...]) -> np.ndarray:
    """A precomputed image: latents of `shape` and the dtype image_slot gives it (float32 VAE
    latents [h, w, C], int32 VQ code ids [h, w]). {"error": reason} is an image that failed to
    load when it was encoded; it is skipped here, where its pixels would have failed."""
    if isinstance(value, dict) and "error" in value:
        reason = value["error"]
        raise SkipDocument(reason if reason in counters.SKIP_REASONS else "bad_record")
    if not isinstance(value, np.ndarray):
        raise SkipDocument("bad_record")
    _, _, dtype = image_slot(0, shape)
    if value.dtype != dtype or value.shape != tuple(shape):
        raise SkipDocument("bad_image_shape")
    return value


def image_slot(image_size: int, latent_shape: tuple[int, ...] | None = None):
    """(batch key, shape of one image, dtype) of the image slots: pixels "images" [S, S, 3]
    float32; or, when `latent_shape` is given, precomputed "latents": raw VAE latents [h, w, C]
    float32 (Transfusion), or VQ-VAE code ids [h, w] int32 (Chameleon: a 2-dim latent_shape).
    Code ids stay int32 all the way to the step: exact for any codebook (float32 would be exact
    below 2^24 only), the same 4 bytes, and the step's astype(int32) is then a no-op."""
    if latent_shape is None:
        return "images", (image_size, image_size, 3), np.dtype(np.float32)
    shape = tuple(int(d) for d in latent_shape)
    return "latents", shape, np.dtype(np.int32 if len(shape) == 2 else np.float32)


# ---------------------------------------------------------------------------------------------
# Documents.

class DocumentBuilder:
    """record, rng -> document. A Grain random_map transform; picklable for worker processes.

    With `latent_shape` the records' images are precomputed latents of that shape (the latents
    source: (h, w, C) VAE latents, or (h, w) VQ code ids), taken as they are; every other step, and every random draw, is the pixel path's,
    so a record gives the same document either way but for its images.

    `noise_limit` (data.noise_limit, default the paper's): an image followed by text in its
    document (an image-first caption pair, an interleaved image with text after it) is noised
    at t < T // 2 only, so that the text it conditions still learns from it (paper Table 8);
    False: every image draws t from the full range [0, T)."""

    def __init__(self, tokenizer, *, patches_per_image: int, image_size: int,
                 caption_first_prob: float, p_uncond: float, num_timesteps: int,
                 latent_shape: tuple[int, ...] | None = None, noise_limit: bool = True,
                 mix_patches_per_image: int = 0):
        self.tok = tokenizer
        self.P = patches_per_image
        self.mix_P = mix_patches_per_image or patches_per_image  # counted for the mix ratio
        self.image_size = image_size
        self.latent_shape = latent_shape
        _, self.slot_shape, self.slot_dtype = image_slot(image_size, latent_shape)
        self.caption_first_prob = caption_first_prob
        self.p_uncond = p_uncond
        self.T = num_timesteps
        self.limited_T = num_timesteps // 2 if noise_limit else num_timesteps

    def __call__(self, record, rng: np.random.Generator) -> dict:
        try:
            return self._build(record, rng)
        except SkipDocument as e:
            return self.empty(counters.counts(skipped=1, **{f"skipped_{e.reason}": 1}))

    def empty(self, counts: np.ndarray) -> dict:
        return {"tokens": np.zeros(0, np.int32), "boi": np.zeros(0, np.int32),
                "images": np.zeros((0, *self.slot_shape), self.slot_dtype),
                "max_timestep": np.zeros(0, np.int32), "counts": counts}

    def _build(self, record, rng) -> dict:
        if not isinstance(record, dict):
            raise SkipDocument("bad_record")
        if "error" in record:  # a problem the source found while reading
            raise SkipDocument(record["error"])
        if "text" in record:
            return self._text(record["text"])
        if "image" in record:
            return self._pair(record["image"], record.get("caption"), rng)
        if "parts" in record:
            return self._interleaved(record["parts"])
        raise SkipDocument("bad_record")

    def _load(self, value) -> np.ndarray:
        if self.latent_shape is not None:
            return load_latents(value, self.latent_shape)
        return load_image(value, self.image_size)

    def _image_tokens(self) -> list[int]:
        return [self.tok.boi_id] + [self.tok.pad_id] * self.P + [self.tok.eoi_id]

    def _document(self, pieces, images, max_timestep, counts) -> dict:
        """pieces: token lists, images marked by None; BOS/EOS around all of it."""
        tokens, boi = [self.tok.bos_id], []
        for piece in pieces:
            if piece is None:
                boi.append(len(tokens))
                piece = self._image_tokens()
            tokens.extend(piece)
        tokens.append(self.tok.eos_id)
        return {"tokens": np.asarray(tokens, np.int32), "boi": np.asarray(boi, np.int32),
                "images": np.asarray(images, self.slot_dtype).reshape(len(images),
                                                                      *self.slot_shape),
                "max_timestep": np.asarray(max_timestep, np.int32).reshape(len(images)),
                "counts": counts}

    def _text(self, value) -> dict:
        ids = self.tok.encode(decode_text(value, "empty_text"))
        n = len(ids) + 2
        return self._document([ids], [], [], counters.counts(
            documents=1, text_documents=1, text_document_tokens=n))

    def _pair(self, image, caption, rng) -> dict:
        if isinstance(caption, (list, tuple)):
            caption = caption[int(rng.integers(len(caption)))] if caption else ""
        drop, order = rng.random(), rng.random()  # drawn always: one rng stream per record
        text = decode_text(caption if caption is not None else "", "empty_caption")
        loaded = self._load(image)  # pixels, or precomputed latents
        common = dict(documents=1, pair_documents=1, images=1, image_document_patches=self.mix_P)
        if drop < self.p_uncond:  # caption dropout: an unconditional image, full noise range
            return self._document([None], [loaded], [self.T], counters.counts(
                captions_dropped=1, **common))
        ids = self.tok.encode(text)
        if order < self.caption_first_prob:
            return self._document([ids, None], [loaded], [self.T], counters.counts(
                caption_first=1, **common))
        # Image before its caption: noise limited to T/2 so the caption can learn from it.
        return self._document([None, ids], [loaded], [self.limited_T], counters.counts(
            image_first=1, **common))

    def _interleaved(self, parts) -> dict:
        if not isinstance(parts, (list, tuple)):
            raise SkipDocument("bad_record")
        pieces, images = [], []
        for part in parts:
            if isinstance(part, dict) and "image" in part:
                pieces.append(None)
                images.append(self._load(part["image"]))
            elif isinstance(part, dict) and "text" in part:
                text = part["text"]
                if isinstance(text, (str, bytes)) and not text.strip():
                    continue  # an empty text part adds nothing; the document stays whole
                pieces.append(self.tok.encode(decode_text(text, "empty_text")))
            else:
                raise SkipDocument("bad_record")
        if not images:
            raise SkipDocument("bad_record")
        # An image followed by text is that text's context: noise-limit it like image-first pairs.
        text_after = [any(p is not None for p in pieces[i + 1:])
                      for i, p in enumerate(pieces) if p is None]
        max_timestep = [self.limited_T if after else self.T for after in text_after]
        return self._document(pieces, images, max_timestep, counters.counts(
            documents=1, interleaved_documents=1, images=len(images),
            image_document_patches=self.mix_P * len(images)))
