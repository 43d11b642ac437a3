"""Preemption: SIGTERM/SIGINT (or the cluster's notice) ask the loop to checkpoint and stop."""
import signal
import sys

import jax
from jax.experimental import multihost_utils

from transfusion_jax.core import distributed


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints after the current step and exits.

    With several processes, all must stop after the same step, so no local handler: JAX's
    preemption service (on with jax.distributed) catches SIGTERM on any host and agrees on a
    step with the others, which `reached(step)` then reports on every host."""

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        if not self._multi:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        print(f"signal {signal.Signals(signum).name}: checkpointing after this step",
              file=sys.stderr, flush=True)
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi and not self.requested:
            try:
                self.requested = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # no preemption service (jax.distributed not started)
                distributed.log(f"preemption notices are off: {e}")
                self._multi = False
            if self.requested:
                distributed.log(f"preemption notice: all processes checkpoint after step {step}")
        return self.requested
