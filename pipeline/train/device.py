"""Where and in what precision a network runs: device and precision resolution, autocast."""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch


class DeviceError(RuntimeError):
    """A device or precision that this machine cannot provide."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} was asked for but CUDA is not available on this machine; "
                              "use --device cpu or --device auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    return torch.device(spec)


def bf16_supported(device: torch.device) -> bool:
    """bf16 runs here at all (on a CPU oneDNN emulates it with AVX512 alone: correct, but slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_native(device: torch.device) -> bool:
    """bf16 in hardware: CUDA's bf16, or a CPU with AVX512-BF16 or AMX (3-4x fp32 for these CNNs).
    An AVX512 CPU without them (e.g. Ice Lake) passes ``bf16_supported`` but emulates it, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise DeviceError(f"precision bf16 is not supported on {device}; use --precision fp32 or auto")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_COPIES: dict[tuple[int, str], tuple[weakref.ref, torch.Tensor]] = {}
_COPIES_LOCK = threading.Lock()


def on_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``: copied once per process while ``tensor`` lives, then shared, so runs
    in threads on one GPU hold one copy of the dataset between them. A tensor already there is
    returned as is (the CPU case)."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    key = (id(tensor), str(device))
    with _COPIES_LOCK:
        held = _COPIES.get(key)
        if held is not None and held[0]() is tensor:
            return held[1]
        copy = tensor.to(device)
        if copy is not tensor:
            # The copy goes when the source does (an id is reused only after its object died).
            _COPIES[key] = (weakref.ref(tensor, lambda _, key=key: _COPIES.pop(key, None)), copy)
        return copy
