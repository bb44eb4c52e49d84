"""``data synth`` and ``data inspect``: write the embedded synthetic dataset, or check one and say
what it holds (and how its audit split would be drawn)."""

from __future__ import annotations

from ..config import Preset
from ..data import DataError, load_dataset, summarize
from ..data.roles import partition
from ..data.synth import synthesize
from .options import SynthOptions


def synth(preset: Preset, opts: SynthOptions, progress: bool) -> int:
    summary = synthesize(opts.out, opts.preset, opts.seed)
    counts = ", ".join(f"{k} {v}" for k, v in summary.counts.items())
    print(f"wrote {summary.preset} dataset to {summary.out}: {counts} ({summary.image_size}x{summary.image_size}) "
          f"in {summary.seconds:.2f}s")
    return 0


def inspect(preset: Preset, opts: None, progress: bool) -> int:
    data = load_dataset(preset.data)
    print(summarize(data))
    try:
        print(partition(data, preset.data).info.describe())
    except DataError as exc:  # the data is fine; only its audit split cannot be drawn with these settings
        print(f"audit split: cannot be drawn: {exc}")
    return 0
