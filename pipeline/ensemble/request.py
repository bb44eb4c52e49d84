"""A request row's ``image`` value into a uint8 image, or a 400-style error that names the row.

``mlflow models serve`` answers 400 with our message when predict raises
``MlflowException.invalid_parameter_value``; anything else would be a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_BYTES = 10 * 1024 * 1024  # one image; larger payloads are refused before decoding
MAX_IMAGE_PIXELS = 4096 * 4096


def invalid_input(message: str) -> MlflowException:
    # invalid_parameter_value makes `mlflow models serve` answer 400 with this message.
    return MlflowException.invalid_parameter_value(message)


def _header_size(value: bytes) -> tuple[int, int]:
    """(width, height) from the file header alone; (0, 0) when the header is unreadable (decoding
    then reports the problem)."""

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(value)) as image:  # lazy: reads the header, not the pixels
                return image.size
    except Image.DecompressionBombError:
        return 1 << 16, 1 << 16  # Pillow's own bomb limit: far beyond ours
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return 0, 0


def decode_request_image(value: Any, row: int) -> torch.Tensor:
    """Encoded PNG/JPEG bytes → uint8 3xHxW RGB, or a 400-style error naming the row."""
    from torchvision.io import ImageReadMode, decode_image

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise invalid_input(f"row {row}: 'image' must be encoded image bytes (or base64 text), "
                             "got a string that is not base64") from None
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise invalid_input(f"row {row}: 'image' must be encoded image bytes, got {type(value).__name__}")
    if not value:
        raise invalid_input(f"row {row}: 'image' is empty")
    if len(value) > MAX_IMAGE_BYTES:
        raise invalid_input(f"row {row}: image of {len(value)} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit")
    if not (value.startswith(b"\x89PNG") or value.startswith(b"\xff\xd8")):
        raise invalid_input(f"row {row}: 'image' is not a PNG or JPEG file")
    width, height = _header_size(value)
    if width * height > MAX_IMAGE_PIXELS:  # from the header: a decompression bomb is never decoded
        raise invalid_input(f"row {row}: image of {width}x{height} pixels is too large")
    try:
        image = decode_image(torch.frombuffer(bytearray(value), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise invalid_input(f"row {row}: cannot decode image ({str(exc).splitlines()[0][:200]}); "
                         "truncated or corrupt") from None
    if image.shape[-1] * image.shape[-2] > MAX_IMAGE_PIXELS:
        raise invalid_input(f"row {row}: image of {image.shape[-1]}x{image.shape[-2]} pixels is too large")
    if image.dtype != torch.uint8:
        # 16-bit PNGs decode as uint16: scale to uint8 as the dataset layer does, never feed raw 0..65535
        from torchvision.transforms.v2 import functional as F

        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


DECODE_THREADS = 4  # torchvision decodes outside the GIL: a large request decodes on several cores


def decode_request_images(values: list[Any]) -> list[torch.Tensor]:
    """Every row decoded, in order (``decode_request_image``); a request of a few rows one at a time,
    a larger one in a thread pool. Either way the error raised is the first bad row's."""
    if len(values) < 2 * DECODE_THREADS:
        return [decode_request_image(v, i) for i, v in enumerate(values)]
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        return list(pool.map(decode_request_image, values, range(len(values))))
