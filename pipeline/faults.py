"""Test-only fault injection for the conditions a CPU cannot produce on demand.

``DEEPFAKE_TUNE_FAULT="kind@arch#trial[,kind@arch#trial...]"`` makes trial ``trial`` of member
study ``arch`` hit a fault, so the tests can show that the trial fails with a clear reason and the
study goes on. ``tune`` is the only caller. Kinds:

- ``cuda_oom``: ``torch.OutOfMemoryError`` raised from inside ``fit`` (at the first epoch report,
  while the model and optimiser are alive), as a GPU that runs out of memory would.
- ``artifact_failure``: an ``OSError`` where the trial logs its checkpoint and predictions.
- ``slow_tracking``: a pause of three heartbeat intervals where the finished trial is being closed
  (before its state is told), as a tracking server that answers slowly would cause.

A non-finite loss needs no hook: an enqueued trial with an absurd learning rate diverges for real.
Never set this variable outside tests.
"""

from __future__ import annotations

import os
import time

ENV = "DEEPFAKE_TUNE_FAULT"
KINDS = ("cuda_oom", "artifact_failure", "slow_tracking")


def armed(kind: str, arch: str, trial: int) -> bool:
    for item in os.environ.get(ENV, "").split(","):
        if item.strip() == f"{kind}@{arch}#{trial}":
            return True
    return False


def inject(kind: str, arch: str, trial: int, seconds: float = 0.0) -> None:
    """Raise (or, for ``slow_tracking``, wait ``seconds`` for) the fault ``kind`` if the environment
    arms it for this trial."""
    if not armed(kind, arch, trial):
        return
    if kind == "slow_tracking":
        time.sleep(seconds)
        return
    where = f"(injected by {ENV} for {arch} trial {trial})"
    if kind == "cuda_oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB {where}")
    if kind == "artifact_failure":
        raise OSError(f"could not upload artifacts: connection reset by peer {where}")
    raise ValueError(f"{ENV}: unknown fault {kind!r}; known: {', '.join(KINDS)}")
