"""The dataset as an MLflow dataset input of a run: source, digest and a profile of its splits.

Every run of a session links the same dataset (same name and digest): MLflow stores it once per
experiment and links each run to it, so the runs table's Dataset column names it on the parent, on
every trial and final run and on the ensemble run. The digest is ``data.digest``, computed once when
the data loaded; linking reads no image."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient


def log_dataset(mlflow_client: MlflowClient, run_id: str, data, context: str = "training") -> None:
    """Link ``data`` to the run; ``context`` says what the run did with it ("training": trained on its
    train split; "validation": only chose on its selection split, as the ensemble does)."""
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset_entity(data),
                                                            tags=[InputTag("mlflow.data.context", context)])])


def dataset_entity(data) -> Dataset:
    """The dataset as MLflow records a local folder (source type "local", its path as the source), with
    the split sizes as its profile for the UI's dataset panel. Built directly rather than through
    ``mlflow.data``'s source registry, whose lookup warns on every local path (two sources claim it)
    and whose ``warnings.catch_warnings`` would not be safe in the trial threads of ``--n-jobs``."""
    profile = {name: len(split) for name, split in data.splits.items()}
    profile |= {"image_shape": list(data.image_shape), "classes": list(data.classes)}
    root = Path(data.root).resolve()
    return Dataset(name=root.name, digest=data.digest, source_type="local", source=json.dumps({"uri": str(root)}),
                   profile=json.dumps(profile))
