"""Dataset layouts: which image files make up each split, with which labels.

Two layouts are read:
- competition: ``ROOT/{train,validation}.csv`` (``image_id,label``), ``ROOT/test.csv`` (``image_id``,
  optional ``label``), images at ``ROOT/<split>/<image_id>.png``;
- ImageFolder: ``ROOT/<split>/<class_name>/*.png|jpg`` (class order = sorted names), and an optional
  ``ROOT/test/`` either flat (unlabelled) or by class. An image's id is its path under the split
  folder (``coat/0.png``, or ``0.png`` in a flat test folder), unique by construction, so class
  folders may reuse file names as torchvision's ``ImageFolder`` allows.

Nothing here decodes pixels; every problem is a ``DataError`` naming the file and row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..config import NUM_CLASSES

SPLITS = ("train", "validation", "test")
REQUIRED_SPLITS = ("train", "validation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COMPETITION_CLASSES = tuple(str(i) for i in range(NUM_CLASSES))


class DataError(ValueError):
    """Bad input data. The message names the file (and row) at fault."""


@dataclass(frozen=True)
class SplitIndex:
    split: str
    ids: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None  # None: unlabelled (competition test split)
    source: Path  # the CSV or folder the split was read from


@dataclass(frozen=True)
class DatasetIndex:
    root: Path
    layout: str  # competition | imagefolder
    classes: tuple[str, ...]
    splits: dict[str, SplitIndex]


def index_dataset(root: str | Path) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a directory")
    if (root / "train.csv").exists():
        return _index_competition(root)
    if (root / "train").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()):
        return _index_imagefolder(root)
    raise DataError(
        f"{root}: not a dataset: expected {root / 'train.csv'} (competition layout) "
        f"or class folders under {root / 'train'} (ImageFolder layout)"
    )


def _check_image_id(image_id: str, where: str) -> None:
    # Ids become file names: nothing may point outside the split folder.
    if not image_id:
        raise DataError(f"{where}: empty image_id")
    if "/" in image_id or "\\" in image_id or ".." in image_id or image_id.startswith("~") or "\x00" in image_id:
        raise DataError(f"{where}: image_id {image_id!r} contains a path separator or '..'; rejected")


def _parse_label(raw: str, classes: tuple[str, ...], where: str) -> int:
    text = (raw or "").strip()
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{where}: label {raw!r} is not an integer in 0..{len(classes) - 1}") from None
    if not 0 <= value < len(classes) or text != str(value):
        raise DataError(f"{where}: label {raw!r} is not an integer in 0..{len(classes) - 1}")
    return value


def _read_csv_split(root: Path, split: str, required: bool) -> SplitIndex | None:
    csv_path = root / f"{split}.csv"
    folder = root / split
    if not csv_path.exists():
        if required:
            raise DataError(f"missing {csv_path} (the {split} split's image_id,label file)")
        return None
    if not folder.is_dir():
        raise DataError(f"missing image folder {folder} for {csv_path}")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: Excel's BOM
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if "image_id" not in header:
            raise DataError(f"{csv_path}: header must contain image_id (found {header or 'nothing'})")
        labelled = "label" in header
        if split != "test" and not labelled:
            raise DataError(f"{csv_path}: header must contain label (found {header})")
        ids: list[str] = []
        labels: list[int] = []
        seen: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            where = f"{csv_path}, row {line}"
            image_id = (row.get("image_id") or "").strip()
            _check_image_id(image_id, where)
            if image_id in seen:
                raise DataError(f"{where}: duplicate image_id {image_id!r} (first at row {seen[image_id]})")
            seen[image_id] = line
            ids.append(image_id)
            if labelled:
                labels.append(_parse_label(row.get("label"), COMPETITION_CLASSES, where))
    if not ids:
        raise DataError(f"{csv_path}: the {split} split is empty")
    paths = []
    for image_id in ids:
        path = folder / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"missing image {path} (listed in {csv_path}, row {seen[image_id]})")
        paths.append(path)
    return SplitIndex(split, tuple(ids), tuple(paths), tuple(labels) if labelled else None, csv_path)


def _index_competition(root: Path) -> DatasetIndex:
    splits = {}
    for split in SPLITS:
        found = _read_csv_split(root, split, required=split in REQUIRED_SPLITS)
        if found is not None:
            splits[split] = found
    _check_classes_present(splits["train"], COMPETITION_CLASSES)
    return DatasetIndex(root, "competition", COMPETITION_CLASSES, splits)


def _image_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # .DS_Store and friends
        if path.is_dir():
            raise DataError(f"unexpected folder {path}: class folders hold image files only")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
        files.append(path)
    return files


def _read_folder_split(root: Path, split: str, classes: tuple[str, ...] | None) -> SplitIndex | None:
    folder = root / split
    if not folder.is_dir():
        if split in REQUIRED_SPLITS:
            raise DataError(f"missing split folder {folder}")
        return None
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] | None = []
    if split == "test" and not subdirs:
        paths = _image_files(folder)
        labels = None
    else:
        assert classes is not None
        for sub in subdirs:
            if sub.name not in classes:
                raise DataError(f"{sub}: class {sub.name!r} is not a known class ({', '.join(classes)})")
            for path in _image_files(sub):
                paths.append(path)
                labels.append(classes.index(sub.name))
    ids = [path.relative_to(folder).as_posix() for path in paths]  # "coat/0.png": no two alike
    if not ids:
        raise DataError(f"{folder}: the {split} split is empty")
    return SplitIndex(split, tuple(ids), tuple(paths), tuple(labels) if labels is not None else None, folder)


def _index_imagefolder(root: Path) -> DatasetIndex:
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")))
    splits = {}
    for split in SPLITS:
        found = _read_folder_split(root, split, classes)
        if found is not None:
            splits[split] = found
    _check_classes_present(splits["train"], classes)
    return DatasetIndex(root, "imagefolder", classes, splits)


def _check_classes_present(train: SplitIndex, classes: tuple[str, ...]) -> None:
    assert train.labels is not None
    present = set(train.labels)
    missing = [name for i, name in enumerate(classes) if i not in present]
    if missing:
        raise DataError(f"{train.source}: class(es) {', '.join(missing)} have no training images")
