"""The Grain pipeline: sources -> documents -> mixed stream -> packed rows -> per-host batches.

    per stream:  source -> global shuffle (seed, reshuffled each epoch) -> host shard
                 -> repeat -> documents (seeded per record) -> to_iter_dataset
    then:        ratio mix -> pack rows -> batch -> worker processes (optional)
    or, with data.mixture (data/mixture.py): one stream per source, each seeded by its name,
                 then weighted mix + pack, the weights by step (mixing.py) -> batch -> workers

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

from transfusion_jax.data import counters, mixture
from transfusion_jax.data.config import (resolve_image_budget, resolve_max_images,
                                         validate_data_config)
from transfusion_jax.data.documents import DocumentBuilder
from transfusion_jax.data.latent_records import LatentsSource, check_latents
from transfusion_jax.data.mixing import RatioMixIterDataset, ScheduledMixPackIterDataset
from transfusion_jax.data.packing import COUNTS_KEY, PackIterDataset
from transfusion_jax.data.shards import DocumentMapIterDataset, ShardSource
from transfusion_jax.data.sources import build_mixture_sources, build_sources

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


def source_stream(config, source, builder, stream: int, *, shard_index: int,
                  shard_count: int) -> grain.IterDataset | None:
    """One source's documents for one host, as a Grain IterDataset; None for no source.

    `source`: an indexed source (sources.py), globally shuffled per epoch and split by host
    (record i::shard_count of the shuffle), or a ShardSource (img2dataset shards, issue 15),
    whose shards are shuffled and dealt to hosts and workers per epoch by shards.py. Either
    way `builder` (a DocumentBuilder) makes each record a document with random draws seeded
    by (config.seed, stream) and the record."""
    if source is None:
        return None
    shuffle_seed, document_seed = _seeds(config.seed, stream)
    if isinstance(source, ShardSource):
        ds = source.dataset(seed=shuffle_seed, num_epochs=config.num_epochs,
                            shard_index=shard_index, shard_count=shard_count,
                            worker_count=config.worker_count)
        return DocumentMapIterDataset(ds, builder, seed=document_seed,
                                      num_threads=config.read_threads,
                                      buffer_size=config.read_buffer_size)
    if len(source) < shard_count:
        raise ValueError(f"a source of {len(source)} documents cannot be split over "
                         f"{shard_count} hosts; expected at least one document per host")
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
    ds = ds[shard_index::shard_count]
    ds = ds.repeat(config.num_epochs or None)
    ds = ds.random_map(builder, seed=document_seed)
    return ds.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size))


class DataPipeline:
    """An iterator of per-host batches: dicts of numpy arrays, exactly the batch contract.

    state = pipeline.get_state()   # bytes (JSON); save it with the model checkpoint
    pipeline.set_state(state)      # continue with the batches that followed that state
    pipeline.metrics()             # counters of everything consumed so far

    `latent_shape`, when given, is what the model expects of one precomputed image
    (image_source "latents"): (h, w, C) VAE latents (Transfusion), (h, w) VQ code ids
    (Chameleon); a folder of another kind or shape is an error at start. Without it the folder
    must hold VAE latents (latent_records.expected_kind), of any shape the patches fit.

    With data.mixture (data/mixture.py) the documents come from its weighted sources, and
    `total_steps` (the run's) places the steps of the weights' schedules; metrics() then
    reports each source's realised share, mix/<name>/share (of elements) and document_share.
    """

    def __init__(self, config, *, patches_per_image: int, tokenizer,
                 shard_index: int | None = None, shard_count: int | None = None,
                 latent_shape: tuple[int, ...] | None = None, total_steps: int | None = None,
                 grad_accum: int = 1):
        validate_data_config(config)
        self.max_images = resolve_max_images(config, patches_per_image)  # raises if P + 2 > L
        self.patches_per_image = patches_per_image = int(patches_per_image)
        self.shard_index, self.shard_count = _resolve_shard(shard_index, shard_count)
        if config.batch_size % self.shard_count:
            raise ValueError(f"data.batch_size = {config.batch_size}: expected a multiple of the "
                             f"host count ({self.shard_count})")
        self.batch_size = config.batch_size // self.shard_count
        self.image_budget = _image_budget(config, self.max_images, self.batch_size, grad_accum)
        self.seq_len = config.seq_len
        # What a saved state is only valid for: a state restored elsewhere would silently
        # give different batches.
        self._layout = {"seed": config.seed, "seq_len": config.seq_len, "batch_size": config.batch_size,
                        "max_images": self.max_images, "patches_per_image": patches_per_image,
                        "shard_index": self.shard_index, "shard_count": self.shard_count,
                        "worker_count": config.worker_count, "text_source": config.text_source,
                        "image_source": config.image_source}
        self.mixture = mixture.names(config)  # () without a data.mixture
        if self.mixture:  # a state of other sources would not fit these streams
            self._layout["mixture"] = list(self.mixture)
        if self.image_budget:  # nor one of rows packed to another budget
            self._layout["image_budget"] = list(self.image_budget)
        self.total_steps = total_steps
        self._dataset = self._build(config, tokenizer, latent_shape)
        self._iterator = iter(self._dataset)
        self._counts = np.zeros(len(counters.COUNTERS), np.int64)

    def _stream(self, source, builder, stream: int, config) -> grain.IterDataset | None:
        return source_stream(config, source, builder, stream, shard_index=self.shard_index,
                             shard_count=self.shard_count)

    def _build(self, config, tokenizer, latent_shape) -> grain.IterDataset:
        if self.mixture:
            return self._batches(config, self._mixture_rows(config, tokenizer, latent_shape))
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
            latent_shape=self.latent_shape, split_text=config.pack_split_text,
            image_budget=self.image_budget)
        return self._batches(config, rows)

    def _batches(self, config, rows: grain.IterDataset) -> grain.IterDataset:
        batches = rows.batch(self.batch_size, drop_remainder=True)
        if config.worker_count:
            _use_default_flags_if_unparsed()
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
        return batches

    def _mixture_rows(self, config, tokenizer, latent_shape) -> grain.IterDataset:
        """data.mixture: each entry's source as its own stream (its sub-config, its own seed
        stream, mixture.stream_index), mixed at the weights of each step, packed into rows."""
        streams = {}
        configs = [mixture.entry_config(config, i) for i in range(len(self.mixture))]
        sources = build_mixture_sources(config)
        latents = [i for i, source in enumerate(sources) if isinstance(source, LatentsSource)]
        pixels = [i for i, sub in enumerate(configs)
                  if sub.image_source != "none" and i not in latents]
        if latents and pixels:  # one batch holds images or latents, never both
            raise ValueError(f"data.mixture[{latents[0]}].image_source = 'latents' next to "
                             f"data.mixture[{pixels[0]}].image_source = "
                             f"{configs[pixels[0]].image_source!r}: expected every image source "
                             "precomputed (python -m transfusion_jax.precompute) or none")
        self.latent_shape = None  # pixels
        for i in latents:
            check_latents(sources[i], image_size=config.image_size,
                          patches_per_image=self.patches_per_image,
                          latent_shape=latent_shape or self.latent_shape)
            self.latent_shape = sources[i].latent_shape
        for i, (entry, sub, source) in enumerate(zip(mixture.entries(config), configs, sources)):
            builder = _document_builder(sub, tokenizer, self.patches_per_image, self.latent_shape)
            streams[entry["name"]] = self._stream(source, builder, mixture.stream_index(entry),
                                                  sub)
        return ScheduledMixPackIterDataset(
            streams, mixture.phases(config, self.total_steps), rows_per_batch=self.batch_size,
            seq_len=config.seq_len, max_images=self.max_images,
            patches_per_image=self.patches_per_image, image_size=config.image_size,
            pad_id=tokenizer.pad_id, boi_id=tokenizer.boi_id, num_timesteps=config.num_timesteps,
            latent_shape=self.latent_shape, split_text=config.pack_split_text,
            image_budget=self.image_budget)

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
        """Counters (documents, skipped_<reason>, rows, text_tokens, patches, ...) and rates;
        with a data.mixture, each source's mix/<name>/{elements, documents, share,
        document_share} (counters.with_rates)."""
        return counters.with_rates(self.counts(), self.mixture)

    def counts(self) -> dict[str, int]:
        """The raw counters of everything consumed so far (several pipelines' add up)."""
        return counters.as_dict(self._counts)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def make_pipeline(config, *, patches_per_image: int, tokenizer,
                  shard_index: int | None = None, shard_count: int | None = None,
                  latent_shape: tuple[int, ...] | None = None,
                  total_steps: int | None = None, grad_accum: int = 1) -> DataPipeline:
    """The trainer's entry point. `config` is the data ConfigDict (`config.data`);
    `patches_per_image` = (image_size / downsample / patch_size)^2 of the model;
    shard defaults: this host, jax.process_index() of jax.process_count();
    `latent_shape`: what the model reads of one precomputed image (image_source "latents"),
    checked against the folder when given: (latent_size, latent_size, latent_channels) of a
    Transfusion model (VAE latents), (latent_size, latent_size) of a Chameleon model (VQ code
    ids; int32 `latents` [B, M, h, w] in its batches); `total_steps`: the run's, which a
    data.mixture weight schedule needs (its switches are fractions of it); `grad_accum`: the
    run's, whose microbatches a data.image_budget's row groups follow (packing.py)."""
    return DataPipeline(config, patches_per_image=patches_per_image, tokenizer=tokenizer,
                        shard_index=shard_index, shard_count=shard_count,
                        latent_shape=latent_shape, total_steps=total_steps,
                        grad_accum=grad_accum)


def _image_budget(config, max_images: int, rows_per_batch: int, grad_accum: int):
    """(R, K, A) of data.image_budget for the packer, or None without one. A stream's batch
    must hold whole blocks of A*R rows, so that groups never straddle streams or batches."""
    if not config.get("image_budget", 0):
        return None
    rows, budget = resolve_image_budget(config, max_images)
    if rows_per_batch % (grad_accum * rows):
        raise ValueError(
            f"data.image_budget_rows = {rows}: a stream's {rows_per_batch} rows per batch must "
            f"be a multiple of grad_accum ({grad_accum}) times image_budget_rows")
    return rows, budget, grad_accum


def _document_builder(config, tokenizer, patches_per_image: int, latent_shape) -> DocumentBuilder:
    """One source's DocumentBuilder: its caption_first_prob and p_uncond, the run's rest."""
    return DocumentBuilder(
        tokenizer, patches_per_image=patches_per_image, image_size=config.image_size,
        caption_first_prob=config.caption_first_prob, p_uncond=config.p_uncond,
        num_timesteps=config.num_timesteps, latent_shape=latent_shape,
        noise_limit=config.get("noise_limit", True),
        mix_patches_per_image=config.get("mix_patches_per_image", 0))
