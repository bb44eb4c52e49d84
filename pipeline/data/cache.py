"""Decode every image once into a uint8 ``N x 3 x H x W`` array, cached on disk.

The cache key is a digest of the file list, sizes, mtimes and the resize target, so a changed
dataset is never served stale. Cache files are written to a temporary name and renamed, so an
interrupted or failed decode never leaves a partial cache behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from ..progress import Counter
from .layout import DataError

# torchvision 0.29 announces a move of its codecs to TorchCodec; they work, and the message would
# repeat for every image. The decode calls are kept in this module and ensemble.py only.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

CACHE_VERSION = "1"
DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))


def default_cache_dir() -> Path:
    # Never next to the user's data: it may be read-only or shared.
    env = os.environ.get("DEEPFAKE_TUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepfake-tune"


def files_digest(paths: list[Path] | tuple[Path, ...], image_size: int | None) -> str:
    """Digest of names, sizes and mtimes: cheap (one stat per file) yet catches any change."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|size={image_size}|n={len(paths)}".encode())
    for path in paths:
        st = path.stat()
        h.update(f"|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def decode_one(path: Path, image_size: int | None) -> torch.Tensor:
    """One image as uint8 3xHxW RGB; grayscale and RGBA are converted, anything unreadable is a DataError."""
    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({str(exc).splitlines()[0] or type(exc).__name__}); "
                        "corrupt, truncated or not an image") from None
    if image.dtype != torch.uint8:  # 16-bit PNGs decode as uint16: scale down, never wrap around
        image = F.to_dtype(image, torch.uint8, scale=True)
    if image_size is not None and tuple(image.shape[-2:]) != (image_size, image_size):
        image = F.resize(image, [image_size, image_size], antialias=True)
    return image


def decode_all(paths: tuple[Path, ...], image_size: int | None, desc: str = "decode") -> np.ndarray:
    """Decode with a thread pool (torchvision's decoders release the GIL) into one array."""
    first = decode_one(paths[0], image_size)
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    out[0] = first.numpy()

    def work(i: int) -> None:
        image = decode_one(paths[i], image_size)
        if image.shape != first.shape:
            raise DataError(
                f"{paths[i]}: image size {tuple(image.shape[1:])} differs from {tuple(first.shape[1:])} "
                f"of {paths[0]}; set data.image_size (--image-size) to resize"
            )
        out[i] = image.numpy()

    with ThreadPoolExecutor(DECODE_WORKERS) as pool, Counter(len(paths), desc, leave=False) as counter:
        counter.update()
        # Iterating re-raises the first worker error here, in the caller.
        for _ in pool.map(work, range(1, len(paths))):
            counter.update()
    return out


def load_images(paths: tuple[Path, ...], image_size: int | None, cache_dir: Path, tag: str) -> tuple[np.ndarray, Path, bool]:
    """Return (images, cache file, hit). ``tag`` is a readable prefix (the split name)."""
    digest = files_digest(paths, image_size)
    cache_file = cache_dir / f"{tag}-{digest}.npy"
    if cache_file.exists():
        try:
            return np.load(cache_file), cache_file, True
        except (ValueError, OSError, EOFError):
            cache_file.unlink(missing_ok=True)  # unreadable cache: rebuild it
    images = decode_all(paths, image_size, f"decode {tag}")
    _write_atomic(cache_file, images)
    return images, cache_file, False


def _write_atomic(path: Path, array: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    except OSError:
        return  # read-only cache location: run uncached rather than fail
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
