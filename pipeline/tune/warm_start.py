"""Warm start: the best configurations of an earlier study (a quick one on a sample, say) are tried
first, before the sampler takes over. ``study.warm_start`` is ``STUDY[@STORAGE]``; member studies
are ``STUDY.<arch>``, and the storage defaults to this session's."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from ..config import ConfigError
from . import keys
from .storage import storage_lock


def parse_spec(spec: str, default_storage: str) -> tuple[str, str]:
    study, _, storage = spec.partition("@")
    if not study:
        raise ConfigError(f"study.warm_start {spec!r}: expected STUDY or STUDY@STORAGE")
    return study, storage or default_storage


def best_configurations(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return sorted(complete, key=lambda t: (-t.value, t.number))[:k]


def warm_start(studies: dict[str, optuna.Study], storage_url: str, spec: str, k: int) -> dict[str, int]:
    """Enqueue into each member study (of the session at ``storage_url``) the best ``k`` configurations
    of the earlier study's same member, once per session; returns how many per member."""
    source, url = parse_spec(spec, storage_url)
    enqueued = {}
    for arch, study in studies.items():
        with storage_lock(storage_url, keys.admit_lock(study.study_name)):
            if study.user_attrs.get(keys.WARM_STARTED):
                continue
            try:
                earlier = optuna.load_study(study_name=f"{source}.{arch}", storage=url)
            except KeyError:
                print(f"note: warm start: no study {source}.{arch} in that storage; {arch} starts cold")
                study.set_user_attr(keys.WARM_STARTED, f"{spec} (none found)")
                continue
            best = best_configurations(earlier, k)
            for t in best:
                study.enqueue_trial(t.params, user_attrs={keys.WARM_START_FROM: f"{source}.{arch}#{t.number}"},
                                    skip_if_exists=True)
            study.set_user_attr(keys.WARM_STARTED, spec)
            enqueued[arch] = len(best)
    if enqueued:
        print("warm start from " + spec + ": " + ", ".join(f"{a} {n} configuration(s)" for a, n in enqueued.items()))
    return enqueued
