"""``promote``: move ``@champion`` to ``@challenger`` on evidence (``registry.promote``)."""

from __future__ import annotations

from ..config import Preset
from ..registry.promote import PromotionRule, ScoringOptions, promote
from .options import PromoteOptions


def main(preset: Preset, opts: PromoteOptions, progress: bool) -> int:
    decision = promote(preset.data, preset.study.model_name, PromotionRule(opts.min_gain, opts.alpha, opts.force),
                       ScoringOptions(opts.split, device=preset.train.device, progress=progress),
                       dry_run=opts.dry_run, experiment=preset.tracking.experiment)
    print(decision.describe())
    return 0
