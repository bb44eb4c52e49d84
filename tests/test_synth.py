"""The synthetic dataset: layout, determinism, balance, atomic writes and class-free scenes."""

from __future__ import annotations

import csv
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import NUM_CLASSES
from pipeline.data import synth
from pipeline.data.synth import PRESETS, SPLITS, synthesize


def read_rows(root: Path, split: str) -> list[tuple[str, int]]:
    with (root / f"{split}.csv").open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["image_id", "label"]
        return [(image_id, int(label)) for image_id, label in reader]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[Path]:
    return sorted(parent.glob("*.tmp-*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return out, synthesize(out, "tiny", seed=0)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(
        tmp_path: Path, tiny: tuple[Path, synth.SynthSummary]) -> None:
    a = all_files(synthesize(tmp_path / "a", "tiny", seed=3).out)
    b = all_files(synthesize(tmp_path / "b", "tiny", seed=3).out)
    assert a == b
    other, _ = tiny  # seed 0
    assert a["train.csv"] != all_files(other)["train.csv"]
    # Pixels differ too, not only ids: compare the first training image of each.
    first_a = tmp_path / "a" / "train" / f"{read_rows(tmp_path / 'a', 'train')[0][0]}.png"
    first_other = other / "train" / f"{read_rows(other, 'train')[0][0]}.png"
    assert not np.array_equal(np.asarray(Image.open(first_a)), np.asarray(Image.open(first_other)))


def test_summary_describes_the_preset(tiny: tuple[Path, synth.SynthSummary]) -> None:
    out, summary = tiny
    spec = PRESETS["tiny"]
    assert summary.out == out and summary.preset == "tiny" and summary.image_size == 32
    assert summary.counts == {split: NUM_CLASSES * spec.per_class(split) for split in SPLITS}
    assert summary.seconds > 0


def test_splits_are_balanced_shuffled_and_complete(tiny: tuple[Path, synth.SynthSummary]) -> None:
    out, _ = tiny
    seen: set[str] = set()
    for split in SPLITS:
        rows = read_rows(out, split)
        per_class = PRESETS["tiny"].per_class(split)
        assert Counter(label for _, label in rows) == dict.fromkeys(range(NUM_CLASSES), per_class)
        labels = [label for _, label in rows]
        changes = sum(x != y for x, y in zip(labels, labels[1:], strict=False))
        assert changes > len(rows) // 2, f"{split} rows look grouped by class"
        for image_id, _ in rows:
            assert str(uuid.UUID(image_id)) == image_id
            with Image.open(out / split / f"{image_id}.png") as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        ids = {image_id for image_id, _ in rows}
        assert len(ids) == len(rows) and not ids & seen
        assert {p.stem for p in (out / split).iterdir()} == ids  # no stray files
        seen |= ids


def test_written_png_is_the_rendered_image(tiny: tuple[Path, synth.SynthSummary]) -> None:
    out, _ = tiny
    image_id, label = read_rows(out, "validation")[5]
    on_disk = np.asarray(Image.open(out / "validation" / f"{image_id}.png"))
    assert np.array_equal(on_disk, synth.render_image(0, SPLITS.index("validation"), 5, label, 32))


def test_worker_pool_writes_the_same_bytes(
        tmp_path: Path, tiny: tuple[Path, synth.SynthSummary], monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the process pool (normally for large presets only) onto the tiny preset.
    monkeypatch.setattr(synth, "POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(synth, "CHUNK", 64)
    pooled = synthesize(tmp_path / "pooled", "tiny", seed=0)
    assert all_files(pooled.out) == all_files(tiny[0])


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(out)):
        synthesize(out, "tiny")
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_fills_an_existing_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    synthesize(out, "tiny")
    assert (out / "train.csv").exists() and leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_render = synth.render_image
    calls = []

    def render_then_fail(*args: int) -> np.ndarray:
        calls.append(args)
        if len(calls) > 50:
            raise RuntimeError("interrupted")
        return real_render(*args)

    monkeypatch.setattr(synth, "render_image", render_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        synthesize(tmp_path / "data", "tiny")
    assert not (tmp_path / "data").exists()
    assert leftovers(tmp_path) == []


def test_unknown_preset_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="huge"):
        synthesize(tmp_path / "x", "huge")


def test_label_changes_only_the_fingerprint() -> None:
    # Same (seed, split, row) with another label must give the same scene: tightly correlated
    # pixels, while a different row (another scene) is not.
    def render(row: int, label: int) -> np.ndarray:
        return synth.render_image(7, 0, row, label, 32).astype(float).ravel()

    base = render(11, 0)
    for label in (1, 2, 3, 4):
        variant = render(11, label)
        assert not np.array_equal(variant, base), f"class {label} left no fingerprint"
        assert np.corrcoef(variant, base)[0, 1] > 0.85, f"class {label} changed the scene"
    assert np.corrcoef(render(12, 0), base)[0, 1] < 0.5


def test_mean_colour_does_not_reveal_the_class(tiny: tuple[Path, synth.SynthSummary]) -> None:
    # Classes 0, 1, 2 and 4 must agree on mean colour within sampling noise. Class 3's fingerprint
    # is a deliberate colour shift, so it serves as the check that this test can see one.
    out, _ = tiny
    colours: dict[int, list[np.ndarray]] = {label: [] for label in range(NUM_CLASSES)}
    for split in SPLITS:
        for image_id, label in read_rows(out, split):
            pixels = np.asarray(Image.open(out / split / f"{image_id}.png"), dtype=float)
            colours[label].append(pixels.reshape(-1, 3).mean(axis=0))
    per_class = {label: np.array(values) for label, values in colours.items()}
    plain = np.concatenate([per_class[label] for label in (0, 1, 2, 4)])
    # Four standard errors of a difference of two class means (60 images each), per channel.
    bound = 4 * np.sqrt(2 / len(per_class[0])) * plain.std(axis=0)
    means = {label: values.mean(axis=0) for label, values in per_class.items()}
    spread = np.ptp([means[label] for label in (0, 1, 2, 4)], axis=0)
    assert (spread < bound).all(), f"mean RGB differs by class: {means}"
    red_minus_blue = {label: m[0] - m[2] for label, m in means.items()}
    assert red_minus_blue[3] - max(red_minus_blue[c] for c in (0, 1, 2, 4)) > bound.max()
