"""Pruners by name, and the listener that feeds one: the only pruning code ``tune`` and ``bench`` run."""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from .. import metrics as M


class AlwaysPruner(optuna.pruners.BasePruner):
    """Prunes every trial at its first report once the study has a complete trial (tests use it to
    force a pruned trial while keeping one complete trial per member for the ensemble)."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


# name -> factory(warm-up epochs, max epochs); keyed as config.PRUNERS, which says what each does.
FACTORIES: dict[str, Callable[[int, int], optuna.pruners.BasePruner]] = {
    # below the median of earlier trials at the same epoch; no pruning until 2 trials have finished
    "median": lambda warmup, max_epochs: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup),
    # several successive-halving brackets between the warm-up and the trials' last epoch
    "hyperband": lambda warmup, max_epochs: optuna.pruners.HyperbandPruner(min_resource=max(1, warmup),
                                                                           max_resource=max_epochs),
    # asynchronous successive halving: rungs at 1, 3, 9... epochs (from the warm-up), a third goes on
    "asha": lambda warmup, max_epochs: optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup),
                                                                              reduction_factor=3),
    # every trial runs to its end
    "none": lambda warmup, max_epochs: optuna.pruners.NopPruner(),
    # tests only: a pruned trial on demand
    "always": lambda warmup, max_epochs: AlwaysPruner(),
}


def make_pruner(name: str, warmup: int, max_epochs: int) -> optuna.pruners.BasePruner:
    return FACTORIES[name](warmup, max_epochs)


class PruningReporter:
    """``fit``'s report listener for a trial: report the objective, raise ``TrialPruned`` when told."""

    def __init__(self, trial: optuna.Trial, prune: bool = True):
        self.trial, self.prune = trial, prune  # prune=False: report only (a refit is never pruned)
        self.last_epoch = 0

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        self.last_epoch = epoch
        if M.OBJECTIVE not in values:  # an epoch without an evaluation (a decaying schedule's cadence)
            return
        self.trial.report(values[M.OBJECTIVE], epoch)
        if self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
