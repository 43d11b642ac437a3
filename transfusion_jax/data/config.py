"""The data config: one self-contained ConfigDict, embedded by experiments as `config.data`.

`patches_per_image` (P) is not here: it is a property of the model and autoencoder
((image_size / downsample / patch_size)^2), so the pipeline takes it as an argument.
"""
from __future__ import annotations

import ml_collections

TEXT_SOURCES = ("shapes", "tfds", "text_files", "none")
IMAGE_SOURCES = ("shapes", "coco", "image_files", "latents", "webdataset", "parquet", "none")
SHARD_SOURCES = ("webdataset", "parquet")  # img2dataset output, read by data/shards.py
SHAPES_SPLITS = ("train", "heldout")


def _defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Where documents come from: a text-only stream and an image stream, mixed by token ratio.
    c.text_source = "shapes"
    c.image_source = "shapes"
    # Or any number of weighted text and image-text sources (data/mixture.py: each entry a
    # source and its fields, a weight in elements, an optional step schedule); when non-empty,
    # text_source, image_source and text_to_patch_ratio are not read. A tuple, so that the
    # command line can set it: --config.data.mixture='[{"name": "c4", ...}, {...}]'.
    c.mixture = ()
    # True (the Table 2 presets): a run refuses the shapes world and a tokenizer trained on the
    # spot (data/mixture.py: check_real_data); false trains on them whatever the model's size.
    c.require_real_data = False
    # Rows and batches.
    c.seq_len = 4096  # L, elements per row
    c.batch_size = 8  # global rows per step; each host yields batch_size // host count
    c.max_images = -1  # M, image slots per row; -1: as many as fit, seq_len // (P + 2)
    # An image budget: at most `image_budget` images in each group of `image_budget_rows` rows
    # (0: none, every row up to M). The packer closes a row early rather than pass it; the
    # step then encodes and patches only the budget's slots, not every row's M (issue 18: the
    # autoencoder and patch layers on used slots only; trainers/image_budget.py). With
    # grad_accum A a group is R rows of one microbatch: rows i, i+A, ... of A*R consecutive.
    c.image_budget = 0
    c.image_budget_rows = 1
    c.image_size = 64  # images are resized and centre-cropped to image_size x image_size RGB
    # Documents -> rows (paper section 4.1).
    c.caption_first_prob = 0.8
    c.p_uncond = 0.1  # caption dropout, for classifier-free guidance
    c.num_timesteps = 1000  # T; an image before its caption gets max_timestep T // 2
    c.noise_limit = True  # that limit (paper Table 8); False: every image noised over [0, T)
    c.text_to_patch_ratio = 1.0  # text-only-document tokens : image patches
    # Patches an image counts for in that ratio; 0: the model's own P. A Chameleon run sets
    # its matched Transfusion's P, so both mix the same documents in the same order
    # (experiments/chameleon.py), though an image is P Transfusion patches, P' Chameleon tokens.
    c.mix_patches_per_image = 0
    # A text-only document that does not fit the rest of a row is split to fill it (rows of
    # concatenated text, as the paper's); false: the row closes padded (documents stay whole).
    c.pack_split_text = True
    # Determinism, epochs and parallelism.
    c.seed = 0
    c.num_epochs = 0  # 0: repeat forever
    c.worker_count = 0  # Grain worker processes; 0 = in the calling process
    c.worker_buffer_size = 2  # batches buffered per worker
    c.read_threads = 2  # threads preparing documents (per worker)
    c.read_buffer_size = 64  # documents prepared ahead (per stream, per worker)
    # Tokenizer: a given sentencepiece .model, or one trained here and kept in the workdir.
    c.tokenizer_model = ""
    c.tokenizer_vocab_size = 512
    c.tokenizer_train_source = "shapes"  # "shapes" or "sources" (text of the configured sources)
    c.tokenizer_train_documents = 20000
    # Shapes world.
    c.shapes_seed = 0  # the world's seed: fixed apart from `seed` so held-out scenes stay put
    c.shapes_split = "train"
    c.shapes_num_documents = 100_000  # documents per epoch, per stream
    c.shapes_interleaved_fraction = 0.3  # of image-stream documents; the rest are caption pairs
    # TFDS text (random access through tfds.data_source; data must be prepared beforehand).
    c.tfds_name = "c4/en"
    c.tfds_split = "train"
    c.tfds_data_dir = ""
    c.tfds_text_key = "text"
    # MS-COCO from its own files: the Karpathy split json and the image folders.
    c.coco_karpathy_json = ""
    c.coco_image_root = ""
    c.coco_split = "train+restval"
    # Local files.
    c.image_files_path = ""  # a folder (image + same-named .txt caption) or a JSONL of image, caption
    c.text_files_path = ""  # a .txt (one document a line), a .jsonl ({"text": ...}) or a folder of .txt
    # Precomputed latents (python -m transfusion_jax.precompute --out DIR): image_source "latents".
    c.latents_dir = ""
    # Image-text shards as img2dataset writes them (image_source "webdataset": .tar shards of
    # KEY.jpg + KEY.txt/.json; "parquet": image bytes + caption columns), data/shards.py.
    c.shards = ""  # comma-separated paths or globs, local or gs://, with {00000..01242} ranges
    c.shard_image_key = "jpg;jpeg;png;webp"  # tar member extensions / Parquet column, first present
    c.shard_caption_key = "caption"  # the .json's key (tar; else the .txt) / the Parquet column
    c.min_image_size = 0  # skip images whose shorter side is below this (pixels); 0: none
    c.cycle_length = 4  # shards each worker reads at once, a sample from each in turn
    return c


def get_data_config(**overrides) -> ml_collections.ConfigDict:
    """The default data config with `overrides` applied and validated."""
    config = _defaults()
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(
                f"data.{key}: unknown field (value {value!r}); expected one of {sorted(config)}"
            )
        try:
            config[key] = value
        except TypeError as e:
            raise ValueError(
                f"data.{key} = {value!r}: expected {type(config[key]).__name__}"
            ) from e
    validate_data_config(config)
    return config


def _check(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"data.{field} = {value!r}: expected {expected}")


def validate_data_config(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field, its value and what was expected."""
    unknown = sorted(set(c) - set(_defaults()))
    if unknown:
        raise ValueError(f"data.{unknown[0]}: unknown field; expected one of {sorted(_defaults())}")
    _check(c.text_source in TEXT_SOURCES, "text_source", c.text_source, f"one of {TEXT_SOURCES}")
    _check(c.image_source in IMAGE_SOURCES, "image_source", c.image_source, f"one of {IMAGE_SOURCES}")
    _check(
        (c.text_source, c.image_source) != ("none", "none"),
        "text_source", c.text_source, "at least one of text_source, image_source to be a source",
    )
    for field in ("seq_len", "batch_size", "image_size", "num_timesteps", "tokenizer_vocab_size",
                  "tokenizer_train_documents", "shapes_num_documents", "read_threads",
                  "read_buffer_size", "worker_buffer_size"):
        _check(c[field] >= 1, field, c[field], "an integer >= 1")
    for field in ("num_epochs", "worker_count", "seed", "shapes_seed"):
        _check(c[field] >= 0, field, c[field], "an integer >= 0")
    _check(c.seed < 2**31, "seed", c.seed, "an integer < 2**31")
    _check(c.max_images == -1 or c.max_images >= 1, "max_images", c.max_images, "-1 (as many as fit) or >= 1")
    _check(c.get("image_budget", 0) >= 0, "image_budget", c.get("image_budget", 0),
           "an integer >= 0 (images per data.image_budget_rows rows; 0: no budget)")
    _check(c.get("image_budget_rows", 1) >= 1, "image_budget_rows", c.get("image_budget_rows", 1),
           "an integer >= 1 (rows that share data.image_budget)")
    for field in ("caption_first_prob", "p_uncond", "shapes_interleaved_fraction"):
        _check(0.0 <= c[field] <= 1.0, field, c[field], "a probability in [0, 1]")
    _check(isinstance(c.pack_split_text, bool), "pack_split_text", c.pack_split_text,
           "true or false")
    _check(c.text_to_patch_ratio > 0, "text_to_patch_ratio", c.text_to_patch_ratio, "a number > 0")
    _check(isinstance(c.get("mix_patches_per_image", 0), int)
           and c.get("mix_patches_per_image", 0) >= 0, "mix_patches_per_image",
           c.get("mix_patches_per_image", 0), "an integer >= 0 (0: the model's patches per image)")
    noise_limit = c.get("noise_limit", True)  # configs written before the field: the paper's
    _check(isinstance(noise_limit, bool), "noise_limit", noise_limit, "true or false")
    _check(c.shapes_split in SHAPES_SPLITS, "shapes_split", c.shapes_split, f"one of {SHAPES_SPLITS}")
    _check(c.tokenizer_train_source in ("shapes", "sources"), "tokenizer_train_source",
           c.tokenizer_train_source, "'shapes' or 'sources'")
    _check(c.text_source != "tfds" or bool(c.tfds_name), "tfds_name", c.tfds_name,
           "a TFDS name such as 'c4/en' when text_source is 'tfds'")
    _check(c.text_source != "text_files" or bool(c.text_files_path), "text_files_path",
           c.text_files_path, "a path when text_source is 'text_files'")
    _check(c.image_source != "image_files" or bool(c.image_files_path), "image_files_path",
           c.image_files_path, "a path when image_source is 'image_files'")
    _check(c.image_source != "latents" or bool(c.latents_dir), "latents_dir", c.latents_dir,
           "the --out folder of transfusion_jax.precompute when image_source is 'latents'")
    _check_shards(c)
    for field in ("coco_karpathy_json", "coco_image_root"):
        _check(c.image_source != "coco" or bool(c[field]), field, c[field],
               "a path when image_source is 'coco'")
    _check(isinstance(c.get("require_real_data", False), bool), "require_real_data",
           c.get("require_real_data"), "true or false")
    from transfusion_jax.data.mixture import validate_mixture  # it validates each source's config

    validate_mixture(c, validate_data_config)


def _check_shards(c: ml_collections.ConfigDict) -> None:
    """The shard fields (issue 15); `shards` is only required of a shard image source."""
    shards = c.get("shards", "")
    _check(isinstance(shards, (str, list, tuple)), "shards", shards,
           "comma-separated paths or globs (a string), or a list of them")
    listed = shards.strip(" ,") if isinstance(shards, str) else list(shards)
    _check(c.image_source not in SHARD_SOURCES or bool(listed), "shards", shards,
           f"paths or globs of img2dataset's shards when image_source is {c.image_source!r} "
           "(e.g. 'gs://bucket/cc12m/{00000..01242}.tar')")
    for field in ("shard_image_key", "shard_caption_key"):
        value = c.get(field, "x")
        _check(isinstance(value, str) and bool(value.strip(" ;")), field, value,
               "a non-empty string (a tar member extension or Parquet column name)")
    _check(c.get("min_image_size", 0) >= 0, "min_image_size", c.get("min_image_size", 0),
           "an integer >= 0 (pixels of the shorter side; 0: no filter)")
    _check(c.get("cycle_length", 1) >= 1, "cycle_length", c.get("cycle_length", 1),
           "an integer >= 1 (shards open at once per worker)")


def resolve_max_images(c: ml_collections.ConfigDict, patches_per_image: int) -> int:
    """M for this model: the configured slots, or as many images as fit in a row."""
    check_fits(c, patches_per_image)
    return int(c.seq_len // (patches_per_image + 2)) if c.max_images == -1 else c.max_images


def resolve_image_budget(c: ml_collections.ConfigDict, max_images: int) -> tuple[int, int]:
    """(R, K) of a data.image_budget (K >= 1): images at most K per group of R rows."""
    rows, budget = c.get("image_budget_rows", 1), c.get("image_budget", 0)
    if not max_images <= budget <= rows * max_images:
        raise ValueError(
            f"data.image_budget = {budget}: expected between max_images ({max_images}: a row's "
            f"slots) and image_budget_rows * max_images ({rows * max_images}: every slot), or 0")
    return rows, budget


def check_fits(c: ml_collections.ConfigDict, patches_per_image: int) -> None:
    """An image needs P patch elements plus BOI and EOI in one row: P + 2 <= L."""
    if isinstance(patches_per_image, bool) or not hasattr(patches_per_image, "__index__") \
            or patches_per_image < 1:
        raise ValueError(f"patches_per_image = {patches_per_image!r}: expected an integer >= 1")
    if patches_per_image + 2 > c.seq_len:
        raise ValueError(
            f"an image cannot fit in a row: patches_per_image ({patches_per_image}) + 2 (BOI, EOI) "
            f"> data.seq_len ({c.seq_len}); expected data.seq_len >= {patches_per_image + 2}"
        )
