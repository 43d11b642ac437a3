"""`data.mixture`: any number of text and image-text sources, each with a weight (issue 15).

    data.mixture = [
        {"name": "c4", "text_source": "tfds", "tfds_name": "c4/en", "weight": 1.0},
        {"name": "cc12m", "image_source": "image_files", "image_files_path": "...",
         "weight": 0.5, "schedule": [[0.99, 3.0]]},
    ]

An entry names one source: exactly one of `text_source` / `image_source` (the values the
top-level fields take), plus that source's own fields spelt as the top-level data config spells
them (tfds_name, image_files_path, caption_first_prob, ...; any field that is not one of the whole
pipeline's, GLOBAL_FIELDS). A field an entry does not set is the top-level one, so the top level
holds the defaults every source shares. The empty list (the default) is today's two-stream
pipeline exactly: text_source and image_source mixed at text_to_patch_ratio.

The weight's unit is the one the paper's "1:1 token ratio" (section 4.1) is written in, the
two-stream mixer's (mixing.py): a source's share of the *elements* its documents contribute,
text tokens of text-only documents and patches of image documents (captions and markers inside
image documents count on neither side, as there). So [c4 weight 1, images weight 1] is the
paper's 1:1 tokens:patches, and the two-stream pipeline is the mixture [text weight
text_to_patch_ratio, image weight 1].

`schedule` changes a weight with the training step: [[fraction, weight], ...], fractions of
total_steps in [0, 1], increasing; the weight holds from step ceil(fraction * total_steps) on
(steps numbered from 1, as the trainer logs them). [[0.99, 3.0]]: weight 3 for the last 1% of
training, the paper's high-aesthetic upweighting.

`stream` (optional): the number that seeds the source's shuffle and per-document draws. By
default it is derived from the name, so adding, removing or reordering entries leaves every other
source's documents and their order unchanged (only the interleaving changes); renaming a source
reshuffles it. Setting it reproduces a stream of the two-stream pipeline (text 0, image 1).
"""
from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping

import ml_collections

from transfusion_jax.data import counters

# Fields of the whole pipeline: one value for every source (rows, batches, the model's images,
# determinism, the tokenizer). An entry that sets one is an error naming the top-level field.
GLOBAL_FIELDS = ("seq_len", "batch_size", "max_images", "image_size", "num_timesteps",
                 "noise_limit", "text_to_patch_ratio", "mix_patches_per_image", "pack_split_text",
                 "seed", "worker_count", "worker_buffer_size", "tokenizer_model",
                 "tokenizer_vocab_size", "tokenizer_train_source", "tokenizer_train_documents",
                 "mixture", "require_real_data")
ENTRY_FIELDS = ("name", "weight", "schedule", "stream")  # the entry's own, besides the source's
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # it becomes a metric key: data/mix/<name>/share


def entries(c) -> tuple:
    """The mixture's entries (empty: the two-stream pipeline)."""
    return tuple(c.get("mixture", ()) or ())


def names(c) -> tuple[str, ...]:
    return tuple(e["name"] for e in entries(c))


def kind(entry) -> str:
    """"text" (a text_source: text-only documents) or "image" (an image_source)."""
    return "text" if "text_source" in entry else "image"


def stream_index(entry) -> int:
    """The seed stream of a source: `stream` if set, else a stable hash of its name."""
    if entry.get("stream") is not None:
        return int(entry["stream"])
    return zlib.crc32(entry["name"].encode("utf-8")) + 2  # 0 and 1: the two-stream pipeline's


def entry_config(c, i: int) -> ml_collections.ConfigDict:
    """The data config of source i alone: the top level, its source and its fields set, the
    other kind "none" (what sources.py and the pipeline's per-source stream read)."""
    entry = entries(c)[i]
    sub = ml_collections.ConfigDict({k: v for k, v in c.to_dict().items() if k != "mixture"})
    sub.mixture = ()
    sub.text_source, sub.image_source = "none", "none"
    for key, value in entry.items():
        if key in ENTRY_FIELDS:
            continue
        try:
            sub[key] = value
        except (TypeError, ValueError) as e:  # "data." + the field: _check_entry prefixes it
            raise ValueError(f"data.{key} = {value!r}: expected {type(sub[key]).__name__}") from e
    return sub


def _fail(field: str, value, expected: str):
    raise ValueError(f"data.{field} = {value!r}: expected {expected}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_schedule(i: int, schedule) -> None:
    field = f"mixture[{i}].schedule"
    expected = ("a list of [fraction of total_steps in [0, 1], weight >= 0] pairs, fractions "
                "increasing, e.g. [[0.99, 3.0]]")
    if not isinstance(schedule, (list, tuple)):
        _fail(field, schedule, expected)
    previous = -1.0
    for point in schedule:
        ok = (isinstance(point, (list, tuple)) and len(point) == 2 and _is_number(point[0])
              and _is_number(point[1]) and 0 <= point[0] <= 1 and point[1] >= 0
              and point[0] > previous)
        if not ok:
            _fail(field, schedule, expected)
        previous = point[0]


def _check_entry(c, i: int, entry, validate) -> None:
    if not isinstance(entry, Mapping):
        _fail(f"mixture[{i}]", entry, 'a dict such as {"name": "c4", "text_source": "tfds", '
              '"weight": 1.0}')
    sources = [k for k in ("text_source", "image_source") if k in entry]
    if len(sources) != 1:
        raise ValueError(f"data.mixture[{i}]: names {sources or 'no source'}; expected exactly "
                         "one of text_source, image_source")
    for key in entry:
        if key in GLOBAL_FIELDS:
            raise ValueError(f"data.mixture[{i}].{key}: a field of the whole pipeline, not of one "
                             f"source; expected it at the top level (data.{key})")
        if key not in ENTRY_FIELDS and key not in c:
            raise ValueError(f"data.mixture[{i}].{key}: unknown field; expected one of "
                             f"{list(ENTRY_FIELDS)}, text_source or image_source, or a source "
                             "field of data (tfds_name, image_files_path, ...)")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        _fail(f"mixture[{i}].name", name, "a name of letters, digits, '_', '.', '-' (it names "
              "the source's metrics, data/mix/<name>/share)")
    if "weight" not in entry or not _is_number(entry["weight"]) or entry["weight"] < 0:
        _fail(f"mixture[{i}].weight", entry.get("weight"), "a number >= 0 (the source's share "
              "of elements: text tokens of text documents, patches of image documents)")
    _check_schedule(i, entry.get("schedule", ()))
    stream = entry.get("stream")
    if stream is not None and (isinstance(stream, bool) or not isinstance(stream, int)
                               or not 0 <= stream < 2**32):
        _fail(f"mixture[{i}].stream", stream, "an integer in [0, 2**32) (or unset: from the name)")
    value = entry[sources[0]]
    if value == "none":
        _fail(f"mixture[{i}].{sources[0]}", value, "a source, not 'none'")
    try:
        validate(entry_config(c, i))
    except ValueError as e:  # the sub-config's field is the entry's
        message = str(e)
        if message.startswith("data."):
            message = f"data.mixture[{i}]." + message[len("data."):]
        raise ValueError(message) from None


def weights_at(c, fraction: float) -> tuple[float, ...]:
    """Every source's weight at a point of training (a fraction of total_steps)."""
    return tuple(_weight(e, lambda f: f <= fraction) for e in entries(c))


def _weight(entry, reached) -> float:
    weight = float(entry["weight"])
    for at, value in entry.get("schedule", ()):
        if reached(at):
            weight = float(value)
    return weight


def validate_mixture(c, validate) -> None:
    """Raises ValueError naming data.mixture[i].<field>, its value and what was expected.
    `validate`: the data config's own validation, run on each source's config."""
    mixture = c.get("mixture", ())
    if not isinstance(mixture, (list, tuple)):
        _fail("mixture", mixture, "a list of sources (dicts), or [] for text_source/image_source")
    if len(mixture) > counters.MIX_SLOTS:
        _fail("mixture", f"<{len(mixture)} sources>", f"at most {counters.MIX_SLOTS} sources")
    for i, entry in enumerate(mixture):
        _check_entry(c, i, entry, validate)
    seen = {}
    for i, entry in enumerate(mixture):
        for key, value in (("name", entry["name"]), ("stream", stream_index(entry))):
            if (key, value) in seen:
                _fail(f"mixture[{i}].{key}", value,
                      f"distinct {key}s; data.mixture[{seen[key, value]}] has it too")
            seen[key, value] = i
    if mixture:
        points = sorted({0.0} | {float(at) for e in mixture for at, _ in e.get("schedule", ())})
        for at in points:
            if not any(w > 0 for w in weights_at(c, at)):
                when = "" if at == 0 else f" from {at} of total_steps on"
                raise ValueError(f"data.mixture[*].weight: all zero{when}; expected at least one "
                                 "source with weight > 0 at every step")


def switch_step(fraction: float, total_steps: int) -> int:
    """The first step (from 1) of a schedule point: ceil(fraction * total_steps), at least 1."""
    return max(1, math.ceil(round(fraction * total_steps, 6)))


def phases(c, total_steps: int | None) -> list[tuple[int, tuple[float, ...]]]:
    """[(first step, every source's weight), ...] in step order: the weights hold from that step
    to the next phase's. Needs total_steps when a source has a schedule."""
    scheduled = [i for i, e in enumerate(entries(c)) if e.get("schedule")]
    if scheduled and not total_steps:
        raise ValueError(f"data.mixture[{scheduled[0]}].schedule: the weights change with the "
                         "step, so the pipeline needs the run's total_steps; expected "
                         "make_pipeline(..., total_steps=config.total_steps)")
    steps = sorted({1} | {switch_step(at, total_steps) for e in entries(c)
                          for at, _ in e.get("schedule", ())})
    out = []
    for step in steps:
        weights = tuple(_weight(e, lambda at: switch_step(at, total_steps) <= step)
                        for e in entries(c))
        if not out or out[-1][1] != weights:
            out.append((step, weights))
    return out


def uses_shapes(c) -> list[str]:
    """The fields that put the shapes world in this config's training data."""
    if entries(c):
        return [f"mixture[{i}].{kind(e)}_source" for i, e in enumerate(entries(c))
                if e[f"{kind(e)}_source"] == "shapes"]
    return [f for f in ("text_source", "image_source") if c[f] == "shapes"]


PAPER_MIXTURE_HINT = (
    '--config.data.mixture=\'[{"name": "c4", "text_source": "tfds", "tfds_name": "c4/en", '
    '"tfds_data_dir": "gs://BUCKET/tfds", "weight": 1.0}, {"name": "images", "image_source": '
    '"webdataset", "shards": "gs://BUCKET/images/{00000..01242}.tar", "weight": 1.0}]\'')


def check_real_data(c) -> None:
    """With data.require_real_data (the Table 2 presets, issue 15): refuse, at the start of a
    run, the shapes world and a tokenizer trained on the spot, naming what to set. Without
    this a paper-size run with no data overrides would quietly train on shapes with a
    512-piece tokenizer."""
    if not c.get("require_real_data", False):
        return
    problems = []
    shapes = uses_shapes(c)
    if shapes:
        fields = ", ".join(f"data.{f}" for f in shapes)
        problems.append(
            f"its training data is the shapes world ({fields} = 'shapes'): set data.mixture to "
            "a text corpus and image-text sources, e.g. the paper's 1:1 tokens:patches, "
            f"{PAPER_MIXTURE_HINT} (or data.text_source and data.image_source)")
    if not c.tokenizer_model:
        problems.append(
            "data.tokenizer_model is empty (a 512-piece tokenizer would be trained on the "
            "spot): set it to the Llama 2 sentencepiece .model (32000 pieces), "
            "--config.data.tokenizer_model=gs://BUCKET/llama2/tokenizer.model")
    if problems:
        raise ValueError(
            "this preset trains a paper-size model (data.require_real_data = True) and names no "
            "real data: " + "; ".join(problems) + ". To train on the shapes world anyway, set "
            "--config.data.require_real_data=false.")


def latents_dirs(c) -> list[str]:
    """The latents folders (image_source "latents") this config trains on."""
    configs = [entry_config(c, i) for i in range(len(entries(c)))] if entries(c) else [c]
    return [s.latents_dir for s in configs if s.image_source == "latents"]
