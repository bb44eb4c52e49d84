"""``tune``: the only stage that imports Optuna for member studies.

- ``space``: the preset's search space into one trial's plain configs (``suggest``)
- ``pruners``: pruners by name and the pruning report listener
- ``storage``: the Optuna storage, its heartbeats and the cross-process lock
- ``session``: one session (studies, parent run, data) per worker process
- ``trial``: one trial as one nested run, whatever happens inside
- ``conclude``: how a trial ends: told first (its heartbeat still beating), then its run closed
- ``workers``: admission against the budget, member studies, threads, lost workers
- ``candidates``: the top trials handed to the ensemble stage
- ``run``: ``run_tuning``, the whole session, and ``summary``, what it prints
"""

from .run import TuneSummary, run_tuning
from .session import Session, TuneError, open_session
from .space import suggest
from .workers import run_member_study

__all__ = ["TuneSummary", "run_tuning", "Session", "TuneError", "open_session", "suggest", "run_member_study"]
