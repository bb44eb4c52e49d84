"""Decode every image once into a uint8 ``N x 3 x H x W`` array, cached on disk, with a SHA-256 of
each image's decoded pixels (its content, whatever its file name, path or PNG encoding).

The cache key is a digest of the file list, sizes, mtimes and the resize target (one stat per file),
so a changed dataset is never served stale. Cache files are written to a temporary name and renamed,
so an interrupted or failed decode never leaves a partial cache behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
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

CACHE_VERSION = "2"  # 2: content hashes beside the pixels
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
    return decode_hashed(path, image_size)[0]


def pixel_hash(image: torch.Tensor) -> bytes:
    """SHA-256 of a uint8 image's shape and pixels: equal for equal content."""
    array = np.ascontiguousarray(image.numpy())
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).digest()


def decode_hashed(path: Path, image_size: int | None) -> tuple[torch.Tensor, bytes]:
    """``decode_one`` plus the content hash of the image at its native size (before any resize)."""
    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({str(exc).splitlines()[0] or type(exc).__name__}); "
                        "corrupt, truncated or not an image") from None
    if image.dtype != torch.uint8:  # 16-bit PNGs decode as uint16: scale down, never wrap around
        image = F.to_dtype(image, torch.uint8, scale=True)
    content = pixel_hash(image)
    if image_size is not None and tuple(image.shape[-2:]) != (image_size, image_size):
        image = F.resize(image, [image_size, image_size], antialias=True)
    return image, content


def decode_all(paths: tuple[Path, ...], image_size: int | None,
               desc: str = "decode") -> tuple[np.ndarray, np.ndarray]:
    """Decode with a thread pool (torchvision's decoders release the GIL) into one array; returns
    (images, N x 32 uint8 content hashes)."""
    first, first_hash = decode_hashed(paths[0], image_size)
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    hashes = np.empty((len(paths), 32), dtype=np.uint8)
    out[0], hashes[0] = first.numpy(), np.frombuffer(first_hash, np.uint8)

    def work(i: int) -> None:
        image, content = decode_hashed(paths[i], image_size)
        if image.shape != first.shape:
            raise DataError(
                f"{paths[i]}: image size {tuple(image.shape[1:])} differs from {tuple(first.shape[1:])} "
                f"of {paths[0]}; set data.image_size (--image-size) to resize"
            )
        out[i], hashes[i] = image.numpy(), np.frombuffer(content, np.uint8)

    with ThreadPoolExecutor(DECODE_WORKERS) as pool, Counter(len(paths), desc, leave=False) as counter:
        counter.update()
        # Iterating re-raises the first worker error here, in the caller.
        for _ in pool.map(work, range(1, len(paths))):
            counter.update()
    return out, hashes


def load_images(paths: tuple[Path, ...], image_size: int | None, cache_dir: Path,
                tag: str) -> tuple[np.ndarray, np.ndarray, Path | None, bool]:
    """Return (images, content hashes, cache file, hit). ``tag`` is a readable prefix (the split name). In
    a cache folder that cannot be written the images are decoded in memory, and the cache file is None."""
    digest = files_digest(paths, image_size)
    cache_file = cache_dir / f"{tag}-{digest}.npy"
    hash_file = cache_file.with_suffix(".sha256")  # N x 32 bytes, in file order
    if cache_file.exists() and hash_file.exists():
        try:
            # Memory-mapped (copy-on-write): workers on one machine share the pages of one file.
            images = np.load(cache_file, mmap_mode="c")
            hashes = np.fromfile(hash_file, dtype=np.uint8).reshape(-1, 32)
            if len(hashes) == len(images) == len(paths):
                return images, hashes, cache_file, True
        except (ValueError, OSError, EOFError):
            pass
        with contextlib.suppress(OSError):  # a read-only cache folder keeps it: then decode in memory
            cache_file.unlink(missing_ok=True)  # unreadable cache: rebuild it
    images, hashes = decode_all(paths, image_size, f"decode {tag}")
    _write_atomic(hash_file, hashes, raw=True)  # the hashes first: pixels without them are never a hit
    if not _write_atomic(cache_file, images):
        return images, hashes, None, False
    del images  # the file's pages from here on, not a private copy
    return np.load(cache_file, mmap_mode="c"), hashes, cache_file, False


def file_pages(array: np.ndarray) -> mmap.mmap | None:
    """The file mapping behind a cache array loaded memory-mapped (None: an array in memory)."""
    return array.base if isinstance(array.base, mmap.mmap) else None


def release_pages(pages: mmap.mmap | None) -> None:
    """Unmap this process's resident pages of a cache file mapping (``MADV_DONTNEED``). Its resident
    set stops counting the images read so far (a whole training set after a few epochs); the pages
    stay in the page cache, so reading an image again is a minor fault, not a disk read. The mapping
    is copy-on-write and nothing writes into it, so nothing is lost. A no-op where the platform has
    no such advice."""
    if pages is not None and not pages.closed and hasattr(mmap, "MADV_DONTNEED"):
        pages.madvise(mmap.MADV_DONTNEED)


def _write_atomic(path: Path, array: np.ndarray, raw: bool = False) -> bool:
    """Write ``path`` via a temporary file and a rename; False when the location is read-only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    except OSError:
        return False  # read-only cache location: run uncached rather than fail
    try:
        with os.fdopen(fd, "wb") as handle:
            if raw:
                handle.write(array.tobytes())
            else:
                np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
