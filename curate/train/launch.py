"""`--nproc N`: start this same command in N processes under torch's elastic launcher (what `torchrun
--standalone --nproc-per-node N` does), and turn a failed rank into one line.

When a rank dies, the launcher's agent stops the others and raises; nothing waits on the dead rank's collectives.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

from curate.errors import UserError


def launch(nproc: int, argv: list[str]) -> None:
    """Run `python -m curate *argv` in `nproc` processes on this machine; returns when all have finished."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # One compute thread per process unless told (torchrun's default too): N processes on N cores, not N².
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the failure is said once, below
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "curate", *argv)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(file=sys.stderr)  # rank 0's progress bar may have been cut mid-line
        said = how(failure.exitcode)
        raise UserError(f"process {rank} of {nproc} {said}; the other processes were stopped") from None


def how(exitcode: int) -> str:
    if exitcode == 2:
        return "stopped on the error above"  # a UserError, said by the process itself
    if exitcode < 0:
        return (f"was killed by {signal.Signals(-exitcode).name} (rerun the same command to resume from the last "
                "checkpoint)")
    return f"failed with exit code {exitcode} (its output is above)"
