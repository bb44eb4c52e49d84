"""Memory: where the resident set of a ``tune`` worker goes on the ``full`` synthetic preset
(competition size: 12,500 / 1,250 / 6,500 images at 100 px), in minutes. Three processes of their own:

- ``import torch`` alone: the floor of any process of the package (this torch build maps its CUDA
  libraries even on a CPU).
- the breakdown (``main(PRESET)``): a worker's phases one after the other,
  each with its peak resident set (VmHWM, reset when the phase starts through ``/proc/self/clear_refs``)
  and what stays after it, anonymous and file-backed: the imports (torch, MLflow, Optuna, the
  package), the dataset through the decode cache (memory-mapped: file-backed pages), a few training
  steps of each member at the largest batch the preset trains at, an evaluation pass (plain and
  mirrored) over the selection split, the audit pass over the audit split. Each phase after the data
  starts from a trimmed heap, as a finished run leaves it, so its peak above its start is its own.
- the worker: a real ``tune`` worker under ``rss_probe`` (one trial per member of those few steps,
  evaluation, the ensemble search, the audit, the registration): the peak the target is about.

The ``full`` dataset is synthesized once beside the decode cache and reused, with its decode cache,
by later benches (a cold cache is decoded by the breakdown's data phase, which says so).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..config import Preset, load_preset, preset_yaml
from ..config.space import Choice
from ..data.cache import default_cache_dir
from ..data.synth import synthesize
from ..train.host_memory import memory_figures

PROBE_PREFIX = "MEMORY_PHASES "


def full_dataset(root: str | None, seed: int) -> tuple[Path, float]:
    """The competition-size dataset: ``root``, else the ``full`` preset kept beside the decode cache
    (synthesized on first use: about a minute); returns (root, seconds spent synthesizing)."""
    path = Path(root) if root else default_cache_dir() / f"synthetic-full-{seed}"
    t0 = time.perf_counter()
    if not path.exists():
        synthesize(path, "full", seed)
    return path, time.perf_counter() - t0


def largest_batch(preset: Preset) -> int:
    """The largest training batch the preset's runs use: its search space's choices, else train.batch_size."""
    space = dict(preset.study.space.items())
    dist = space.get("train.batch_size")
    if dist is None:
        return preset.train.batch_size
    return int(max(dist.values) if isinstance(dist, Choice) else dist.high)


def worker_preset(preset: Preset, root: Path, steps: int) -> dict[str, Any]:
    """``preset`` as a short worker on ``root``: one trial per member of ``steps`` steps at its largest
    batch (the search space fixed to that batch), evaluated, ensembled, audited and registered."""
    raw = yaml.safe_load(preset_yaml(preset))
    batch = largest_batch(preset)
    raw["name"] = f"memory-{preset.name}"
    raw["data"].update(root=str(root), cache_dir=None)
    raw["train"].update(epochs=1, batch_size=batch, images_per_epoch=steps * batch)
    raw["study"].update(trials=1, time_budget=None, pruner="none", top_k=min(2, preset.study.top_k), name=None,
                        storage=None, n_jobs=1, warm_start=None, space={"train.batch_size": [batch]})
    return raw


def run_python(args: list[str], workdir: Path, cache: Path) -> tuple[str, float]:
    """``python ARGS`` in ``workdir`` with its own tracking store and the bench's decode cache;
    returns (stdout, seconds)."""
    from .settings import subprocess_env  # here: this module also runs as the probe, whose imports it measures

    env = subprocess_env(workdir, cache)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench memory: {' '.join(args[:4])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout, time.perf_counter() - t0


def _last_json(stdout: str, prefix: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    if not lines:
        raise RuntimeError(f"bench memory: no {prefix.strip()} line in the output: {stdout[-2000:]}")
    return json.loads(lines[-1][len(prefix):])


def bench_memory(tmp_dir: Path, preset: Preset, data_root: str | None = None, steps: int = 3,
                 seed: int = 0) -> dict[str, Any]:
    """The breakdown, then the worker, on the full dataset (``data_root``, else the kept ``full`` preset)."""
    root, synth_seconds = full_dataset(data_root, seed)
    cache = Path(preset.data.cache_dir) if preset.data.cache_dir else default_cache_dir()
    # Both processes run inside ``workdir``: the paths they get are resolved against the user's
    # working directory here, or a relative one would name a folder inside the work folder.
    root, cache = root.resolve(), cache.resolve()
    workdir = tmp_dir / "memory"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "preset.yaml"
    path.write_text(yaml.safe_dump(worker_preset(preset, root, steps), sort_keys=False))
    out: dict[str, Any] = {"dataset": str(root), "synth_seconds": synth_seconds, "steps": steps,
                           "batch_size": largest_batch(preset)}
    # Not ``-m pipeline.bench.memory``: the package's __init__ would import this module before running it.
    breakdown = "import sys; from pipeline.bench.memory import main; sys.exit(main(sys.argv[1:]))"
    stdout, out["phases_seconds"] = run_python(["-c", breakdown, str(path)], workdir, cache)
    out["phases"] = {"import torch": import_torch_figures(), **_last_json(stdout, PROBE_PREFIX)}
    stdout, seconds = run_python(["-m", "pipeline.cli.rss_probe", "tune", "--config", str(path), "--storage",
                                  f"sqlite:///{workdir / 'optuna.db'}", "--quiet"], workdir, cache)
    out["worker"] = {**_last_json(stdout, "RSS_PROBE "), "seconds": seconds}
    out["peak_rss_bytes"] = out["worker"]["VmHWM"]
    return out


# ----------------------------------------------------------------------------- the breakdown's process

class PhaseMeter:
    """Per phase: the resident set when it starts, its peak (VmHWM since it started) and, when it ends,
    the resident set, anonymous and file-backed, in bytes."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, int]] = {}

    @contextmanager
    def phase(self, name: str):
        start = memory_figures()["VmRSS"]
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
        yield
        end = memory_figures()
        self.rows[name] = {"start": start, "peak": end["VmHWM"], "rss": end["VmRSS"], "anon": end["RssAnon"],
                           "file": end["RssFile"]}


def train_steps(arch: str, data, preset: Preset, batch: int, steps: int):
    """``steps`` training steps of ``arch`` as ``fit`` makes them (channels_last, the run's precision,
    augmentation and fused optimiser); returns (model, normaliser, device, precision)."""
    import torch
    from torch import nn

    from ..config import override
    from ..data import BatchAugmenter
    from ..models import build_model
    from ..rng import RunRandom
    from ..train import TrainStep, resolve_device, train_one_epoch
    from ..train.device import resolve_precision
    from ..train.loop import make_optimizer

    cfg, data_cfg = preset.train, preset.data
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = build_model(override(preset.model, arch=arch, num_classes=data.num_classes))
    model = model.to(device, memory_format=torch.channels_last)
    random = RunRandom(cfg.seed, device)
    augment = BatchAugmenter(data_cfg.augment, data_cfg.normalize, device, data.num_classes, data_cfg.cutmix_alpha,
                             data_cfg.mixup_alpha, random=random)
    optimizer = make_optimizer(model, cfg, device)
    step = TrainStep(model, optimizer, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), augment, device,
                     precision, cfg.micro_batch)
    train_one_epoch(step, data.train.images.to(device), data.train.labels.to(device), batch, random.cpu,
                    limit=steps * batch)
    return model, augment.normalizer, device, precision


def measure_phases(preset: Preset, steps: int) -> dict[str, dict[str, int]]:
    """The worker's phases in this process, each measured by a ``PhaseMeter``."""
    meter = PhaseMeter()
    meter.rows["imports"] = whole_process(memory_figures())  # torch, MLflow, the package: what the bench loads
    with meter.phase("tune imports"):
        from ..data import load_dataset
        from ..data.roles import partition
        from ..train import evaluate, predict_logits
        from ..train.host_memory import trim_heap
        from ..tune import run_tuning  # noqa: F401 - Optuna and the stages a worker loads
    with meter.phase("data"):
        roles = partition(load_dataset(preset.data, labelled_only=True), preset.data)
    meter.rows["data"]["cache_hit"] = int(all(split.cache_hit for split in roles.data.splits.values()))
    data, batch = roles.data, largest_batch(preset)
    for arch in preset.study.members:
        trim_heap()
        with meter.phase(f"train {arch}"):
            model, normalizer, device, precision = train_steps(arch, data, preset, batch, steps)
    trim_heap()
    with meter.phase("evaluate"):  # the last member, as fit ends a run: plain and mirrored passes
        evaluate(model, data.validation.images, data.validation.labels, normalizer, device, precision,
                 preset.train.eval_batch_size)
        predict_logits(model, data.validation.images, normalizer, device, precision, preset.train.eval_batch_size,
                       flip=True)
    trim_heap()
    if roles.audit is not None:
        with meter.phase("audit"):
            predict_logits(model, roles.audit.images, normalizer, device, precision, preset.train.eval_batch_size)
    return meter.rows


def import_torch_figures() -> dict[str, int]:
    """The resident set of a process that has imported torch and nothing else (its own process)."""
    code = "import torch; print(open('/proc/self/status').read())"
    return whole_process(memory_figures(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                       check=True).stdout))


def whole_process(now: dict[str, int]) -> dict[str, int]:
    """A phase row for everything a process did so far (its start is the process's: 0)."""
    return {"start": 0, "peak": now["VmHWM"], "rss": now["VmRSS"], "anon": now["RssAnon"], "file": now["RssFile"]}


def main(argv: list[str]) -> int:
    preset = load_preset(argv[0])
    steps = max(1, preset.train.images_per_epoch // largest_batch(preset)) if preset.train.images_per_epoch else 3
    print(PROBE_PREFIX + json.dumps(measure_phases(preset, steps)), flush=True)
    return 0
