"""Search efficiency: epochs a study spends to come within one point of its best, pruning against none."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from .. import metrics as M
from ..config import DataConfig, ModelConfig, TrainConfig, load_preset
from ..data import Dataset, load_dataset
from ..train import build_and_fit
from .settings import WITHIN, BenchSettings, subsample


def bench_search(settings: BenchSettings, search_data: DataConfig | None) -> dict[str, Any]:
    """Two real Optuna studies on the embedded dataset (the ``demo`` preset's data, space and trainer),
    same TPE seed and trial count: ``search_pruner`` against no pruning."""
    import optuna

    demo = load_preset("demo")
    data_cfg = search_data or demo.data
    data, _ = subsample(load_dataset(data_cfg), settings.search_max_train, settings.seed)
    model_cfg = replace(demo.model, arch=demo.study.members[0], num_classes=data.num_classes)
    train_cfg = replace(demo.train, epochs=settings.search_epochs, device=settings.device, seed=settings.seed)
    if settings.search_warmup is not None:
        demo = replace(demo, study=replace(demo.study, pruner_warmup_epochs=settings.search_warmup))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = {}
    for label, pruner in ((settings.search_pruner, settings.search_pruner), ("none", "none")):
        studies[label] = run_study(pruner, settings.search_trials, demo.study, data, data_cfg, model_cfg, train_cfg)
    pruned, plain = studies[settings.search_pruner], studies["none"]
    # Stricter reading: epochs the pruned study needs to come within 1 point of the *unpruned* study's best.
    cross = epochs_to_reach(pruned["trace"], plain["final_best"] - WITHIN)
    return {"dataset": str(data.root), "train_images": len(data.train), "val_images": len(data.validation),
            "arch": model_cfg.arch, "trials": settings.search_trials, "max_epochs": settings.search_epochs,
            "pruner": settings.search_pruner, "pruner_warmup_epochs": demo.study.pruner_warmup_epochs,
            "with_pruning": pruned, "without_pruning": plain,
            "epoch_ratio": pruned["epochs_to_within_1pt"] / plain["epochs_to_within_1pt"],
            "total_epoch_ratio": pruned["total_epochs"] / plain["total_epochs"],
            "pruned_epochs_to_within_1pt_of_unpruned_best": cross,
            "cross_epoch_ratio": cross / plain["epochs_to_within_1pt"] if cross is not None else None}


def epochs_to_reach(trace: list[float], target: float) -> int | None:
    """Cumulative epochs until one epoch's validation accuracy reaches ``target`` (None: never)."""
    return next((i + 1 for i, acc in enumerate(trace) if acc >= target), None)


def run_study(pruner_name: str, trials: int, study_cfg, data: Dataset, data_cfg: DataConfig,
              model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """Trials one after another as ``tune`` runs them (``trial_configs``, ``build_and_fit``, ``PruningReporter``);
    every epoch's validation accuracy is kept in order, so epochs-to-target can be counted."""
    import optuna
    from optuna.trial import TrialState

    from ..tune.pruners import PruningReporter, make_pruner
    from ..tune.sampling import trial_configs

    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=study_cfg.sampler_seed, n_startup_trials=3),
                                pruner=make_pruner(pruner_name, study_cfg.pruner_warmup_epochs, train_cfg.epochs))
    # Every epoch read (pruners compare trials epoch by epoch), whatever it costs.
    train_cfg = replace(train_cfg, evaluations=train_cfg.epochs, eval_share=1.0)
    trace: list[float] = []  # validation accuracy of every epoch, in the order they ran
    t0 = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        m_cfg, t_cfg, d_cfg = trial_configs(trial, study_cfg.space, model_cfg, train_cfg, data_cfg)
        pruning = PruningReporter(trial)

        def listener(epoch: int, values: dict[str, float], pruning=pruning) -> None:
            trace.append(values[M.OBJECTIVE])
            pruning(epoch, values)

        try:
            result = build_and_fit(m_cfg, data, d_cfg, t_cfg, report=listener)
            study.tell(trial, result.best_val_accuracy)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except Exception:  # noqa: BLE001 - fail the trial, not the study (its epochs still count)
            study.tell(trial, state=TrialState.FAIL)
    if not trace:
        raise RuntimeError(f"bench search: all {trials} trials failed before their first epoch")
    final = max(trace)
    states = [t.state for t in study.trials]
    return {"final_best": final, "epochs_to_within_1pt": epochs_to_reach(trace, final - WITHIN),
            "total_epochs": len(trace), "trace": trace,
            "complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL),
            "seconds": time.perf_counter() - t0}
