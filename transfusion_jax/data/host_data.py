"""This process's rows of the global batch, read from a fixed number of data streams.

The global batch of B rows is the concatenation of S data streams: stream s is the data
pipeline with shard s of S (its own shuffled slice of every source, its own packer) and
supplies global rows [s*B/S, (s+1)*B/S). S is fixed for the life of a run: by default the
process count of its first start, then read from the checkpoint. Each of P processes feeds the
B/P consecutive global rows its devices hold (`process_rows`), so it reads the streams covering
those rows:

    S == P   one stream each, as usual;
    S >  P   S/P streams each (a 2-process checkpoint continues on 1 process exactly);
    S <  P   each stream is read by the P/S processes that share its rows, each keeping its
             slice (exact too; the packing work of a stream is repeated on those processes).

So batches, and with them the losses, do not depend on the process count: a checkpoint
restores on any topology and continues with the batches the original run would have seen.
"""
import numpy as np

from transfusion_jax.data import counters
from transfusion_jax.data.pipeline import make_pipeline


def process_rows(batch_sharding, batch_size: int) -> tuple[int, int]:
    """[lo, hi): the global rows held by this process's devices under `batch_sharding`."""
    index = batch_sharding.addressable_devices_indices_map((batch_size,))
    rows = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                   for s in index.values()})
    lo, hi = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != hi - lo:
        raise ValueError(f"this process's devices hold rows {rows} of the batch, not one "
                         "contiguous block: build the mesh with each host's devices together")
    return lo, hi


def stream_rows(batch_size: int, num_streams: int, lo: int, hi: int):
    """{stream: slice of its rows kept for global rows [lo, hi)}, in global row order."""
    if batch_size % num_streams:
        raise ValueError(f"data.batch_size={batch_size} must be divisible by the number of data "
                         f"streams ({num_streams})")
    per_stream = batch_size // num_streams
    return {s: slice(max(lo - s * per_stream, 0), min(hi - s * per_stream, per_stream))
            for s in range(lo // per_stream, -(-hi // per_stream))}


class HostData:
    """next() -> this process's rows (the batch contract, numpy: `images`, or `latents` for
    precomputed VAE latents or VQ code ids); states per stream. `latent_shape`: see
    make_pipeline ((h, w, C) for Transfusion, (h, w) for Chameleon); `total_steps`: the run's,
    for a data.mixture's weight schedules."""

    def __init__(self, config, *, patches_per_image: int, tokenizer, num_streams: int,
                 rows: tuple[int, int], latent_shape: tuple[int, ...] | None = None,
                 total_steps: int | None = None, grad_accum: int = 1):
        self.num_streams = num_streams
        self._rows = stream_rows(config.batch_size, num_streams, *rows)
        self._pipelines = {s: make_pipeline(config, patches_per_image=patches_per_image,
                                            tokenizer=tokenizer, shard_index=s,
                                            shard_count=num_streams, latent_shape=latent_shape,
                                            total_steps=total_steps, grad_accum=grad_accum)
                           for s in self._rows}
        self.max_images = next(iter(self._pipelines.values())).max_images
        # The process holding a stream's first row saves its state: exactly one per stream.
        self.owned = [s for s, rows in self._rows.items() if rows.start == 0]

    @property
    def streams(self) -> list[int]:
        return list(self._rows)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [{k: v[self._rows[s]] for k, v in next(p).items()}
                 for s, p in self._pipelines.items()]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def get_state(self) -> dict[int, bytes]:
        """The states of the streams this process saves (see `owned`)."""
        return {s: self._pipelines[s].get_state() for s in self.owned}

    def set_state(self, states: dict[int, bytes]) -> None:
        for s, pipeline in self._pipelines.items():
            pipeline.set_state(states[s])

    def metrics(self) -> dict[str, float]:
        """Counters of the streams this process owns (on process 0: what the log shows)."""
        pipelines = [self._pipelines[s] for s in self.owned] or \
            [next(iter(self._pipelines.values()))]
        owned = [p.counts() for p in pipelines]
        return counters.with_rates({k: sum(part[k] for part in owned) for k in counters.COUNTERS},
                                   pipelines[0].mixture)

    def close(self) -> None:
        for pipeline in self._pipelines.values():
            pipeline.close()
