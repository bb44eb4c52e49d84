"""Settings: one frozen dataclass per concern (``sections``), each field declared once with its help
text and choices (``fields``), search spaces as data (``space``), presets from ``experiments/``
(``presets``). Imports nothing of the package but the voting-rule table, a numpy-only leaf."""

from .fields import ConfigError
from .presets import (
                      EXPERIMENTS_DIR,
                      data_from_dict,
                      flat_params,
                      load_preset,
                      model_from_dict,
                      override,
                      preset_path,
                      preset_yaml,
                      to_dict,
                      train_from_dict,
)
from .sections import (
                      DEFAULT_DATA,
                      EVAL_BATCH,
                      NUM_CLASSES,
                      SECTIONS,
                      DataConfig,
                      ModelConfig,
                      Preset,
                      StudyConfig,
                      TrackingConfig,
                      TrainConfig,
                      parse_class_weights,
                      parse_duration,
)
from .space import Choice, Range, SearchSpace, field_type, param_name

__all__ = ["ConfigError", "EXPERIMENTS_DIR", "data_from_dict", "flat_params", "load_preset", "model_from_dict",
           "override", "preset_path", "preset_yaml", "to_dict", "train_from_dict", "DEFAULT_DATA", "EVAL_BATCH",
           "NUM_CLASSES", "SECTIONS",
           "DataConfig", "ModelConfig", "Preset", "StudyConfig", "TrackingConfig", "TrainConfig",
           "parse_class_weights", "parse_duration", "Choice", "Range", "SearchSpace", "field_type", "param_name"]
