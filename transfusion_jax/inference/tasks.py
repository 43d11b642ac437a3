"""Generation tasks as a library: text to image, image to text, answers, free generation.

    sampling = Sampling(sampler="dpm++2m", steps=20, num_samples=1)
    records = run_tasks(config, variables, tokenizer, sampling, prompts=["a red circle"],
                        images=[uint8_or_path], out="DIR")

Each record is {task, input, sample, text, images, pixels, latents}: `pixels` holds the
generated images (uint8 [H, W, 3]) for scoring, `latents` what they were decoded from: the
model's x0 (float32 [h, w, C]) for Transfusion, the VQ-VAE's code ids (int32 [h, w]) for the
Chameleon baseline (model.family), decoded by the VQ-VAE (Codec.decode_ids). `text` is the
generated text; a Chameleon row's image ids are left out of it. With `out`, one PNG grid per task
is written there (a row per input, a column per sample). Options are typed (no argparse): the
`generate` entry point builds them from its flags, evaluators from their config.
"""
import dataclasses
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from transfusion_jax import diffusion
from transfusion_jax.data.documents import SkipDocument, load_image
from transfusion_jax.inference import generation
from transfusion_jax.models import family, patches_per_image
from transfusion_jax.models.chameleon import text_vocab_size
from transfusion_jax.models.autoencoder import loader
from transfusion_jax.models.autoencoder.codec import Codec


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample. Image: `sampler`-`steps` (paper: DDPM-250), classifier-free guidance
    `guidance` for text to image (paper: 5 and 3; 0 or 1: off). Text: greedy at temperature 0.
    Chameleon (model.family): images are tokens, sampled with image_temperature / image_top_k /
    image_top_p (default: plain sampling, generation.IMAGE_TOKENS) and guided with `guidance`
    (paper: 5); sampler, steps and eta are not used."""
    sampler: str = "ddpm"
    steps: int = 250
    eta: float = 0.0          # DDIM only
    guidance: float = 3.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_images: int = 2       # free generation: images per row
    num_samples: int = 4      # samples per input
    seed: int = 0
    image_temperature: float = generation.IMAGE_TOKENS.temperature  # Chameleon's image tokens
    image_top_k: int = generation.IMAGE_TOKENS.top_k
    image_top_p: float = generation.IMAGE_TOKENS.top_p

    def __post_init__(self):
        if self.sampler not in diffusion.SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}: expected one of {diffusion.SAMPLERS}")
        for field in ("steps", "max_new_tokens", "num_samples"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)}: expected an integer >= 1")


def image_codec(config, codec: Codec | None = None):
    """(pixels [-1, 1] -> latents, latents -> pixels) of the run's frozen autoencoder
    (`codec`, else loaded from config.autoencoder for model.family), each for one image, jitted.
    A VQ-VAE (Chameleon): pixels -> code ids int32 [h, w] (Codec.encode_ids), code ids ->
    pixels (Codec.decode_ids)."""
    codec = codec or loader.load_codec(config.autoencoder, family(config.model))
    if codec.kind == "identity":
        return (lambda x: x), (lambda z: np.clip(z, -1.0, 1.0))
    if codec.kind == "vq":
        encode = jax.jit(lambda x: codec.encode_ids(codec.variables, x[None])[0])
        decode = jax.jit(lambda ids: jnp.clip(codec.decode_ids(codec.variables, ids[None])[0],
                                              -1.0, 1.0))
        return (lambda x: np.asarray(encode(jnp.asarray(x)))), (lambda z: np.asarray(decode(z)))
    encode = jax.jit(lambda x: codec.encode(codec.variables, x[None])[0])
    decode = jax.jit(lambda z: jnp.clip(codec.decode(codec.variables, z[None])[0], -1.0, 1.0))
    return (lambda x: np.asarray(encode(jnp.asarray(x)))), (lambda z: np.asarray(decode(z)))


def to_uint8(pixels) -> np.ndarray:
    return np.round((np.clip(np.asarray(pixels), -1, 1) + 1) * 127.5).astype(np.uint8)


def save_grid(path, rows) -> None:
    """rows: list of lists of uint8 [H, W, 3] -> one PNG, 2 px gaps."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = im
    Image.fromarray(grid).save(path)


def make_generator(config, specials, sampling: Sampling) -> generation.Generator:
    """The Generator of the run's model family with `sampling`'s options."""
    text = generation.TextSampling(sampling.temperature, sampling.top_k, sampling.top_p)
    tokens = generation.TextSampling(sampling.image_temperature, sampling.image_top_k,
                                     sampling.image_top_p)
    if family(config.model) == "chameleon":  # no diffusion: images are tokens
        return generation.Generator(config.model, None, specials, text=text, image_tokens=tokens)
    schedule = diffusion.schedule_from_config(config.diffusion)
    return generation.Generator(
        config.model, schedule, specials,
        generation.ImageSampling(sampling.sampler, sampling.steps, sampling.eta,
                                 config.diffusion.clip_x0,
                                 diffusion.prediction_of(config.diffusion)),
        text)


def text_ids(tokens, model_cfg) -> np.ndarray:
    """A generated row's tokens without image ids (Chameleon's, >= text_vocab_size): what the
    tokenizer decodes. Transfusion rows are returned as they are."""
    tokens = np.asarray(tokens)
    if family(model_cfg) != "chameleon":
        return tokens
    return tokens[tokens < text_vocab_size(model_cfg)]


def _load(image, name: str, size: int) -> np.ndarray:
    """An input image as float32 [-1, 1]; a missing or unreadable one is named."""
    try:
        return load_image(image, size)
    except SkipDocument as e:
        raise ValueError(f"image {name!r}: {e.reason.replace('_', ' ')}; expected a readable "
                         "PNG/JPEG file or a uint8 [H, W, 3] array") from None


def _check_lengths(config, tokenizer, texts: Sequence[str], image: bool = False) -> None:
    """A prompt must fit the context the model was trained on (data.seq_len: the positions and
    sequence lengths it saw); a longer one is refused, not silently run. `image`: the prompt asks
    for an image, whose elements (patches, or a Chameleon image's tokens) and EOI must fit too."""
    context = config.data.seq_len
    room = patches_per_image(config.model) + 1 if image else 0
    for i, text in enumerate(texts):
        length = len(tokenizer.encode(text)) + 2 + room  # BOS, and BOI or the first new token
        if length > context:
            what = f" with the image it asks for ({room - 1} elements and EOI)" if image else ""
            raise ValueError(f"prompt {i} ({text[:40]!r}...) is {length} elements long{what}; "
                             f"the model's context (data.seq_len) is {context}")


class Prepared(NamedTuple):
    """What run_tasks builds for a config, tokenizer, sampler settings and codec: kept by a
    caller that calls it batch by batch, the generator and codec compile once for all calls."""
    specials: generation.Specials
    encode: Callable
    decode: Callable
    generator: generation.Generator


def prepare(config, tokenizer, sampling: Sampling, codec: Codec | None = None) -> Prepared:
    """The special ids, the codec's jitted encode and decode, and the Generator (image_codec,
    make_generator); the sampler's seed is not part of it."""
    specials = generation.Specials.from_tokenizer(tokenizer)
    return Prepared(specials, *image_codec(config, codec),
                    make_generator(config, specials, sampling))


def run_tasks(config, variables, tokenizer, sampling: Sampling, *, prompts: Sequence[str] = (),
              images: Sequence = (), question: str | Sequence[str] = "",
              free: Sequence[str] = (), out: str | None = None, codec: Codec | None = None,
              names: Sequence[str] = (), prepared: Prepared | None = None,
              length: int | None = None):
    """-> list of records {task, input, sample, text, images, pixels, latents}, in task order:
    text to image (`prompts`), image to text or answer (`images`: paths or uint8 arrays, with
    `question`: one for every image, or a list of one per image, "" asking for a caption: all
    in one generation), free generation (`free`).
    `names`: how `images` are named in the records (default: the paths). `codec`: the frozen
    autoencoder when the caller has it loaded. `prepared`: prepare() of the same config,
    tokenizer, sampling and codec, and `length`: every prompt padded to this many elements
    (default: each generation's longest), for a caller that calls this batch by batch (one
    shape, one compile)."""
    if question and not len(images):
        raise ValueError("question needs images to ask about")
    questions = [question] * len(images) if isinstance(question, str) else list(question)
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions for {len(images)} images: expected one "
                         "question, or one per image")
    _check_lengths(config, tokenizer, list(prompts), image=True)
    _check_lengths(config, tokenizer, list(free))
    specials, encode, decode, generator = prepared or prepare(config, tokenizer, sampling, codec)
    key, n, records = jax.random.key(sampling.seed), sampling.num_samples, []
    if out:
        os.makedirs(out, exist_ok=True)

    def run(task, inputs, rows, uncond=None, **kw):  # task: one name, or one per input
        tasks = [task] * len(inputs) if isinstance(task, str) else list(task)
        prompt = generation.build_prompt([r for r in rows for _ in range(n)], config.model,
                                         specials, length=length)
        if uncond is not None:
            uncond = generation.build_prompt([r for r in uncond for _ in range(n)], config.model,
                                             specials)
        result = generator(variables, prompt, jax.random.fold_in(key, len(records)),
                           uncond=uncond, **kw)
        grid = []
        for i, name in enumerate(inputs):
            grid.append([])
            for sample in range(n):
                row = i * n + sample
                num_images, num_tokens = int(result.num_images[row]), int(result.num_tokens[row])
                latents = [np.asarray(result.images[row, j]) for j in range(num_images)]
                pics = [to_uint8(decode(z)) for z in latents]
                grid[-1] += pics
                text = tokenizer.decode(text_ids(result.tokens[row, :num_tokens], config.model))
                records.append(dict(task=tasks[i], input=name, sample=sample, images=num_images,
                                    pixels=pics, latents=latents, text=text))
        if out and any(grid):
            save_grid(os.path.join(out, f"{tasks[0]}.png"), [row for row in grid if row])

    if prompts:
        cfg_on = sampling.guidance not in (0.0, 1.0)
        run("text_to_image", list(prompts),
            [[tokenizer.encode(p), [specials.boi]] for p in prompts],
            uncond=[[[specials.boi]]] * len(prompts) if cfg_on else None,
            guidance=sampling.guidance, max_new_tokens=1, max_images=1)
    if len(images):
        names = list(names) or [im if isinstance(im, str) else f"image {i}"
                                for i, im in enumerate(images)]
        latents = [encode(_load(im, name, config.data.image_size))  # [-1, 1]
                   for im, name in zip(images, names)]
        asked = [tokenizer.encode(f"Question: {q} Answer:") if q else [] for q in questions]
        run(["answer" if q else "image_to_text" for q in questions], names,
            [[latent, a] for latent, a in zip(latents, asked)],
            max_new_tokens=sampling.max_new_tokens,
            max_images=0, allow_images=False)
    if free:
        run("free", list(free), [[tokenizer.encode(t)] for t in free],
            max_new_tokens=sampling.max_new_tokens, max_images=sampling.max_images)
    return records
