"""Direct links into the MLflow UI, in its model-training mode.

MLflow 3.17's UI opens an experiment on the GenAI "Overview" (traces, an assistant panel) unless the
URL carries ``workflowType=machine_learning``; the experiment tag ``mlflow.experimentKind`` does not
change that, and links inside the UI drop the parameter. So every link here carries it. The UI routes
with a hash (``/#/experiments/1/runs``); a nested run stays collapsed under its parent unless the
list is filtered and sorted, which is how "session runs" shows the trials flat.

The UI's address: ``$MLFLOW_UI_URL`` if set, else the tracking server itself for an http(s) tracking
URI (without credentials), else ``http://127.0.0.1:5000`` (``make ui``).

``python -m pipeline.tracking.links`` prints the links of the latest ``tune`` session (``make ui``).
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import quote, urlsplit, urlunsplit

import mlflow
from mlflow.tracking import MlflowClient

from .. import metrics as M
from .client import PARENT_TAG

UI_ENV = "MLFLOW_UI_URL"
DEFAULT_UI = "http://127.0.0.1:5000"
MODE = "workflowType=machine_learning"


def ui_base(tracking_uri: str | None = None) -> str:
    override = os.environ.get(UI_ENV, "").strip()
    if override:
        return override.rstrip("/")
    if tracking_uri is None:
        tracking_uri = mlflow.get_tracking_uri()
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        host = parts.netloc.rsplit("@", 1)[-1]  # never a password in a printed link
        return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return DEFAULT_UI


def _q(text: str) -> str:
    return quote(str(text), safe="")


def experiment_runs(base: str, experiment_id: str, parent_run_id: str | None = None, chart: bool = False) -> str:
    """The runs table (or the chart comparison); with ``parent_run_id``, that run's children, flat
    and sorted by name (any sort key other than start time turns the nesting off)."""
    query = [MODE]
    if parent_run_id:
        query += [f"searchFilter={_q(f'tags.`{PARENT_TAG}` = {chr(39)}{parent_run_id}{chr(39)}')}",
                  f"orderByKey={_q('tags.`mlflow.runName`')}", "orderByAsc=true"]
    if chart:
        query.append("compareRunsMode=CHART")
    return f"{base}/#/experiments/{_q(experiment_id)}/runs?{'&'.join(query)}"


def run_page(base: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's overview, or one of its artifacts shown inline (a PNG renders in the page)."""
    tail = f"/artifacts/{quote(artifact, safe='/')}" if artifact else ""
    return f"{base}/#/experiments/{_q(experiment_id)}/runs/{_q(run_id)}{tail}?{MODE}"


def model_version(base: str, name: str, version: str) -> str:
    return f"{base}/#/models/{_q(name)}/versions/{_q(version)}?{MODE}"


def session_links(client, parent_run_id: str, base: str | None = None,
                  figure: str | None = M.EPOCH_CURVES_PNG) -> list[tuple[str, str]]:
    """(label, URL) for a tune session: its runs, their charts, the parent run, its epoch figure and
    the model version its latest ensemble run registered (when there is one)."""
    base = base or ui_base()
    parent = client.get_run(parent_run_id)
    exp = parent.info.experiment_id
    links = [("session runs", experiment_runs(base, exp, parent_run_id)),
             ("chart comparison", experiment_runs(base, exp, parent_run_id, chart=True)),
             ("parent run", run_page(base, exp, parent_run_id))]
    if figure:
        links.append(("session figures", run_page(base, exp, parent_run_id, figure)))
    ensembles = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' "
                                                        "and tags.kind = 'ensemble'",
                                   order_by=["attributes.start_time DESC"], max_results=5)
    for run in ensembles:
        name, version = run.data.tags.get("registered_model"), run.data.tags.get("registered_version")
        if name and version:
            links.append(("model version", model_version(base, name, version)))
            break
    return links


def format_links(links: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in links)
    return "\n".join(f"  {label:<{width}}  {url}" for label, url in links)


def latest_session(client, experiment: str):
    """The most recent ``tune`` parent run of ``experiment``, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'tune-session'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def main(argv: list[str] | None = None) -> int:
    """Print the latest session's links (``make ui`` runs this before starting the UI)."""

    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking.links", description=main.__doc__)
    parser.add_argument("--experiment", default="deepfake")
    args = parser.parse_args(argv)
    uri = mlflow.get_tracking_uri()
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    base = ui_base(uri)
    if db is not None and not os.path.exists(db):  # opening it would create an empty store
        print(f"no tracking store at {db} yet: `make demo` makes one")
        return 0
    client = MlflowClient()
    run = latest_session(client, args.experiment)
    if run is None:
        exp = client.get_experiment_by_name(args.experiment)
        print(f"no tune session in experiment {args.experiment!r} yet"
              + (f"; its runs: {experiment_runs(base, exp.experiment_id)}" if exp else ""))
        return 0
    print(f"latest tune session {run.data.tags.get('mlflow.runName', run.info.run_id)}, in the model-training view:")
    print(format_links(session_links(client, run.info.run_id, base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
