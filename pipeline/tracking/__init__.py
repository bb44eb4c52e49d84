"""The MLflow side: runs through an explicit client (``client``), what a training leaves in its run
(``outputs``) and the dataset input (``dataset_input``). Never the fluent "active run", so nested
trial runs and several workers in one process cannot log into each other's runs."""

from .client import (
                     NOTE_TAG,
                     PARENT_TAG,
                     PROBE_ENV,
                     TrackingError,
                     adopted_run,
                     check_tracking,
                     client,
                     describe_run,
                     download_artifact,
                     end_run,
                     ensure_experiment,
                     git_commit,
                     log_metrics,
                     log_params,
                     open_run,
                     redact,
                     run_guard,
                     scrub,
                     set_tags,
                     standard_tags,
                     start_run,
)
from .dataset_input import log_dataset
from .outputs import (
                     EpochLogger,
                     classification_outputs,
                     confusion_figure,
                     log_training_outputs,
                     per_class_metrics,
                     write_evaluation,
)

__all__ = ["NOTE_TAG", "PARENT_TAG", "PROBE_ENV", "TrackingError", "adopted_run", "check_tracking", "client",
           "describe_run", "download_artifact", "end_run", "ensure_experiment", "git_commit", "log_metrics",
           "log_params", "open_run", "redact", "run_guard", "scrub", "set_tags", "standard_tags", "start_run",
           "log_dataset", "EpochLogger", "classification_outputs", "confusion_figure", "log_training_outputs",
           "per_class_metrics", "write_evaluation"]
