"""Run one command with MRI_HOME set to a scratch folder, and remove that folder when it ends.

``python -m mri_assets.scratch_home FOLDER -- COMMAND...`` is how LocalRunLauncher starts a run
worker when ``scratch_home_per_run`` is on: the folder is removed however the worker ends (success,
failure, ``kill -9``, out of memory). If this supervisor itself is killed, the kernel kills the
worker too (PR_SET_PDEATHSIG) and the launcher's health check removes the folder. Standard library
only, so it starts fast and adds nothing to the run worker's own import time.
"""

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: be killed when the supervisor dies (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_in_scratch_home(home: str, command: list[str]) -> int:
    """Run ``command`` with MRI_HOME=``home``; remove ``home`` afterwards; return its exit code."""
    try:
        worker = subprocess.Popen(
            command, env={**os.environ, "MRI_HOME": home}, preexec_fn=die_with_parent
        )

        # A termination request (the launcher's terminate, a stopping server) goes to the
        # worker, which then ends the run as canceled; the folder goes once it has exited.
        def forward(signum, _frame):
            worker.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return worker.wait()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m mri_assets.scratch_home FOLDER -- COMMAND...", file=sys.stderr)
        return 2
    return run_in_scratch_home(argv[0], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
