"""Runs a trainer's entry point with one fault injected, for tests/test_fault_injection.py:

    python tests/fault_runner.py FAULT MODULE ARGS...

FAULT: `kill_in_save@N` (SIGKILL right after checkpoint N's asynchronous save started, while
its files are being written), `hang_in_save@N` (checkpoint N's save never returns: storage that
stops answering; the file named by $FAULT_MARK is created when it starts), `file_size@BYTES`
(no file may grow past BYTES, as on a full disk: writes fail with EFBIG), `none`.
The library has no fault hooks of its own: the faults are patched in here, from outside.
"""
import os
import random
import resource
import runpy
import signal
import sys
import time

from transfusion_jax.core import checkpoint


def main():
    fault, module, *args = sys.argv[1:]
    kind, _, value = fault.partition("@")
    save = checkpoint.save

    def faulty_save(manager, step, *a, **kw):
        if kind == "kill_in_save" and step == int(value):
            save(manager, step, *a, **kw)
            time.sleep(random.Random(step).uniform(0, 0.05))
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang_in_save" and step == int(value):
            open(os.environ["FAULT_MARK"], "w").close()
            while True:
                time.sleep(1)
        return save(manager, step, *a, **kw)

    checkpoint.save = faulty_save
    if kind == "file_size":
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(value), int(value)))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
