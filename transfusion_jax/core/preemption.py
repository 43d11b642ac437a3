"""Preemption: SIGTERM/SIGINT (or the cluster's notice) ask the loop to checkpoint and stop."""
import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

from transfusion_jax.core import distributed


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints after the current step and exits.

    The process always ends within `grace_s` of the first signal (0: no limit): a save that
    hangs on storage, a long compile or an evaluation cannot keep it alive past the grace
    period a cluster gives before its SIGKILL (Kubernetes, SLURM's KillWait and GCE preemption:
    30 s by default); what is lost is what SIGKILL would lose, the steps since the last complete
    checkpoint. A second signal ends it at once.

    With several processes, all must stop after the same step, so no local handler: JAX's
    preemption service (on with jax.distributed) catches SIGTERM on any host and agrees on a
    step with the others, which `reached(step)` then reports on every host; the grace period
    then counts from that step (a process stuck before it, in a collective, is left to the
    cluster's SIGKILL)."""

    def __init__(self, grace_s: float = 0):
        self.requested = False
        self.grace_s = grace_s
        self._multi = jax.process_count() > 1
        if not self._multi:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.requested:
            _exit(f"second signal {name}: exiting now, without a checkpoint", 128 + signum)
        print(f"signal {name}: checkpointing after this step" +
              (f" (exiting in {self.grace_s:g}s at the latest)" if self.grace_s else ""),
              file=sys.stderr, flush=True)
        self.requested = True
        self._deadline(name, 128 + signum)

    def _deadline(self, what: str, code: int) -> None:
        if self.grace_s:
            timer = threading.Timer(self.grace_s, _exit, (
                f"still running {self.grace_s:g}s after {what} (preemption_grace_s): exiting "
                "without waiting further; the run resumes from its newest complete checkpoint",
                code))
            timer.daemon = True
            timer.start()

    def reached(self, step: int) -> bool:
        if self._multi and not self.requested:
            try:
                self.requested = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # no preemption service (jax.distributed not started)
                distributed.log(f"preemption notices are off: {e}")
                self._multi = False
            if self.requested:
                distributed.log(f"preemption notice: all processes checkpoint after step {step}")
                self._deadline("the preemption notice", 128 + signal.SIGTERM)
        return self.requested


def _exit(message: str, code: int) -> None:
    """Ends the process from any thread, whatever the others are doing (a hung write)."""
    print(message, file=sys.stderr, flush=True)
    os._exit(code)
