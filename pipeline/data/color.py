"""``color`` (reference 2's policy) batched: every image draws its own parameters from the run's
generator and the whole batch goes through each kernel at once (no per-group torchvision calls, no
host sync, no process-wide lock on CUDA).

Same distributions, order and kernels as ``v2.Compose([RandomHorizontalFlip(0.5), RandomRotation(15),
ColorJitter(0.2, 0.2, 0.2, 0.05), RandomApply([GaussianBlur(3, sigma=(0.1, 1.0))], p=0.3)])`` applied
to each image on its own, ColorJitter's random order of its four adjustments included.
``tests/test_augment_color.py`` checks the output against torchvision's functional kernels, image by
image, for given parameters, and the draws against the v2 transforms' ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from .geometric import rotate

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
ADJUSTMENTS = ("brightness", "contrast", "saturation", "hue")  # ColorJitter's fn_idx 0..3
CPU_CHUNK = 16  # images per CPU pass: cache-sized; 29 ms per batch of 64 at 100 px on one core, 59 ms whole


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (r * GRAY[0] + g * GRAY[1] + b * GRAY[2]).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (x * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    # Grey pixels (max = min) divide by 1 instead of 0: their saturation and hue come out 0, as
    # torchvision's (r = g = b makes every numerator 0).
    ones = torch.ones_like(maxc)
    flat = maxc == minc
    span = torch.where(flat, ones, maxc - minc)
    s = (maxc - minc) / torch.where(flat, ones, maxc)
    h = torch.where(maxc == r, (g - b) / span, torch.where(maxc == g, 2.0 + (b - r) / span, 4.0 + (r - g) / span))
    return torch.stack(((h / 6.0 + 1.0).fmod(1.0), s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    # The closed form f(n) = v - v s max(0, min(k, 4 - k, 1)), k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b:
    # torchvision's sector table without a per-call constant tensor (a host copy on CUDA).
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.arange(5, 0, -2, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (n + h * 6.0).remainder(6.0)
    return (v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)).clamp_(0.0, 1.0)


def adjust(x: torch.Tensor, factor: torch.Tensor, which: str) -> torch.Tensor:
    """One ColorJitter adjustment, ``factor`` per image (a vector of n)."""
    factor = factor.view(-1, 1, 1, 1)
    if which == "brightness":
        return (x * factor).clamp_(0.0, 1.0)
    if which == "contrast":
        return blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), factor)
    if which == "saturation":
        return blend(x, grayscale(x), factor)
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, 0:1] + factor).remainder(1.0)
    return hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), 1))


def blur3(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A 3x3 Gaussian blur with each image's own sigma, as one grouped convolution (reflect padding,
    torchvision's kernel: softmax(-(t / sigma)^2) at t = -1/sqrt(2), 0, 1/sqrt(2))."""
    n, c, h, w = x.shape
    edge = torch.exp(-0.5 / sigma.to(x.dtype) ** 2)
    k1 = torch.stack((edge, torch.ones_like(edge), edge), 1) / (1.0 + 2.0 * edge).unsqueeze(1)  # n x 3
    kernel = (k1.unsqueeze(2) * k1.unsqueeze(1)).repeat_interleave(c, 0).unsqueeze(1)  # (n c) x 1 x 3 x 3
    padded = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel, groups=n * c).view(n, c, h, w)


class BatchColor:
    """Flip (p=0.5), rotation by U(-15, 15) degrees (nearest, fill 0), the four ColorJitter
    adjustments in a random order per image (brightness, contrast, saturation in U(0.8, 1.2), hue in
    U(-0.05, 0.05)), then with p=0.3 a 3x3 Gaussian blur with sigma in U(0.1, 1.0)."""

    def __init__(self, degrees: float = 15.0, flip_p: float = 0.5, jitter: float = 0.2, hue: float = 0.05,
                 blur_p: float = 0.3, sigma: tuple[float, float] = (0.1, 1.0), sync_free: bool | None = None):
        self.sync_free = sync_free  # compute every image, keep the chosen; None: on CUDA (no host sync)
        self.degrees, self.flip_p, self.jitter, self.hue = degrees, flip_p, jitter, hue
        self.blur_p, self.sigma = blur_p, sigma

    def sample(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-image parameters: flip, angle, ``order`` (n x 4, a permutation of ADJUSTMENTS' indices),
        one factor per adjustment, blur (bool) and sigma."""
        g = generator

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.empty(n, device=device).uniform_(low, high, generator=g)

        return {"flip": torch.rand(n, device=device, generator=g) < self.flip_p,
                "angle": uniform(-self.degrees, self.degrees),
                "order": torch.rand(n, 4, device=device, generator=g).argsort(1),
                "brightness": uniform(1 - self.jitter, 1 + self.jitter),
                "contrast": uniform(1 - self.jitter, 1 + self.jitter),
                "saturation": uniform(1 - self.jitter, 1 + self.jitter),
                "hue": uniform(-self.hue, self.hue),
                "blur": torch.rand(n, device=device, generator=g) < self.blur_p,
                "sigma": uniform(*self.sigma)}

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), x.device, generator))

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(x)
        if n == 0:
            return x
        sync_free = x.is_cuda if self.sync_free is None else self.sync_free
        if not sync_free and n > CPU_CHUNK:  # per-image work: chunks that stay in the CPU's cache
            return torch.cat([self.apply(x[i:i + CPU_CHUNK], {k: v[i:i + CPU_CHUNK] for k, v in params.items()})
                              for i in range(0, n, CPU_CHUNK)])
        x = torch.where(params["flip"].view(n, 1, 1, 1), x.flip(-1), x)
        x = rotate(x, params["angle"], torch.zeros_like(params["flip"]))
        # Each slot of the order applies, to every image, the adjustment its permutation puts there.
        for slot in range(len(ADJUSTMENTS)):
            chosen = params["order"][:, slot]
            for index, which in enumerate(ADJUSTMENTS):
                x = where_chosen(x, chosen == index, partial(adjust, which=which), params[which], sync_free)
        return where_chosen(x, params["blur"], blur3, params["sigma"], sync_free)


def where_chosen(x: torch.Tensor, chosen: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 per_image: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """``fn(images, their parameters)`` on the chosen images, the others unchanged. On CUDA every image is
    computed and the chosen kept (``sync_free``: no data-dependent shapes, so no host sync); on the
    CPU only the chosen are computed (a quarter of the work for each jitter slot)."""
    n = len(x)
    if sync_free:
        return torch.where(chosen.view(n, 1, 1, 1), fn(x, per_image), x)
    index = chosen.nonzero().flatten()
    if len(index):
        x = x.index_copy(0, index, fn(x[index], per_image[index]))
    return x

