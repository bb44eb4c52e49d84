"""``bench --also memory`` at toy size: the ``tiny`` synthetic preset stands in for the full one. The
figures are the worker's own and the breakdown's phases are each measured from their own start."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.bench.memory import bench_memory, largest_batch, worker_preset
from pipeline.bench.report import check_targets, describe_memory
from pipeline.config import load_preset
from pipeline.data.synth import synthesize

MIB = 2 ** 20


@pytest.mark.slow  # ~30 s: three processes, a real tune worker through registration
def test_memory_section_breaks_the_worker_peak_down(tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    root = Path("tiny")  # relative to the test's working directory, as a person types it: the bench's
    synthesize(root, "tiny", seed=1)  # processes run in a folder of their own and must still find it
    preset = load_preset("cpu")
    preset = replace(preset, data=replace(preset.data, cache_dir="cache"))
    out = bench_memory(tmp_path / "bench", preset, str(root), steps=2)

    phases = out["phases"]
    assert list(phases) == ["import torch", "imports", "tune imports", "data", "train cnn_v1", "train cnn_v2",
                            "evaluate", "audit"]
    assert out["batch_size"] == 64 and phases["data"]["cache_hit"] == 0  # the first load decodes
    # torch alone maps hundreds of MB; the worker, a process of its own, holds more than that.
    assert phases["import torch"]["rss"] > 100 * MIB
    assert out["peak_rss_bytes"] == out["worker"]["VmHWM"] > phases["import torch"]["rss"]
    # Each phase's peak is its own: evaluation holds no activations for a backward pass, so it peaks
    # below the training steps (a peak not reset at the phase's start would be the process's highest).
    train_peak = max(phases["train cnn_v1"]["peak"], phases["train cnn_v2"]["peak"])
    assert phases["train cnn_v2"]["start"] < phases["train cnn_v2"]["peak"]
    assert phases["evaluate"]["peak"] < train_peak
    text = describe_memory(out)
    assert "train cnn_v2" in text and "cache cold: decoded here" in text
    assert check_targets({"memory": out})["worker_peak_rss_below_2gb"] is (out["peak_rss_bytes"] < 2 * 2 ** 30)


def test_the_worker_preset_trains_each_member_a_few_steps_at_the_largest_batch(tmp_path: Path) -> None:
    preset = load_preset("cpu")  # its space searches batch 32 and 64
    raw = worker_preset(preset, tmp_path / "full", steps=3)
    assert largest_batch(preset) == 64
    assert raw["train"]["batch_size"] == 64 and raw["train"]["images_per_epoch"] == 3 * 64
    assert raw["study"]["space"] == {"train.batch_size": [64]} and raw["study"]["time_budget"] is None
    assert raw["study"]["trials"] == 1 and raw["study"]["members"] == ["cnn_v1", "cnn_v2"]
    assert raw["data"]["root"] == str(tmp_path / "full")
