"""``promote``: move ``@champion`` to ``@challenger`` on evidence (``registry.promote``)."""

from __future__ import annotations

from ..config import Preset
from ..registry.promote import promote
from .options import PromoteOptions


def main(preset: Preset, opts: PromoteOptions, progress: bool) -> int:
    decision = promote(preset.data, preset.study.model_name, split=opts.split, min_gain=opts.min_gain,
                       alpha=opts.alpha, dry_run=opts.dry_run, force=opts.force, experiment=preset.tracking.experiment,
                       device=preset.train.device, progress=progress)
    print(decision.describe())
    return 0
