"""``tune``: the only stage that imports Optuna for member studies. One session, read top-down:

- ``run``: ``run_tuning``, the session as a list of steps
- ``session``: what a worker knows of its session (studies, parent run, data, budget, plan), opened once
- ``keys``: the study/trial attribute names and lock names workers share through the storage
- ``plan`` and ``budget``: the time budget's arithmetic (pure) and its phases on the clock
- ``phases``: the plan made and logged, defaults first, final runs or refits
- ``workers``: admission against the budget, member studies, threads, lost workers
- ``launcher``: ``--n-jobs`` as worker processes started, awaited and stopped by this one
- ``trial``: one trial as one nested run, and how it ends (told first, then its run closed)
- ``sampling``: the preset's search space into one trial's plain configs (``suggest``)
- ``pruners``: pruners by name and the pruning report listener
- ``storage``: the Optuna storage, its heartbeats and the cross-process lock
- ``candidates``: the top trials handed to the ensemble stage
- ``console`` and ``figures``: what the session says while it runs and at its end, and its figures
"""

from .console import TuneSummary
from .run import WorkerOptions, run_tuning
from .sampling import suggest
from .session import Session, TuneError, open_session

__all__ = ["TuneSummary", "WorkerOptions", "run_tuning", "Session", "TuneError", "open_session", "suggest"]
