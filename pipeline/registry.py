"""Model registry: register the chosen pair as one pyfunc model, move aliases on evidence."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from . import tracking
from .ensemble import EnsembleModel, pip_requirements, signature, write_spec

PACKAGE_DIR = Path(__file__).resolve().parent
CHALLENGER = "challenger"
CHAMPION = "champion"


def example_input(images) -> pd.DataFrame:
    """A one-row input example: a real image of the dataset, PNG-encoded."""
    from torchvision.io import encode_png

    return pd.DataFrame({"image": [bytes(encode_png(images[0]).numpy().tobytes())]})


def register_ensemble(session, run_id: str, result: dict[str, Any], model_name: str) -> str:
    a, b = result["member_a"], result["member_b"]
    classes = list(session.data.classes)
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_spec(Path(tmp) / "ensemble.json", result["weight"], result["method"], classes, [
            {"arch": a.arch, "trial": a.trial, "run_id": a.run_id},
            {"arch": b.arch, "trial": b.trial, "run_id": b.run_id}])
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="ensemble",
                python_model=EnsembleModel(),
                artifacts={"member_a": str(a.checkpoint), "member_b": str(b.checkpoint), "ensemble": str(spec)},
                code_paths=[str(PACKAGE_DIR)],
                signature=signature(len(classes)),
                input_example=example_input(session.data.validation.images),
                pip_requirements=pip_requirements(),
                registered_model_name=model_name,
            )
    version = str(info.registered_model_version)
    client = session.client
    tags = {
        "member_a_run_id": a.run_id, "member_b_run_id": b.run_id,
        "member_a": f"{a.arch}#{a.trial}", "member_b": f"{b.arch}#{b.trial}",
        "weight": f"{result['weight']:.6f}", "method": result["method"],
        "ensemble_val_accuracy": f"{result['val_accuracy']:.6f}",
        "ensemble_holdout_accuracy": f"{result['holdout_accuracy']:.6f}",
        "member_a_val_accuracy": f"{result['member_a_accuracy']:.6f}",
        "member_b_val_accuracy": f"{result['member_b_accuracy']:.6f}",
        "dataset_digest": session.data.digest, "ensemble_run_id": run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    tracking.set_tags(client, run_id, {"registered_model": model_name, "registered_version": version})
    return version
