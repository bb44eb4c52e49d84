"""Register the chosen pair as one pyfunc model (models-from-code: the package plus two checkpoints
and ``ensemble.json``, nothing pickled), tag the version and give it ``@challenger``."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
import pandas as pd

from .. import metrics as M
from .. import tracking
from ..data import Dataset
from ..ensemble.pyfunc import pip_requirements, signature, write_spec
from ..ensemble.stage import EnsembleResult

# MLflow's input-example writer compares columns with range(), which pandas 3 deprecates: not ours to fix.
warnings.filterwarnings("ignore", message="Operation with range is deprecated")

PACKAGE_DIR = Path(__file__).resolve().parent.parent
MODEL_CODE = PACKAGE_DIR / "ensemble" / "model_code.py"
CHALLENGER = "challenger"
CHAMPION = "champion"


def example_input(images) -> pd.DataFrame:
    """A one-row input example: a real image of the dataset, PNG-encoded."""
    from torchvision.io import encode_png

    return pd.DataFrame({"image": [bytes(encode_png(images[0]).numpy().tobytes())]})


def log_ensemble_model(run_id: str, member_a: str | Path, member_b: str | Path, spec: str | Path,
                       classes: list[str], example: pd.DataFrame, model_name: str) -> str:
    """Log the pyfunc ensemble (two checkpoints + ``ensemble.json``) into ``run_id`` and register it
    as a new version of ``model_name``; returns the version."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="ensemble",
            python_model=str(MODEL_CODE),  # models-from-code: nothing is pickled
            artifacts={"member_a": str(member_a), "member_b": str(member_b), "ensemble": str(spec)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(len(classes)),
            input_example=example,
            pip_requirements=pip_requirements(),
            # Defaults a caller may override at load time: load_model(uri, model_config={...}).
            # (precision: each member's recorded one, from ensemble.json, unless "precision" is given)
            # device auto: CUDA where the model is served on a GPU, the CPU elsewhere (never a crash).
            model_config={"device": "auto", "batch_size": 256},
            registered_model_name=model_name,
        )
    return str(info.registered_model_version)


def register_ensemble(client, result: EnsembleResult, data: Dataset, model_name: str, audit: dict[str, float] | None,
                      audit_spec: str, audit_digest: str) -> str:
    """The ensemble as a new version of ``model_name``, logged into the ensemble run, tagged with its
    members, choices, selection and audit figures, dataset digest and audit set, and given ``@challenger``.
    ``data``: the dataset it was chosen on (its classes, its digest, a validation image as the input example)."""
    a, b, run_id = result.member_a, result.member_b, result.run_id
    classes = data.classes
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_spec(Path(tmp) / "ensemble.json", result.weight, result.method, list(classes),
                          result.member_spec())
        version = log_ensemble_model(run_id, a.checkpoint, b.checkpoint, spec, list(classes),
                                     example_input(data.validation.images), model_name)
    tags = {
        "member_a_run_id": a.run_id, "member_b_run_id": b.run_id, "member_a": a.label, "member_b": b.label,
        "weight": f"{result.weight:.6f}", "method": result.method, "tta_a": result.variant_a,
        "tta_b": result.variant_b, "temperature_a": f"{result.temperature_a:.6f}",
        "temperature_b": f"{result.temperature_b:.6f}",
        M.SELECTION_ACCURACY: f"{result.selection_accuracy:.6f}", M.SELECTION_NLL: f"{result.selection_nll:.6f}",
        M.MEMBER_A_SELECTION_ACCURACY: f"{result.member_a_accuracy:.6f}",
        M.MEMBER_B_SELECTION_ACCURACY: f"{result.member_b_accuracy:.6f}",
        "dataset_digest": data.digest, "audit_split": audit_spec, "audit_digest": audit_digest,
        "ensemble_run_id": run_id, "ensemble_kind": result.kind,
        **({"ensemble_procedure": result.decision.procedure} if result.decision else {}),
        **({k: f"{v:.6f}" for k, v in audit.items()} if audit else
           {"audit": "off: every figure of this version is in-sample (selection)"}),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    tracking.set_tags(client, run_id, {"registered_model": model_name, "registered_version": version})
    return version
