"""MLflow models-from-code entry: the registered ensemble is this file plus the package, not a pickle."""

import mlflow

from pipeline.ensemble.pyfunc import EnsembleModel

mlflow.models.set_model(EnsembleModel())
