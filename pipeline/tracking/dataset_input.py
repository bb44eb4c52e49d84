"""The dataset as an MLflow dataset input of a run: source, digest and a profile of its splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient


def log_dataset(mlflow_client: MlflowClient, run_id: str, data) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class _ImageDataset(MetaDataset):
        # MetaDataset carries no profile; the split sizes belong in the UI's dataset panel.
        def to_dict(self) -> dict[str, str]:
            profile = {name: len(split) for name, split in data.splits.items()}
            profile |= {"image_shape": list(data.image_shape), "classes": list(data.classes)}
            return {**super().to_dict(), "profile": json.dumps(profile)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": all local paths
        source = resolve_dataset_source(str(Path(data.root).resolve()))
    dataset = _ImageDataset(source, name=Path(data.root).name,
                            digest=data.digest)
    entity = dataset._to_mlflow_entity()
    context = InputTag("mlflow.data.context", "training")
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[context])])
