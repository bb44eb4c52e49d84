"""A picture of the session in its parent run, as PNGs the MLflow UI shows inline (Optuna's own
figures are HTML that loads plotly from a CDN, blank without internet):

- ``figures/val_accuracy_per_epoch.png``: every trial's validation accuracy per epoch, one panel
  per member study, pruned trials dashed, the study's best trial thick;
- ``figures/best_accuracy_vs_params.png``: each trial's best validation accuracy against each
  searched setting (hollow: pruned, best before pruning);
- ``figures/ensemble_weight_curve.png``: the ensemble run's accuracy-against-weight curve;
- ``optuna/<arch>/*.html``: Optuna's own figures (``log_study_figures``).

Validation accuracy chose the epochs, the trials and the pair, so these are *selection* accuracies.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import optuna
from optuna import visualization
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from .. import metrics as M
from .. import tracking
from ..progress import say
from .session import Session

DRAWN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def best_of(trial: FrozenTrial) -> float | None:
    """A complete trial's value, else its best reported epoch (pruned trials)."""
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        return float(trial.value)
    values = trial.intermediate_values
    return max(values.values()) if values else None


def epoch_curves(studies: dict[str, optuna.Study], title: str, path: Path) -> bool:
    """One panel per member study; False when no trial reported an epoch."""
    if not any(t.intermediate_values for s in studies.values() for t in s.get_trials(deepcopy=False, states=DRAWN)):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(studies), figsize=(5.2 * len(studies), 4), sharey=True, squeeze=False)
    for ax, (arch, study) in zip(axes[0], studies.items(), strict=False):
        trials = [t for t in study.get_trials(deepcopy=False, states=DRAWN) if t.intermediate_values]
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        best = max(complete, key=lambda t: t.value).number if complete else None
        colors = plt.get_cmap("tab10")
        for k, t in enumerate(trials):
            epochs = sorted(t.intermediate_values)
            style = {TrialState.COMPLETE: "-", TrialState.PRUNED: "--"}.get(t.state, ":")
            ax.plot(epochs, [t.intermediate_values[e] for e in epochs], style, marker="o", markersize=3,
                    color=colors(k % 10), lw=2.6 if t.number == best else 1.2,
                    label=f"#{t.number}" + (" pruned" if t.state == TrialState.PRUNED else "")
                    + (" best" if t.number == best else ""))
        ax.set_title(f"{arch}: {len(trials)} trials")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if 0 < len(trials) <= 12:
            ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("validation accuracy (selection)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def params_figure(studies: dict[str, optuna.Study], title: str, path: Path) -> bool:
    """One panel per searched setting; False when no trial has both parameters and a score."""
    plt = _pyplot()
    points: dict[str, list[tuple[str, FrozenTrial, float]]] = {}
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for arch, study in studies.items():
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            score = best_of(t)
            if score is None:
                continue
            for name in t.params:
                points.setdefault(name, []).append((arch, t, score))
                dists.setdefault(name, t.distributions[name])
    if not points:
        return False
    names = sorted(points)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), sharey=True, squeeze=False)
    colors = {arch: plt.get_cmap("tab10")(i) for i, arch in enumerate(studies)}
    for ax, name in zip(axes.flat, names, strict=False):
        dist = dists[name]
        categorical = isinstance(dist, CategoricalDistribution)
        for arch, t, score in points[name]:
            value = t.params[name]
            x = dist.choices.index(value) if categorical else value
            hollow = t.state == TrialState.PRUNED
            ax.scatter([x], [score], s=36, color="none" if hollow else colors[arch], edgecolors=colors[arch],
                       linewidths=1.4)
        if categorical:
            ax.set_xticks(range(len(dist.choices)), [str(c) for c in dist.choices])
        else:
            _numeric_axis(ax, dist, [t.params[name] for _, t, _ in points[name]])
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("best val accuracy")
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=a) for a, c in colors.items()]
    handles.append(plt.Line2D([], [], ls="", marker="o", color="gray", markerfacecolor="none", label="pruned"))
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _numeric_axis(ax, dist, values: list[float]) -> None:
    """Log scale for a log-searched setting whose values span a factor of 5 or more; plain numbers
    (0.0014, not 1.4x10^-3) on few ticks either way."""
    from matplotlib import ticker

    positive = [v for v in values if v > 0]
    if getattr(dist, "log", False) and positive and max(positive) / min(positive) >= 5:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(4))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def latest_ensemble_run(client, experiment_id: str, parent_run_id: str):
    """The session's most recent ensemble run (a resumed session may have registered it earlier)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}' "
                                                             "and tags.kind = 'ensemble'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def log_session_figures(session: Session) -> None:
    """Draw the figures and log them into the parent run; a figure never fails the session."""
    figures = ((M.EPOCH_CURVES_PNG, epoch_curves, "validation accuracy per epoch (dashed: pruned)"),
               (M.PARAMS_PNG, params_figure, "best validation accuracy per trial against each searched setting"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        drawn = []
        for name, draw, title in figures:
            path = out / Path(name).name
            try:
                if draw(session.studies, f"session {session.study_name}: {title}", path):
                    drawn.append(path)
            except Exception as exc:  # noqa: BLE001
                say(f"note: could not draw {name}: {exc}")
        try:
            run = latest_ensemble_run(session.client, session.experiment_id, session.parent_run_id)
            # Cross-fitted final runs have no curve: no selection image can score a weighted pair of them.
            if run is not None and any(f.path == M.WEIGHT_CURVE_PNG
                                       for f in session.client.list_artifacts(run.info.run_id)):
                (out / "dl").mkdir()
                got = tracking.download_artifact(session.client, run.info.run_id, M.WEIGHT_CURVE_PNG, out / "dl")
                path = out / Path(M.SESSION_WEIGHT_CURVE_PNG).name
                shutil.copyfile(got, path)
                drawn.append(path)
        except Exception as exc:  # noqa: BLE001 - e.g. an ensemble run without the curve
            say(f"note: could not copy the ensemble weight curve: {exc}")
        for path in drawn:
            try:
                session.client.log_artifact(session.parent_run_id, str(path), M.FIGURES_DIR)
            except Exception as exc:  # noqa: BLE001
                say(f"note: could not log {path.name}: {exc}")


def log_study_figures(session: Session) -> None:
    """Optuna's own figures (history, importances, intermediate values) into the parent run."""
    for arch, study in session.studies.items():
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:  # a member the plan gave no run: nothing to draw (Optuna would warn)
            continue
        figures = {"optimization_history": visualization.plot_optimization_history,
                   "intermediate_values": visualization.plot_intermediate_values}
        if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
            figures["param_importances"] = visualization.plot_param_importances
        for name, plot in figures.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fig = plot(study)
                session.client.log_figure(session.parent_run_id, fig, f"optuna/{arch}/{name}.html")
            except Exception as exc:  # noqa: BLE001 - a figure must never fail the session
                print(f"note: could not draw {name} for {arch}: {exc}")
