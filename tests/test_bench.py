"""``bench`` on tiny synthetic data: every section's figures are present, positive and finite (no timing
assertions: the machine may be busy), and the batched ``geometric`` augmentation that our training
path uses is torchvision's per-image policy, pixel for pixel."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.bench import OPTIONAL_SECTIONS, SECTIONS, bench_settings, run_bench
from pipeline.config import load_preset
from pipeline.data.geometric import BatchGeometric
from pipeline.data.synth import synthesize


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic preset: 32 px, 200 train / 50 validation images."""
    root = tmp_path_factory.mktemp("bench") / "data"
    synthesize(root, "tiny", seed=3)
    return root


def _positive(value, where: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    assert math.isfinite(value) and value > 0, f"{where} = {value}"


@pytest.mark.slow  # ~20-35 s: every section for real, the reference loop with its DataLoader worker processes
def test_bench_reports_every_section(tiny_synth: Path, tmp_path: Path) -> None:
    # cnn_v1 and deepfakenet (0.6 M parameters each): any two architectures exercise every section.
    preset = load_preset("tiny")
    preset = replace(preset, data=replace(preset.data, root=str(tiny_synth), cache_dir=str(tmp_path / "cache")),
                     train=replace(preset.train, precision="auto"))
    search_data = replace(preset.data, augment="none")
    json_path = tmp_path / "out" / "bench.json"
    lines: list[str] = []
    settings = replace(bench_settings(preset, epochs=1, archs="cnn_v1,deepfakenet", search_trials=3), max_train=32,
                       search_epochs=2, search_max_train=40, matmul_size=128, inference_reps=1)
    run_bench(preset, settings, search_data=search_data, json_path=str(json_path), print_fn=lines.append)

    line = json.loads(lines[-1])  # the last printed line is the JSON line, identical to the file
    assert line == json.loads(json_path.read_text())
    assert line["settings"]["archs"] == ["cnn_v1", "deepfakenet"] and line["data"]["train_used"] == 32

    for arch in ("cnn_v1", "deepfakenet"):
        fig = line["training"][arch]
        for path in ("reference", "ours"):
            for key in ("train_images_per_second", "eval_images_per_second", "train_seconds"):
                _positive(fig[path][key], f"{arch}.{path}.{key}")
            assert 0.0 <= fig[path]["best_val_accuracy"] <= 1.0
        assert 0.0 <= fig["ours"]["data_fraction"] < 1.0
        _positive(fig["train_speedup"], f"{arch}.train_speedup")
        _positive(fig["eval_speedup"], f"{arch}.eval_speedup")
        _positive(fig["parity"]["two_se"], f"{arch}.parity.two_se")
        ceiling = line["ceiling"]["archs"][arch]
        for key in ("train_flops_per_image", "forward_flops_per_image", "ours_flops", "ours_fraction_of_peak",
                    "reference_flops", "reference_fraction_of_peak"):
            _positive(ceiling[key], f"ceiling.{arch}.{key}")
    _positive(line["ceiling"]["matmul_fp32_flops"], "matmul_fp32_flops")
    _positive(line["data"]["cache_build_seconds"], "cache_build_seconds")

    inference = line["inference"]
    assert inference["members"] == ["cnn_v1", "deepfakenet"] and inference["images"] == 50
    for key in ("pyfunc_images_per_second", "members_raw_images_per_second", "decode_images_per_second", "ratio"):
        _positive(inference[key], f"inference.{key}")

    search = line["search"]
    for study in ("with_pruning", "without_pruning"):
        s = search[study]
        assert s["complete"] + s["pruned"] + s["failed"] == 3
        assert 1 <= s["epochs_to_within_1pt"] <= s["total_epochs"] <= 3 * 2
        assert 0.0 < s["final_best"] <= 1.0 and len(s["trace"]) == s["total_epochs"]
    _positive(search["epoch_ratio"], "search.epoch_ratio")

    assert set(line["targets"]) >= {"cnn_v1_train_speedup_3x", "deepfakenet_data_fraction_below_10pct", "all_met",
                                     "inference_ratio_80pct", "pruning_half_epochs", "pruning_keeps_best_within_1pt"}
    assert all(isinstance(v, bool) for v in line["targets"].values())
    assert any(line_.startswith("figure") for line_ in lines)  # the table


def test_bench_skips_sections_and_rejects_unknown_ones(tiny_synth: Path, tmp_path: Path) -> None:
    preset = load_preset("tiny")
    preset = replace(preset, data=replace(preset.data, root=str(tiny_synth), cache_dir=str(tmp_path / "cache")))
    settings = replace(bench_settings(preset, skip="reference,ours,inference,search"), matmul_size=64)
    out = run_bench(preset, settings, print_fn=lambda _: None)
    assert "search" not in out and "inference" not in out and out["training"] == {}
    assert set(out["ceiling"]["archs"]) == {"cnn_v1", "cnn_v2"}
    assert "ours_flops" not in out["ceiling"]["archs"]["cnn_v1"]
    with pytest.raises(ValueError, match="'training'.*" + ", ".join(SECTIONS)):
        run_bench(preset, bench_settings(preset, skip="training"), print_fn=lambda _: None)
    with pytest.raises(ValueError, match="--also: 'gpu'.*" + ", ".join(OPTIONAL_SECTIONS)):
        run_bench(preset, bench_settings(preset, also="gpu"), print_fn=lambda _: None)


@pytest.mark.parametrize(("fraction", "rss_gib", "met"), [(0.71, 1.9, True), (0.69, 1.9, False), (0.71, 2.1, False)])
def test_step_and_memory_targets(fraction: float, rss_gib: float, met: bool) -> None:
    from pipeline.bench.report import check_targets

    out = {"ceiling": {"archs": {"cnn_v1": {"ours_fraction_of_peak": fraction}}},
           "memory": {"peak_rss_bytes": int(rss_gib * 2 ** 30)}}
    targets = check_targets(out)
    assert targets["cnn_v1_step_70pct_of_peak"] is (fraction >= 0.70)
    assert targets["worker_peak_rss_below_2gb"] is (rss_gib < 2.0)
    assert targets["all_met"] is met


@pytest.mark.parametrize(("fraction", "met"), [(0.11, True), (0.09, False)])
def test_a_gpu_step_is_held_to_a_gpu_target(fraction: float, met: bool) -> None:
    # Memory-bound BatchNorm/ReLU networks reach 10-25 % of a GPU's matmul peak, not 70 %.
    from pipeline.bench.report import check_targets

    out = {"settings": {"device": "cuda:0"}, "ceiling": {"archs": {"cnn_v1": {"ours_fraction_of_peak": fraction}}}}
    targets = check_targets(out)
    assert targets == {"cnn_v1_step_10pct_of_peak": met, "all_met": met}


def test_region_timer_times_the_work_inside_it() -> None:
    import time

    from pipeline.bench.timing import RegionTimer, time_repeated

    with RegionTimer(torch.device("cpu")) as timer:
        time.sleep(0.05)
    assert 0.05 <= timer.seconds < 0.5
    calls = []
    per_call = time_repeated(lambda: (calls.append(1), time.sleep(0.01)), 4, torch.device("cpu"))
    assert len(calls) == 4 and 0.01 <= per_call < 0.1


def test_rss_probe_reports_the_commands_own_peak_memory(tiny_synth: Path, tmp_path: Path) -> None:
    # The memory section's probe: the command runs in the probe's process, its exit code is kept and
    # its peak resident set follows as JSON (from /proc/self/status, so Linux only).
    import os
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    env = {**os.environ, "DEEPFAKE_TUNE_CACHE": str(tmp_path / "cache")}
    ok = subprocess.run([sys.executable, "-m", "pipeline.cli.rss_probe", "data", "inspect", "--data",
                         str(tiny_synth)], capture_output=True, text=True, env=env)
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli.rss_probe", "data", "inspect", "--data",
                          str(tmp_path / "missing")], capture_output=True, text=True, env=env)
    assert (ok.returncode, bad.returncode) == (0, 2), bad.stderr
    for proc in (ok, bad):
        probe = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RSS_PROBE "))
        assert probe["VmHWM"] >= probe["VmRSS"] > 0 and probe["VmRSS"] >= probe["RssFile"] > 0
    # torch alone maps hundreds of MB; a probe of the wrong process (a shell) would not.
    assert json.loads(ok.stdout.strip().splitlines()[-1].removeprefix("RSS_PROBE "))["VmHWM"] > 100 * 2 ** 20


@pytest.mark.parametrize("size", [32, 37])
def test_batched_geometric_is_torchvisions_policy_per_image(size: int) -> None:
    """Rotation (nearest, fill 0), flip, perspective (bilinear, fill 0), each with the image's own
    parameters, against torchvision's functional kernels applied one image at a time."""
    torch.manual_seed(size)
    geometric = BatchGeometric()
    x = torch.rand(16, 3, size, size)
    params = geometric.sample(16, size, size, torch.device("cpu"))
    params["perspective"][:8] = True  # exercise both branches whatever the draw
    params["perspective"][8:] = False
    params["flip"][::2] = True
    out = geometric.apply(x.clone(), params)
    corners = [[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]]
    for i in range(16):
        ref = F.rotate(x[i], float(params["angle"][i]), InterpolationMode.NEAREST, fill=0)
        if params["flip"][i]:
            ref = F.horizontal_flip(ref)
        if params["perspective"][i]:
            ref = F.perspective(ref, corners, params["endpoints"][i].tolist(), InterpolationMode.BILINEAR, fill=0)
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


def test_the_perspective_constants_are_built_once_per_shape_and_change_no_image() -> None:
    """The corner tensor is cached per (height, width, device) (on CUDA a fresh one per batch would be
    a host sync in every step): a second batch reuses it and warps exactly as the first, and another
    image size gets its own corners."""
    from pipeline.data.geometric import image_corners

    image_corners.cache_clear()
    geometric = BatchGeometric()
    x = torch.rand(8, 3, 24, 30)
    params = geometric.sample(8, 24, 30, torch.device("cpu"))
    params["perspective"][:] = True
    first = geometric.apply(x.clone(), params)
    assert image_corners.cache_info().misses == 1
    second = geometric.apply(x.clone(), params)
    assert image_corners.cache_info().hits == 1 and image_corners.cache_info().misses == 1
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    assert image_corners(24, 30, torch.device("cpu")).tolist() == [[0, 0], [29, 0], [29, 23], [0, 23]]
    assert image_corners(37, 37, torch.device("cpu")).tolist() == [[0, 0], [36, 0], [36, 36], [0, 36]]


def test_batched_geometric_draws_like_the_v2_transforms() -> None:
    """Angles in [-15, 15], flips about half, perspective about 30%, corners inside the v2 bounds."""
    torch.manual_seed(0)
    p = BatchGeometric().sample(4000, 100, 100, torch.device("cpu"))
    assert p["angle"].abs().max() <= 15 and p["angle"].std() > 8
    assert 0.45 < p["flip"].float().mean() < 0.55 and 0.26 < p["perspective"].float().mean() < 0.34
    xs, ys = p["endpoints"][..., 0], p["endpoints"][..., 1]
    bound = int(0.2 * 50) + 1
    assert xs[:, [0, 3]].max() < bound and xs[:, [1, 2]].min() >= 100 - bound
    assert ys[:, [0, 1]].max() < bound and ys[:, [2, 3]].min() >= 100 - bound


def test_cli_bench_prints_the_json_line_and_logs_to_its_experiment(tiny_synth: Path, tmp_path: Path, tracking_here,
                                                                  capsys) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    assert main(["bench", "--data", str(tiny_synth), "--config", "tiny", "--skip", "reference,ours,inference,search",
                 "--json", str(tmp_path / "b.json"), "--experiment", "benchmarks"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads((tmp_path / "b.json").read_text())
    _positive(line["ceiling"]["matmul_fp32_flops"], "matmul_fp32_flops")
    # --experiment is honoured: one bench run there, holding the figures.
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("benchmarks").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["kind"] == "bench" and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["bench.skip"] == "reference,ours,inference,search"
    assert any(key.startswith("ceiling") for key in runs[0].data.metrics)
