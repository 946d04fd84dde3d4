"""CPU priority of the serving processes. On a machine whose cores the engine shares with the
gateway, the Serve replicas and Ray's own processes, every step the engine waits for a core
costs every request; what the others do per token can wait a few milliseconds.

Ray starts its workers at nice 15 (`RAY_worker_niceness`), below Ray's own processes and any
other program at 0, and the engine actor is a worker like the rest. So: a Ray instance of our
own starts its workers at 0 (`WORKER_NICENESS`), and the processes that serve the engine (the
gateway, the model replicas' fronts, the metrics hub) run at nice 19, which any process may set
for itself. Measured in docs/performance.md ("Where the served path spends its CPU")."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet when it starts
WORKER_NICENESS = "0"
FRONT_NICENESS = 19


def yield_cpu_to_engines() -> None:
    """Run every thread of this process (and those it starts later) at FRONT_NICENESS."""
    try:
        for thread_id in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(thread_id), FRONT_NICENESS)
    except OSError as exc:  # NOTE: no /proc (not Linux), or a thread that just ended
        log.warning("could not lower this process's CPU priority: %s", exc)
