"""Data: sources, tokenizer, packing into the batch contract, Grain pipeline.

    from transfusion_jax.data import get_data_config, get_tokenizer, make_pipeline

    config = get_data_config(seq_len=4096, batch_size=8)          # or config.data of an experiment
    tokenizer = get_tokenizer(config, workdir)                     # trained once, kept in workdir
    pipeline = make_pipeline(config, patches_per_image=P, tokenizer=tokenizer)
    batch = next(pipeline)                                         # dict of numpy arrays (DESIGN.md):
                                                                   # `images`, or `latents` with
                                                                   # image_source "latents"
    state = pipeline.get_state(); pipeline.set_state(state)        # bytes, for the checkpoint
    pipeline.metrics()                                             # counters for logging

Modules: config (the data ConfigDict), shapes/ (the embedded shapes world: world, text,
held-out scenes, and their parsers), tokenizer, sources, documents (records -> documents),
packing (documents -> rows), mixing (text:patch ratio), pipeline (Grain), host_data (a host's
rows of the global batch, from its data streams), counters (pipeline metrics), latent_records
(precomputed latents: the format transfusion_jax.precompute writes, and their source), shards
(img2dataset's WebDataset tar and Parquet shards, streamed in a seeded shard order).
"""
from transfusion_jax.data.config import get_data_config
from transfusion_jax.data.pipeline import DataPipeline, make_pipeline
from transfusion_jax.data.tokenizer import Tokenizer, get_tokenizer

__all__ = ["DataPipeline", "Tokenizer", "get_data_config", "get_tokenizer", "make_pipeline"]
