"""Dataset layer: layouts and validation, the decode cache, batch augmentation, the synthetic dataset."""

from .augment import BatchAugmenter, Normalizer
from .dataset import Dataset, Split, load_dataset, summarize
from .layout import DataError

__all__ = ["BatchAugmenter", "DataError", "Dataset", "Normalizer", "Split", "load_dataset", "summarize"]
