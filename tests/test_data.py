"""The dataset layer on tiny on-disk datasets: both layouts, every bad input, the decode cache,
batch augmentation, the ``data inspect`` CLI, and (when present) the real UniBuc sample.

Images are 16-32 px PNGs written under ``tmp_path``; every ``DataConfig`` gets a ``cache_dir``
under ``tmp_path`` too. Every bad-input case checks three things: a ``DataError``, a message that
names the culprit, and that nothing was half-written into the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY_CLASSES,
    TINY_COUNTS,
    TINY_SIZE,
    TINY_TEST,
    make_competition_dataset,
    make_imagefolder_dataset,
    random_image,
    read_csv_rows,
    write_csv,
    write_png,
)
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import BatchAugmenter, DataError, Normalizer, load_dataset, summarize
from pipeline.data.augment import NORMALIZATION, POLICIES, build_policy
from pipeline.data.cache import file_pages, release_pages
from pipeline.data.crossfit import stratified_folds

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec) and warns on every decode.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "unibuc-sample"
N_TRAIN = TINY_COUNTS["train"] * TINY_CLASSES
N_VAL = TINY_COUNTS["validation"] * TINY_CLASSES


def config(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), cache_dir=str(cache), **kw)


def pixels(path: Path) -> np.ndarray:
    """What the loader should produce for one file: RGB uint8, 3 x H x W."""
    return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)


def cache_leftovers(cache: Path, pattern: str = "*") -> list[Path]:
    return sorted(cache.glob(pattern)) if cache.exists() else []


def assert_nothing_half_written(cache: Path, failed_split: str | None = "train") -> None:
    """No temporary file ever survives; no cache file exists for the split that failed (and, for a
    failure in train, the first split decoded, no cache file at all)."""
    assert cache_leftovers(cache, "*.partial") == []
    if failed_split == "train" or failed_split is None:
        assert cache_leftovers(cache, "*.npy") == []
    else:
        assert cache_leftovers(cache, f"{failed_split}-*.npy") == []


def row_of(root: Path, split: str, index: int) -> tuple[str, int]:
    """(image_id, CSV line number) of the index-th data row; the header is line 1."""
    return read_csv_rows(root / f"{split}.csv")[index]["image_id"], index + 2


# --------------------------------------------------------------------------------------------------
# Loading both layouts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("test_labels", [False, True], ids=["test-unlabelled", "test-labelled"])
def test_competition_layout_loads_in_csv_order(tmp_path: Path, test_labels: bool) -> None:
    root = make_competition_dataset(tmp_path / "data", test_labels=test_labels)
    ds = load_dataset(config(root, tmp_path / "cache"))

    assert ds.layout == "competition"
    assert ds.classes == tuple(str(i) for i in range(TINY_CLASSES))
    assert ds.num_classes == TINY_CLASSES
    assert ds.image_shape == (3, TINY_SIZE, TINY_SIZE)
    assert set(ds.splits) == {"train", "validation", "test"}
    for name, n in (("train", N_TRAIN), ("validation", N_VAL), ("test", TINY_TEST)):
        split = ds.split(name)
        rows = read_csv_rows(root / f"{name}.csv")
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape) == (n, 3, TINY_SIZE, TINY_SIZE)
        assert split.ids == [r["image_id"] for r in rows]  # CSV order, not sorted
        for i in (0, n - 1):  # pixels belong to the id at the same position
            np.testing.assert_array_equal(split.images[i].numpy(), pixels(root / name / f"{split.ids[i]}.png"))
        if name == "test" and not test_labels:
            assert split.labels is None
            assert split.counts(TINY_CLASSES) == []
        else:
            assert split.labels is not None and split.labels.dtype == torch.int64
            assert split.labels.tolist() == [int(r["label"]) for r in rows]
    assert ds.train.counts(TINY_CLASSES) == [TINY_COUNTS["train"]] * TINY_CLASSES
    assert ds.test is ds.splits["test"]
    assert ds.split("train").ids != sorted(ds.split("train").ids)  # the fixture really is unsorted


def test_competition_without_test_split(tmp_path: Path) -> None:
    root = make_competition_dataset(tmp_path / "data", test_count=0)
    ds = load_dataset(config(root, tmp_path / "cache"))
    assert ds.test is None and set(ds.splits) == {"train", "validation"}
    with pytest.raises(DataError, match="no test split"):
        ds.split("test")


def test_competition_csv_with_bom_and_padded_cells(tmp_path: Path) -> None:
    """A CSV saved by Excel ("CSV UTF-8") starts with a byte-order mark; cells may carry spaces."""
    root = make_competition_dataset(tmp_path / "data", test_count=0)
    rows = read_csv_rows(root / "train.csv")
    text = "\ufeffimage_id , label\n" + "".join(f" {r['image_id']} , {r['label']} \n" for r in rows)
    (root / "train.csv").write_text(text, encoding="utf-8")
    ds = load_dataset(config(root, tmp_path / "cache"))
    assert ds.train.ids == [r["image_id"] for r in rows]
    assert ds.train.labels.tolist() == [int(r["label"]) for r in rows]


def test_imagefolder_layout_sorted_classes_and_flat_test(tmp_path: Path, tiny_imagefolder: Path) -> None:
    root = tiny_imagefolder
    ds = load_dataset(config(root, tmp_path / "cache"))

    assert ds.layout == "imagefolder"
    assert ds.classes == ("Diffusion", "faceswap", "gan", "morph", "real")  # sorted() order
    for name, n in (("train", N_TRAIN), ("validation", N_VAL)):
        split = ds.split(name)
        assert tuple(split.images.shape) == (n, 3, TINY_SIZE, TINY_SIZE)
        assert split.images.dtype == torch.uint8
        for i, image_id in enumerate(split.ids):
            class_name, file_name = image_id.split("/")  # the id is the path under the split folder
            assert file_name.startswith(f"{class_name}-") and file_name.endswith(".png")  # <class>-<serial>.png
            assert ds.classes[int(split.labels[i])] == class_name
            np.testing.assert_array_equal(split.images[i].numpy(), pixels(root / name / image_id))
        assert split.counts(TINY_CLASSES) == [TINY_COUNTS[name]] * TINY_CLASSES
    assert ds.test is not None and ds.test.labels is None
    assert len(ds.test) == TINY_TEST and tuple(ds.test.images.shape[1:]) == (3, TINY_SIZE, TINY_SIZE)
    assert ds.test.ids == sorted(p.name for p in (root / "test").iterdir())  # flat: the file name


def test_imagefolder_test_by_class_is_labelled_and_jpg_is_read(tmp_path: Path) -> None:
    root = make_imagefolder_dataset(tmp_path / "folders", classes=("a", "b", "c", "d", "e"), test="classes")
    rng = np.random.default_rng(1)
    Image.fromarray(random_image(rng)).save(root / "train" / "c" / "extra.jpg", quality=95)
    ds = load_dataset(config(root, tmp_path / "cache"))
    assert ds.test is not None and ds.test.labels is not None
    assert ds.test.labels.tolist() == [i % 5 for i in range(TINY_TEST)]
    assert "c/extra.jpg" in ds.train.ids
    assert int(ds.train.labels[ds.train.ids.index("c/extra.jpg")]) == ds.classes.index("c")
    assert len(ds.train) == N_TRAIN + 1


def test_imagefolder_class_folders_may_reuse_file_names(tmp_path: Path) -> None:
    """``train/coat/0.png`` and ``train/dress/0.png``, as most ImageFolder datasets name them (and
    torchvision's ``ImageFolder`` reads): ids are paths under the split, so nothing collides."""
    root = tmp_path / "clothes"
    rng = np.random.default_rng(12)
    classes = ("coat", "dress", "shirt", "shoe", "bag")
    written: dict[str, dict[str, np.ndarray]] = {}
    for split, n in (("train", 2), ("validation", 1)):
        written[split] = {}
        for name in classes:
            for k in range(n):
                image = random_image(rng)
                write_png(root / split / name / f"{k}.png", image)
                written[split][f"{name}/{k}.png"] = image
    write_png(root / "test" / "0.png", random_image(rng))  # a flat test folder reusing the name too
    ds = load_dataset(config(root, tmp_path / "cache"))
    assert ds.classes == tuple(sorted(classes))
    assert ds.train.ids == [f"{name}/{k}.png" for name in sorted(classes) for k in range(2)]
    assert ds.validation.ids == [f"{name}/0.png" for name in sorted(classes)]
    for split in (ds.train, ds.validation):
        for i, image_id in enumerate(split.ids):
            assert ds.classes[int(split.labels[i])] == image_id.split("/")[0]
            np.testing.assert_array_equal(split.images[i].numpy(), written[split.name][image_id].transpose(2, 0, 1))
    assert ds.test.ids == ["0.png"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
def test_grayscale_alpha_and_palette_become_rgb(tmp_path: Path, tiny_dataset: Path, mode: str) -> None:
    image_id, _ = row_of(tiny_dataset, "train", 1)
    path = tiny_dataset / "train" / f"{image_id}.png"
    rgb = random_image(np.random.default_rng(7))
    Image.fromarray(rgb).convert(mode).save(path)
    ds = load_dataset(config(tiny_dataset, tmp_path / "cache"))
    got = ds.train.images[ds.train.ids.index(image_id)].numpy()
    assert got.shape == (3, TINY_SIZE, TINY_SIZE)
    np.testing.assert_array_equal(got, pixels(path))
    if mode in ("L", "LA"):
        assert (got[0] == got[1]).all() and (got[1] == got[2]).all()
    if mode == "RGBA":  # alpha dropped, colour kept
        np.testing.assert_array_equal(got, rgb.transpose(2, 0, 1))


def test_16_bit_png_is_scaled_not_wrapped(tmp_path: Path, tiny_dataset: Path) -> None:
    """A 16-bit PNG decodes to uint16; storing it into the uint8 array must scale, not keep the low byte."""
    image_id, _ = row_of(tiny_dataset, "train", 2)
    deep = np.full((TINY_SIZE, TINY_SIZE), 65535, dtype=np.uint16)
    deep[: TINY_SIZE // 2] = 300  # low byte 44, scaled 1
    Image.fromarray(deep).save(tiny_dataset / "train" / f"{image_id}.png")
    got = load_dataset(config(tiny_dataset, tmp_path / "cache")).train.images
    got = got[read_csv_ids(tiny_dataset, "train").index(image_id)]
    assert got.dtype == torch.uint8
    assert int(got[:, TINY_SIZE - 1].min()) == 255  # 65535 -> 255 (low byte would also be 255)
    assert int(got[:, 0].max()) == 1  # 300 -> 300 >> 8 == 1 (the low byte would be 44)


def read_csv_ids(root: Path, split: str) -> list[str]:
    return [r["image_id"] for r in read_csv_rows(root / f"{split}.csv")]


def test_image_size_resizes_mixed_sizes(tmp_path: Path, tiny_dataset: Path) -> None:
    odd, _ = row_of(tiny_dataset, "train", 3)
    write_png(tiny_dataset / "train" / f"{odd}.png", random_image(np.random.default_rng(3), size=24))
    val_id, _ = row_of(tiny_dataset, "validation", 0)
    write_png(tiny_dataset / "validation" / f"{val_id}.png", random_image(np.random.default_rng(4), size=40)[:, :20])
    ds = load_dataset(config(tiny_dataset, tmp_path / "cache", image_size=12))
    for split in ds.splits.values():
        assert tuple(split.images.shape[1:]) == (3, 12, 12)
        assert split.images.dtype == torch.uint8
    assert ds.image_shape == (3, 12, 12)


# --------------------------------------------------------------------------------------------------
# Bad input: DataError, a message naming the culprit, nothing half-written
# --------------------------------------------------------------------------------------------------

Breaker = Callable[[Path], tuple[str, list[str]]]  # mutates the dataset; returns (failing split, fragments)


def _unlink(rel: str) -> Breaker:
    def brk(root: Path) -> tuple[str, list[str]]:
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return rel.split(".")[0].split("/")[0], [str(target)]
    return brk


def _missing_train_csv(root: Path) -> tuple[str, list[str]]:
    (root / "train.csv").unlink()
    return "train", [str(root / "train.csv")]


def _missing_image(root: Path) -> tuple[str, list[str]]:
    image_id, line = row_of(root, "train", 4)
    path = root / "train" / f"{image_id}.png"
    path.unlink()
    return "train", [str(path), str(root / "train.csv"), f"row {line}"]


def _replace_image(split: str, index: int, data: Callable[[Path], bytes]) -> Breaker:
    def brk(root: Path) -> tuple[str, list[str]]:
        image_id, _ = row_of(root, split, index)
        path = root / split / f"{image_id}.png"
        path.write_bytes(data(path))
        return split, [str(path)]
    return brk


def _random_bytes(path: Path) -> bytes:
    return np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()


def _truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _text(path: Path) -> bytes:
    return b"image_id,label\nnot an image at all\n"


def _other_size(size: int) -> Callable[[Path], bytes]:
    def data(path: Path) -> bytes:
        write_png(path, random_image(np.random.default_rng(5), size=size))
        return path.read_bytes()
    return data


def _val_other_size(root: Path) -> tuple[str, list[str]]:
    """Every validation image a consistent 24x24 while train is 16x16: a cross-split mismatch."""
    rng = np.random.default_rng(6)
    for image_id in read_csv_ids(root, "validation"):
        write_png(root / "validation" / f"{image_id}.png", random_image(rng, size=24))
    return "validation-crosssplit", [str(root / "validation.csv"), "(24, 24)", "(16, 16)", "image_size"]


def _bad_label(value: str) -> Breaker:
    def brk(root: Path) -> tuple[str, list[str]]:
        rows = read_csv_rows(root / "train.csv")
        rows[5]["label"] = value
        write_csv(root / "train.csv", [(r["image_id"], r["label"]) for r in rows])
        return "train", [str(root / "train.csv"), "row 7", repr(value)]
    return brk


def _duplicate_id(root: Path) -> tuple[str, list[str]]:
    rows = read_csv_rows(root / "train.csv")
    rows[6]["image_id"] = rows[1]["image_id"]
    write_csv(root / "train.csv", [(r["image_id"], r["label"]) for r in rows])
    return "train", [str(root / "train.csv"), "row 8", "row 3", repr(rows[1]["image_id"]), "duplicate"]


def _bad_id(image_id: str) -> Breaker:
    def brk(root: Path) -> tuple[str, list[str]]:
        rows = read_csv_rows(root / "validation.csv")
        rows[2]["image_id"] = image_id
        write_csv(root / "validation.csv", [(r["image_id"], r["label"]) for r in rows])
        return "validation", [str(root / "validation.csv"), "row 4", repr(image_id)]
    return brk


def _header_only(split: str) -> Breaker:
    def brk(root: Path) -> tuple[str, list[str]]:
        header = ("image_id",) if split == "test" else ("image_id", "label")
        write_csv(root / f"{split}.csv", [], header)
        return split, [str(root / f"{split}.csv"), "empty"]
    return brk


def _class_without_train_images(root: Path) -> tuple[str, list[str]]:
    rows = [r for r in read_csv_rows(root / "train.csv") if r["label"] != "3"]
    write_csv(root / "train.csv", [(r["image_id"], r["label"]) for r in rows])
    return "train", [str(root / "train.csv"), "class(es) 3 ", "no training images"]


def _missing_label_column(root: Path) -> tuple[str, list[str]]:
    write_csv(root / "validation.csv", [(i,) for i in read_csv_ids(root, "validation")], ("image_id",))
    return "validation", [str(root / "validation.csv"), "label"]


COMPETITION_CASES: dict[str, Breaker] = {
    "missing-train-csv": _missing_train_csv,
    "missing-validation-csv": _unlink("validation.csv"),
    "missing-train-folder": _unlink("train"),
    "missing-validation-folder": _unlink("validation"),
    "missing-test-folder": _unlink("test"),
    "missing-image": _missing_image,
    "corrupt-png": _replace_image("train", 3, _random_bytes),
    "truncated-png": _replace_image("train", 5, _truncated),
    "text-named-png": _replace_image("train", 2, _text),
    "corrupt-png-in-test": _replace_image("test", 1, _random_bytes),
    "differing-size-within-train": _replace_image("train", 6, _other_size(24)),
    "differing-size-across-splits": _val_other_size,
    "label-7": _bad_label("7"),
    "label-cat": _bad_label("cat"),
    "label-1.5": _bad_label("1.5"),
    "label--1": _bad_label("-1"),
    "label-empty": _bad_label(""),
    "label-03": _bad_label("03"),
    "label-3.0": _bad_label("3.0"),
    "no-label-column": _missing_label_column,
    "duplicate-id": _duplicate_id,
    "id-slash": _bad_id("sub/x"),
    "id-backslash": _bad_id("sub\\x"),
    "id-dotdot": _bad_id(".."),
    "id-parent": _bad_id("..%2Fescape"),
    "empty-train": _header_only("train"),
    "empty-validation": _header_only("validation"),
    "empty-test": _header_only("test"),
    "class-without-train-images": _class_without_train_images,
}


@pytest.mark.parametrize("case", list(COMPETITION_CASES))
def test_competition_bad_input(tmp_path: Path, tiny_dataset: Path, case: str) -> None:
    failed_split, fragments = COMPETITION_CASES[case](tiny_dataset)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        load_dataset(config(tiny_dataset, cache))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if failed_split == "validation-crosssplit":
        # Both splits decoded fine on their own, so their complete caches stay (they are valid and
        # will be hits next time); still never a temporary file.
        assert cache_leftovers(cache, "*.partial") == []
    else:
        assert_nothing_half_written(cache, failed_split)


def test_failure_in_a_later_split_keeps_only_complete_caches(tmp_path: Path, tiny_dataset: Path) -> None:
    """A corrupt validation image: train's complete cache may stay, validation's is never written,
    and fixing the image gives a train cache hit plus a fresh validation decode."""
    image_id, _ = row_of(tiny_dataset, "validation", 2)
    path = tiny_dataset / "validation" / f"{image_id}.png"
    good = path.read_bytes()
    path.write_bytes(_truncated(path))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_dataset(config(tiny_dataset, cache))
    assert_nothing_half_written(cache, "validation")
    path.write_bytes(good)
    ds = load_dataset(config(tiny_dataset, cache))
    assert ds.train.cache_hit and not ds.validation.cache_hit


def _ifold_notes(root: Path) -> tuple[str, list[str]]:
    path = root / "train" / "gan" / "notes.txt"
    path.write_text("collected 2024\n")
    return "train", [str(path), "not an image"]


def _ifold_unknown_val_class(root: Path) -> tuple[str, list[str]]:
    folder = root / "validation" / "stylegan"
    write_png(folder / "s.png", random_image(np.random.default_rng(8)))
    return "validation", [str(folder), "'stylegan'", "not a known class"]


def _ifold_empty_class(root: Path) -> tuple[str, list[str]]:
    (root / "train" / "zzz").mkdir()
    return "train", [str(root / "train"), "class(es) zzz ", "no training images"]


def _ifold_nested(root: Path) -> tuple[str, list[str]]:
    folder = root / "train" / "morph" / "more"
    write_png(folder / "m.png", random_image(np.random.default_rng(11)))
    return "train", [str(folder)]


def _ifold_corrupt(root: Path) -> tuple[str, list[str]]:
    path = sorted((root / "train" / "faceswap").iterdir())[1]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return "train", [str(path), "cannot decode"]


def _ifold_text_as_png(root: Path) -> tuple[str, list[str]]:
    path = root / "train" / "real" / "x.png"
    path.write_text("hello")
    return "train", [str(path)]


def _ifold_empty_flat_test(root: Path) -> tuple[str, list[str]]:
    for path in (root / "test").iterdir():
        path.unlink()
    return "test", [str(root / "test"), "empty"]


IMAGEFOLDER_CASES: dict[str, Breaker] = {
    "notes-txt-in-class-folder": _ifold_notes,
    "validation-class-not-in-train": _ifold_unknown_val_class,
    "class-without-train-images": _ifold_empty_class,
    "nested-folder": _ifold_nested,
    "corrupt-png": _ifold_corrupt,
    "text-named-png": _ifold_text_as_png,
    "missing-validation-folder": _unlink("validation"),
    "empty-flat-test": _ifold_empty_flat_test,
}


@pytest.mark.parametrize("case", list(IMAGEFOLDER_CASES))
def test_imagefolder_bad_input(tmp_path: Path, tiny_imagefolder: Path, case: str) -> None:
    failed_split, fragments = IMAGEFOLDER_CASES[case](tiny_imagefolder)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        load_dataset(config(tiny_imagefolder, cache))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_nothing_half_written(cache, failed_split)


def test_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "empty" / "train.csv"))):
        load_dataset(config(tmp_path / "empty", tmp_path / "cache"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(config(tmp_path / "nowhere", tmp_path / "cache"))
    assert cache_leftovers(tmp_path / "cache") == []


# --------------------------------------------------------------------------------------------------
# The decode cache
# --------------------------------------------------------------------------------------------------


def test_second_load_is_a_cache_hit_with_identical_tensors(tmp_path: Path, tiny_dataset: Path) -> None:
    cache = tmp_path / "cache"
    first = load_dataset(config(tiny_dataset, cache))
    assert not any(s.cache_hit for s in first.splits.values())
    files = {name: s.cache_file for name, s in first.splits.items()}
    assert all(f is not None and f.parent == cache and f.exists() for f in files.values())
    assert sorted(cache.glob("*.npy")) == sorted(files.values())
    assert list(tiny_dataset.rglob("*.npy")) == []  # never written next to the data

    second = load_dataset(config(tiny_dataset, cache))
    for name, split in second.splits.items():
        assert split.cache_hit, name
        assert split.cache_file == files[name]
        assert torch.equal(split.images, first.splits[name].images)
        assert split.ids == first.splits[name].ids
    assert torch.equal(second.train.labels, first.train.labels)
    assert second.digest == first.digest
    assert "(hit)" in summarize(second) and "(written)" in summarize(first)


def _mapped_from(address: int) -> str | None:
    """The file whose mapping holds ``address`` in this process (``/proc/self/maps``), if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(v, 16) for v in span.split("-"))
        if low <= address < high:
            return rest[4].strip() if len(rest) == 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cache_opens_memory_mapped(tmp_path: Path, tiny_dataset: Path) -> None:
    # Written and hit alike, a split's tensor is the cache file's pages (shared by workers on one
    # machine), not a private copy in the heap.
    cache = tmp_path / "cache"
    for _ in ("written", "hit"):
        data = load_dataset(config(tiny_dataset, cache))
        for name, split in data.splits.items():
            assert _mapped_from(split.images.data_ptr()) == str(split.cache_file), name
    # A tensor built in memory is not: the check can fail.
    assert _mapped_from(torch.zeros(1 << 20, dtype=torch.uint8).data_ptr()) != str(data.train.cache_file)


def _rss_file() -> int:
    return int(re.search(r"RssFile:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_released_cache_pages_leave_the_resident_set_and_the_images_readable(tmp_path: Path,
                                                                             tiny_dataset: Path) -> None:
    # A training set read once (a few epochs) would otherwise stay in the resident set whole.
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, 48 << 20, dtype=np.uint8).reshape(-1, 3, 64, 64))
    array = np.load(path, mmap_mode="c")
    pages = file_pages(array)
    assert pages is not None and file_pages(np.ones(3)) is None
    before = _rss_file()
    total = int(array.sum(dtype=np.uint64))  # every page read
    read = _rss_file()
    release_pages(pages)
    assert read - before > 32 << 20 and read - _rss_file() > 32 << 20
    assert int(array.sum(dtype=np.uint64)) == total  # the pages come back from the file, unchanged
    release_pages(None)  # an array in memory: nothing to release
    # A dataset releases every split's mapping; its images read the same afterwards.
    data = load_dataset(config(tiny_dataset, tmp_path / "cache"))
    assert all(split.pages is not None for split in data.splits.values())
    expected = data.train.images.clone()
    data.release_pages()
    assert torch.equal(data.train.images, expected)


def test_changed_image_invalidates_the_cache(tmp_path: Path, tiny_dataset: Path) -> None:
    cache = tmp_path / "cache"
    first = load_dataset(config(tiny_dataset, cache))
    image_id, _ = row_of(tiny_dataset, "train", 0)
    path = tiny_dataset / "train" / f"{image_id}.png"
    new = np.zeros((TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    new[:, :, 1] = 200
    write_png(path, new)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    second = load_dataset(config(tiny_dataset, cache))
    assert not second.train.cache_hit
    assert second.train.cache_file != first.train.cache_file
    np.testing.assert_array_equal(second.train.images[0].numpy(), new.transpose(2, 0, 1))
    assert not torch.equal(second.train.images[0], first.train.images[0])
    assert torch.equal(second.train.images[1:], first.train.images[1:])
    assert second.validation.cache_hit  # only the changed split is decoded again
    assert second.digest != first.digest


def test_image_size_has_its_own_cache_file(tmp_path: Path, tiny_dataset: Path) -> None:
    cache = tmp_path / "cache"
    native = load_dataset(config(tiny_dataset, cache))
    small = load_dataset(config(tiny_dataset, cache, image_size=8))
    assert not small.train.cache_hit
    assert small.train.cache_file != native.train.cache_file
    assert native.train.cache_file.exists() and small.train.cache_file.exists()
    assert tuple(small.train.images.shape) == (N_TRAIN, 3, 8, 8)
    assert load_dataset(config(tiny_dataset, cache, image_size=8)).train.cache_hit
    assert load_dataset(config(tiny_dataset, cache)).train.cache_hit


def test_unreadable_cache_file_is_rebuilt(tmp_path: Path, tiny_dataset: Path) -> None:
    cache = tmp_path / "cache"
    first = load_dataset(config(tiny_dataset, cache))
    expected = first.train.images.clone()  # the cache is memory-mapped: keep the pixels before spoiling the file
    del first
    next(cache.glob("train-*.npy")).write_bytes(b"\x93NUMPY garbage")
    second = load_dataset(config(tiny_dataset, cache))
    assert not second.train.cache_hit
    assert torch.equal(second.train.images, expected)
    assert load_dataset(config(tiny_dataset, cache)).train.cache_hit


@pytest.mark.parametrize("spoil", ["missing", "a row short", "a byte short"])
def test_a_missing_or_short_hash_file_is_not_trusted(tmp_path: Path, tiny_dataset: Path, spoil: str) -> None:
    """Pixels without all their content hashes are no cache hit: the split is decoded again and both
    files rewritten whole (the other splits stay hits)."""
    cache = tmp_path / "cache"
    first = load_dataset(config(tiny_dataset, cache))
    images, hashes = first.train.images.clone(), first.train.hashes.copy()
    del first
    hash_file = next(cache.glob("train-*.sha256"))
    assert hash_file.stat().st_size == 32 * N_TRAIN
    if spoil == "missing":
        hash_file.unlink()
    else:
        hash_file.write_bytes(hash_file.read_bytes()[:-32 if spoil == "a row short" else -1])

    again = load_dataset(config(tiny_dataset, cache))
    assert not again.train.cache_hit and again.validation.cache_hit and again.test.cache_hit
    assert torch.equal(again.train.images, images) and (again.train.hashes == hashes).all()
    assert hash_file.stat().st_size == 32 * N_TRAIN and again.train.cache_file.exists()
    assert load_dataset(config(tiny_dataset, cache)).train.cache_hit


def expected_pixels(root: Path) -> dict[str, str]:
    """SHA-256 of each split's pixels (N x 3 x H x W, CSV order), decoded here with PIL."""
    return {split: hashlib.sha256(np.stack([pixels(root / split / f"{row['image_id']}.png")
                                            for row in read_csv_rows(root / f"{split}.csv")]).tobytes()).hexdigest()
            for split in ("train", "validation", "test")}


LOAD_AND_REPORT = """
import hashlib, json, sys
from pipeline.config import DataConfig
from pipeline.data import load_dataset, summarize
report = {}
for cache in sys.argv[2:]:
    ds = load_dataset(DataConfig(root=sys.argv[1], cache_dir=cache))
    report[cache] = {"summary": summarize(ds), **{name: [s.cache_hit, s.cache_file is not None,
                     hashlib.sha256(s.images.numpy().tobytes()).hexdigest()] for name, s in ds.splits.items()}}
print(json.dumps(report))
"""


def load_read_only(root: Path, caches: list[Path]) -> dict:
    """Load ``root`` through each of ``caches`` made read-only, in a child process: by its permissions,
    or, for root (whom permissions do not stop), by a read-only bind mount in a mount namespace of its own."""
    load = [sys.executable, "-c", LOAD_AND_REPORT, str(root), *map(str, caches)]
    if os.geteuid() != 0:
        for cache in caches:
            cache.chmod(0o555)
        try:
            proc = subprocess.run(load, capture_output=True, text=True, timeout=120)
        finally:
            for cache in caches:
                cache.chmod(0o755)
    else:
        if shutil.which("unshare") is None:
            pytest.skip("as root, a read-only folder needs unshare(1) and a mount namespace")
        mounts = " && ".join(f"mount --bind {d} {d} && mount -o remount,bind,ro {d}"
                             for d in map(shlex.quote, map(str, caches)))
        proc = subprocess.run(["unshare", "--mount", "sh", "-c", f"({mounts}) || exit 97; exec {shlex.join(load)}"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 97 or "unshare failed" in proc.stderr:
            pytest.skip(f"as root, a read-only folder needs a mount namespace: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_read_only_cache_folder_is_read_and_never_written(tmp_path: Path, tiny_dataset: Path) -> None:
    """A complete cache in a read-only folder is a hit; an empty one, or one whose hash file is short,
    gives images decoded in memory, the same pixels, and a summary that says so (not "written").
    Before: the short one failed the load (OSError: removing the untrusted cache file)."""
    empty, complete, short = (tmp_path / name for name in ("empty", "complete", "short"))
    empty.mkdir()
    load_dataset(config(tiny_dataset, complete))
    shutil.copytree(complete, short)
    hash_file = next(short.glob("train-*.sha256"))
    hash_file.write_bytes(hash_file.read_bytes()[:-32])
    before = {folder: folder_state(folder) for folder in (empty, complete, short)}

    report = load_read_only(tiny_dataset, [empty, complete, short])
    truth = expected_pixels(tiny_dataset)
    hit, written = [True, True], [False, False]  # [cache hit, cache file]
    assert {n: report[str(empty)][n][:2] for n in truth} == dict.fromkeys(truth, written)
    assert {n: report[str(complete)][n][:2] for n in truth} == dict.fromkeys(truth, hit)
    assert {n: report[str(short)][n][:2] for n in truth} == {"train": written, "validation": hit, "test": hit}
    for folder in (empty, complete, short):
        assert {n: report[str(folder)][n][2] for n in truth} == truth, folder
        assert folder_state(folder) == before[folder], folder  # nothing written, nothing removed
    assert report[str(empty)]["summary"].count("decoded in memory") == 3
    assert f"cache     train: decoded in memory ({short} cannot be written)" in report[str(short)]["summary"]
    assert "(written)" not in report[str(short)]["summary"] and report[str(short)]["summary"].count("(hit)") == 2


def test_a_cache_location_that_cannot_be_created_decodes_in_memory(tmp_path: Path, tiny_dataset: Path) -> None:
    """The same promise where a user's permissions cannot be tested (root): a cache folder under a file."""
    (tmp_path / "a-file").write_text("not a folder")
    ds = load_dataset(config(tiny_dataset, tmp_path / "a-file" / "cache"))
    assert not any(s.cache_hit or s.cache_file is not None for s in ds.splits.values())
    truth = expected_pixels(tiny_dataset)
    assert {n: hashlib.sha256(s.images.numpy().tobytes()).hexdigest() for n, s in ds.splits.items()} == truth
    assert summarize(ds).count("decoded in memory") == 3 and (tmp_path / "a-file").read_text() == "not a folder"


def test_default_cache_dir_follows_the_environment(tiny_dataset: Path, _isolated_cache: Path) -> None:
    ds = load_dataset(DataConfig(root=str(tiny_dataset)))
    assert ds.cache_dir == _isolated_cache
    assert ds.train.cache_file.parent == _isolated_cache and ds.train.cache_file.exists()


# --------------------------------------------------------------------------------------------------
# Augmentation and normalisation
# --------------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(12) % TINY_CLASSES
    return x, y


def augment(policy: str, x: torch.Tensor, y: torch.Tensor, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    aug = BatchAugmenter(policy, "imagenet", CPU, TINY_CLASSES, **kw)
    torch.manual_seed(seed)
    return aug(x.clone(), y.clone())


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_output_shape_dtype_layout_and_seeding(batch, policy: str) -> None:
    x, y = batch
    out, labels = augment(policy, x, y, seed=1)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == tuple(x.shape)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    assert torch.equal(labels, y)  # no mixing: labels untouched
    again, _ = augment(policy, x, y, seed=1)
    assert torch.equal(out, again)
    other, _ = augment(policy, x, y, seed=2)
    plain = Normalizer("imagenet", CPU)(x)
    if policy == "none":
        assert torch.equal(out, plain) and torch.equal(other, out)
    else:
        assert not torch.equal(out, other)
        assert not torch.equal(out, plain)
    assert not BatchAugmenter(policy, "half", CPU, TINY_CLASSES).soft_labels


@pytest.mark.parametrize("mix", [{"cutmix_alpha": 1.0}, {"mixup_alpha": 0.4},
                                 {"cutmix_alpha": 1.0, "mixup_alpha": 0.4}],
                         ids=["cutmix", "mixup", "both"])
def test_mixing_gives_soft_labels(batch, mix: dict[str, float]) -> None:
    x, y = batch
    out, labels = augment("geometric", x, y, seed=3, **mix)
    assert BatchAugmenter("none", "half", CPU, TINY_CLASSES, **mix).soft_labels
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(x.shape)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.float32 and tuple(labels.shape) == (len(y), TINY_CLASSES)
    torch.testing.assert_close(labels.sum(dim=1), torch.ones(len(y)))
    assert (labels >= 0).all()
    assert not torch.equal(labels, torch.nn.functional.one_hot(y, TINY_CLASSES).float())  # really mixed
    again_x, again_y = augment("geometric", x, y, seed=3, **mix)
    assert torch.equal(out, again_x) and torch.equal(labels, again_y)


@pytest.mark.parametrize("policy, mix", [("geometric", {}), ("color", {"cutmix_alpha": 1.0, "mixup_alpha": 0.4})],
                         ids=["geometric", "color-mix"])
def test_a_runs_augmentation_draws_only_from_its_own_generators(batch, policy: str, mix: dict[str, float]) -> None:
    """With a run's generators (``fit`` passes them), the output depends on the run's seed alone, and
    torch's global generator is neither read nor moved: runs in threads cannot disturb each other."""
    from pipeline.rng import RunRandom

    x, y = batch
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        aug = BatchAugmenter(policy, "imagenet", CPU, TINY_CLASSES, random=RunRandom(5), **mix)
        outs.append(aug(x.clone(), y.clone()))
        assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    other = BatchAugmenter(policy, "imagenet", CPU, TINY_CLASSES, random=RunRandom(6), **mix)
    assert not torch.equal(other(x.clone(), y.clone())[0], outs[0][0])


def test_mixing_a_single_image_batch_is_one_hot(batch) -> None:
    x, y = batch
    out, labels = augment("none", x[:1], y[:1], seed=0, cutmix_alpha=1.0, mixup_alpha=1.0)
    assert tuple(out.shape) == (1, 3, 32, 32)
    assert torch.equal(labels, torch.nn.functional.one_hot(y[:1], TINY_CLASSES).float())


def test_normalizer_half_and_imagenet() -> None:
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    x[1] = 255
    half = Normalizer("half", CPU)(x)
    assert half.dtype == torch.float32 and half.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(half[0], torch.full((3, 4, 4), -1.0))
    assert torch.equal(half[1], torch.full((3, 4, 4), 1.0))

    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["imagenet"])
    assert NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(Normalizer("imagenet", CPU)(x), (x.float() / 255 - mean) / std)
    # float input (already scaled) is not divided by 255 again
    torch.testing.assert_close(Normalizer("imagenet", CPU)(x.float() / 255), (x.float() / 255 - mean) / std)


def test_unknown_policy_or_normalisation_is_rejected() -> None:
    with pytest.raises(ValueError, match="'flip'"):
        build_policy("flip")
    with pytest.raises(ValueError, match="'flip'"):
        BatchAugmenter("flip", "imagenet", CPU, TINY_CLASSES)
    with pytest.raises(ValueError, match="'zscore'"):
        Normalizer("zscore", CPU)
    assert build_policy("none") is None


# --------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------


def test_cli_data_inspect(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import signal

    from pipeline.cli import main

    cache = tmp_path / "cli-cache"
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.setenv("DEEPFAKE_TUNE_CACHE", str(cache))
    monkeypatch.chdir(work)
    handler = signal.getsignal(signal.SIGTERM)  # main installs its own
    try:
        assert main(["data", "inspect", "--data", str(tiny_dataset)]) == 0
        out = capsys.readouterr().out
        assert re.search(rf"^train\s+{N_TRAIN} images", out, re.M), out
        assert re.search(rf"^validation\s+{N_VAL} images", out, re.M), out
        assert re.search(rf"^test\s+{TINY_TEST} images\s+\[unlabelled\]", out, re.M), out
        assert f"{TINY_SIZE}x{TINY_SIZE}" in out
        assert str(cache) in out
        assert len(list(cache.glob("train-*.npy"))) == 1
        assert list(work.iterdir()) == []  # nothing written to the working directory

        bad = tiny_dataset / "validation" / f"{row_of(tiny_dataset, 'validation', 1)[0]}.png"
        bad.write_text("not a png")
        assert main(["data", "inspect", "--data", str(tiny_dataset)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(bad) in err and len(err.strip().splitlines()) == 1
        assert list(cache.glob("*.partial")) == []
        assert len(list(cache.glob("validation-*.npy"))) == 1  # only the first run's valid one
        assert list(work.iterdir()) == []
        with pytest.raises(SystemExit):  # data inspect logs no run, so takes no --experiment
            main(["data", "inspect", "--data", str(tiny_dataset), "--experiment", "x"])
    finally:
        signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------------------------------
# The real sample (skipped when absent)
# --------------------------------------------------------------------------------------------------


def test_unibuc_sample(tmp_path: Path) -> None:
    if not (SAMPLE / "train.csv").exists():
        pytest.skip(f"real sample not found at {SAMPLE}")
    cache = tmp_path / "cache"
    ds = load_dataset(config(SAMPLE, cache))
    assert ds.layout == "competition"
    assert len(ds.train) == 2500 and len(ds.validation) == 500
    assert ds.num_classes == 5
    assert ds.train.counts(5) == [500] * 5
    assert ds.validation.counts(5) == [100] * 5
    assert ds.image_shape == (3, 100, 100)
    assert ds.train.images.dtype == torch.uint8
    again = load_dataset(config(SAMPLE, cache))
    assert again.train.cache_hit and again.validation.cache_hit
    assert torch.equal(again.train.images, ds.train.images)


@pytest.mark.parametrize("per_class", [[1, 1, 1, 1, 1], [3, 1, 2, 5, 1], [250] * 5])
def test_selection_halves_are_stratified_and_never_empty(per_class):
    """A pair's final runs each hold out one half of the selection split (crossfit): with one image of
    a class, or an odd count, the halves must still both hold images and differ by at most one."""
    labels = np.repeat(np.arange(len(per_class)), per_class)
    folds = stratified_folds(labels, 2, seed=3)
    sizes = np.bincount(folds, minlength=2)
    assert abs(int(sizes[0]) - int(sizes[1])) <= 1 and sizes.min() >= 1, sizes
    for c, n in enumerate(per_class):
        in_first = int((folds[labels == c] == 0).sum())
        assert abs(in_first - (n - in_first)) <= 1, (c, n, in_first)
