"""The Grain pipeline: sources -> documents -> mixed stream -> packed rows -> per-host batches.

    per stream:  source -> global shuffle (seed, reshuffled each epoch) -> host shard
                 -> repeat -> documents (seeded per record) -> to_iter_dataset
    then:        ratio mix -> pack rows -> batch -> worker processes (optional)

Batches are a function of (config, seed, P, shard, worker_count) and the step: the shuffle and
every per-document draw are seeded by record index, and the packer/mixer states are part of
the iterator state, so restoring a state continues with exactly the batches that would have
followed. Changing `worker_count` changes the order (each worker packs its own slice).

With data.image_source "latents" (images precomputed by transfusion_jax.precompute) a batch
carries `latents` in place of `images`: float32 [B, M, h, w, C] raw VAE means for the
Transfusion model, or int32 [B, M, h, w] VQ-VAE code ids for the Chameleon baseline (exact;
which one the caller's `latent_shape` says, and the folder must hold that kind). Its other
fields are the ones the source the latents came from gives for the same seed.
"""
from __future__ import annotations

import json

import grain
import numpy as np

from transfusion_jax.data import counters
from transfusion_jax.data.config import resolve_max_images, validate_data_config
from transfusion_jax.data.documents import DocumentBuilder
from transfusion_jax.data.latent_records import LatentsSource, check_latents
from transfusion_jax.data.mixing import RatioMixIterDataset
from transfusion_jax.data.packing import COUNTS_KEY, PackIterDataset
from transfusion_jax.data.sources import build_sources

_STATE_FORMAT = 1


def _seeds(seed: int, stream: int) -> tuple[int, int]:
    """(shuffle seed, document seed) of a stream, independent across streams."""
    a, b = np.random.SeedSequence([seed, stream]).generate_state(2)
    return int(a), int(b)


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # only here: the data package does not need jax otherwise

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index = {shard_index}: expected 0 <= shard_index < shard_count ({shard_count})")
    return shard_index, shard_count


def _use_default_flags_if_unparsed() -> None:
    """Grain's worker processes read an absl flag; outside absl.app (pytest, notebooks, plain
    scripts) flags are unparsed and reading one raises. Their defaults are what we want."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataPipeline:
    """An iterator of per-host batches: dicts of numpy arrays, exactly the batch contract.

    state = pipeline.get_state()   # bytes (JSON); save it with the model checkpoint
    pipeline.set_state(state)      # continue with the batches that followed that state
    pipeline.metrics()             # counters of everything consumed so far

    `latent_shape`, when given, is what the model expects of one precomputed image
    (image_source "latents"): (h, w, C) VAE latents (Transfusion), (h, w) VQ code ids
    (Chameleon); a folder of another kind or shape is an error at start. Without it the folder
    must hold VAE latents (latent_records.expected_kind), of any shape the patches fit.
    """

    def __init__(self, config, *, patches_per_image: int, tokenizer,
                 shard_index: int | None = None, shard_count: int | None = None,
                 latent_shape: tuple[int, ...] | None = None):
        validate_data_config(config)
        self.max_images = resolve_max_images(config, patches_per_image)  # raises if P + 2 > L
        self.patches_per_image = patches_per_image = int(patches_per_image)
        self.shard_index, self.shard_count = _resolve_shard(shard_index, shard_count)
        if config.batch_size % self.shard_count:
            raise ValueError(f"data.batch_size = {config.batch_size}: expected a multiple of the "
                             f"host count ({self.shard_count})")
        self.batch_size = config.batch_size // self.shard_count
        self.seq_len = config.seq_len
        # What a saved state is only valid for: a state restored elsewhere would silently
        # give different batches.
        self._layout = {"seed": config.seed, "seq_len": config.seq_len, "batch_size": config.batch_size,
                        "max_images": self.max_images, "patches_per_image": patches_per_image,
                        "shard_index": self.shard_index, "shard_count": self.shard_count,
                        "worker_count": config.worker_count, "text_source": config.text_source,
                        "image_source": config.image_source}
        self._dataset = self._build(config, tokenizer, latent_shape)
        self._iterator = iter(self._dataset)
        self._counts = np.zeros(len(counters.COUNTERS), np.int64)

    def _stream(self, source, builder, stream: int, config) -> grain.IterDataset | None:
        if source is None:
            return None
        if len(source) < self.shard_count:
            raise ValueError(f"a source of {len(source)} documents cannot be split over "
                             f"{self.shard_count} hosts; expected at least one document per host")
        shuffle_seed, document_seed = _seeds(config.seed, stream)
        ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
        ds = ds[self.shard_index::self.shard_count]
        ds = ds.repeat(config.num_epochs or None)
        ds = ds.random_map(builder, seed=document_seed)
        return ds.to_iter_dataset(grain.ReadOptions(
            num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size))

    def _build(self, config, tokenizer, latent_shape) -> grain.IterDataset:
        text_source, image_source = build_sources(config)
        self.latent_shape = None  # pixels
        if isinstance(image_source, LatentsSource):
            check_latents(image_source, image_size=config.image_size,
                          patches_per_image=self.patches_per_image, latent_shape=latent_shape)
            self.latent_shape = image_source.latent_shape
        builder = DocumentBuilder(
            tokenizer, patches_per_image=self.patches_per_image, image_size=config.image_size,
            caption_first_prob=config.caption_first_prob, p_uncond=config.p_uncond,
            num_timesteps=config.num_timesteps, latent_shape=self.latent_shape,
            noise_limit=config.get("noise_limit", True),
            mix_patches_per_image=config.get("mix_patches_per_image", 0))
        docs = RatioMixIterDataset(self._stream(text_source, builder, 0, config),
                                   self._stream(image_source, builder, 1, config),
                                   config.text_to_patch_ratio)
        rows = PackIterDataset(
            docs, seq_len=config.seq_len, max_images=self.max_images,
            patches_per_image=self.patches_per_image, image_size=config.image_size,
            pad_id=tokenizer.pad_id, boi_id=tokenizer.boi_id, num_timesteps=config.num_timesteps,
            latent_shape=self.latent_shape, split_text=config.pack_split_text)
        batches = rows.batch(self.batch_size, drop_remainder=True)
        if config.worker_count:
            _use_default_flags_if_unparsed()
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
        return batches

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._counts += batch.pop(COUNTS_KEY).sum(axis=0)
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"format": _STATE_FORMAT, "layout": self._layout,
                           "grain": self._iterator.get_state(),
                           "counts": counters.as_dict(self._counts)}).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"data pipeline state format {state.get('format')!r}: expected {_STATE_FORMAT}")
        for key, value in self._layout.items():
            if state["layout"].get(key) != value:
                raise ValueError(f"data pipeline state was saved with {key} = {state['layout'].get(key)!r}; "
                                 f"this pipeline has {key} = {value!r}: expected the same")
        self._iterator.set_state(state["grain"])
        self._counts = np.array([state["counts"].get(n, 0) for n in counters.COUNTERS], np.int64)

    def metrics(self) -> dict[str, float]:
        """Counters (documents, skipped_<reason>, rows, text_tokens, patches, ...) and rates."""
        return counters.with_rates(counters.as_dict(self._counts))

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def make_pipeline(config, *, patches_per_image: int, tokenizer,
                  shard_index: int | None = None, shard_count: int | None = None,
                  latent_shape: tuple[int, ...] | None = None) -> DataPipeline:
    """The trainer's entry point. `config` is the data ConfigDict (`config.data`);
    `patches_per_image` = (image_size / downsample / patch_size)^2 of the model;
    shard defaults: this host, jax.process_index() of jax.process_count();
    `latent_shape`: what the model reads of one precomputed image (image_source "latents"),
    checked against the folder when given: (latent_size, latent_size, latent_channels) of a
    Transfusion model (VAE latents), (latent_size, latent_size) of a Chameleon model (VQ code
    ids; int32 `latents` [B, M, h, w] in its batches)."""
    return DataPipeline(config, patches_per_image=patches_per_image, tokenizer=tokenizer,
                        shard_index=shard_index, shard_count=shard_count,
                        latent_shape=latent_shape)
