"""Batch-wise augmentation and normalisation on the training device (torchvision.transforms.v2).

``geometric`` (reference 1's policy) runs as ``BatchGeometric``: every image draws its own
parameters, exactly as the per-sample reference does, yet the whole batch is warped by one
``grid_sample`` for rotation+flip and one for the perspective subset (the same grids, interpolation
and fill as torchvision's kernels). Other policies call the v2 transform on the batch, which draws
one set of random parameters per call, so the batch is cut into groups of ``group_size`` images,
each with its own draw. Either way there is no per-sample work in worker processes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torchvision.transforms import v2

from ..rng import RunRandom, global_draws

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _geometric() -> v2.Transform:  # reference 1
    return v2.Compose([
        v2.RandomRotation(15),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomPerspective(distortion_scale=0.2, p=0.3),
    ])


def _color() -> v2.Transform:  # reference 2
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomRotation(15),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.3),
    ])


# The two reference solutions' training augmentations and a resampling-free one, by name
# (config.AUGMENT_POLICIES lists the same names; "shift" and "geometric" run batched, see BatchShift/BatchGeometric).
POLICIES = {"none": lambda: None, "geometric": _geometric, "color": _color, "shift": lambda: BatchShift()}


def build_policy(name: str) -> v2.Transform | None:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown augmentation policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def build_mix(cutmix_alpha: float, mixup_alpha: float, num_classes: int) -> v2.Transform | None:
    mixes = []
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


class Normalizer:
    """uint8 NCHW → normalised float, channels_last, on the batch's device."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in NORMALIZATION:
            raise ValueError(f"unknown normalisation {mode!r}; choose one of {', '.join(NORMALIZATION)}")
        mean, std = NORMALIZATION[mode]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = self.scale(x)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


@lru_cache(maxsize=32)
def image_corners(h: int, w: int, device: torch.device) -> torch.Tensor:
    """The four corners of an h x w image (float64, 4 x 2), built once per (shape, device): a tensor
    made from Python numbers is a host-to-device copy, which on CUDA waits for the queued work, so a
    per-batch one would be a host sync in every training step."""
    return torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=torch.float64).to(device)


class BatchGeometric:
    """``build_policy("geometric")`` with per-image parameters, batched.

    Same distributions, order and kernels as ``v2.Compose([RandomRotation(15), RandomHorizontalFlip(0.5),
    RandomPerspective(0.2, p=0.3)])`` applied to each image on its own: rotation by U(-15, 15) degrees
    about the centre (nearest, fill 0), then a horizontal flip with p=0.5 (folded into the rotation's
    sampling grid: one resample), then with p=0.3 a perspective warp whose corners move by up to
    ``distortion_scale`` of the half-size (bilinear, fill 0). ``tests/test_bench.py`` checks the
    output against torchvision's functional kernels, image by image, for given parameters.
    Random draws use ``generator`` (on the batch's device) when given, else torch's global generator;
    on CUDA no step waits for the host.
    """

    def __init__(self, degrees: float = 15.0, flip_p: float = 0.5, distortion_scale: float = 0.2,
                 perspective_p: float = 0.3):
        self.degrees, self.flip_p = degrees, flip_p
        self.distortion_scale, self.perspective_p = distortion_scale, perspective_p

    def sample(self, n: int, height: int, width: int, device: torch.device,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-image parameters: angle (degrees), flip and perspective (bool), corner endpoints (n x 4 x 2)."""
        g = generator
        angle = torch.empty(n, device=device).uniform_(-self.degrees, self.degrees, generator=g)
        flip = torch.rand(n, device=device, generator=g) < self.flip_p
        perspective = torch.rand(n, device=device, generator=g) < self.perspective_p
        # RandomPerspective.make_params: each corner moves inwards by randint(0, bound) pixels.
        bw = int(self.distortion_scale * (width // 2)) + 1
        bh = int(self.distortion_scale * (height // 2)) + 1
        dx = torch.randint(0, bw, (n, 4), device=device, generator=g)
        dy = torch.randint(0, bh, (n, 4), device=device, generator=g)
        xs = torch.stack([dx[:, 0], width - bw + dx[:, 1], width - bw + dx[:, 2], dx[:, 3]], 1)
        ys = torch.stack([dy[:, 0], dy[:, 1], height - bh + dy[:, 2], height - bh + dy[:, 3]], 1)
        return {"angle": angle, "flip": flip, "perspective": perspective, "endpoints": torch.stack([xs, ys], 2)}

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), x.shape[-2], x.shape[-1], x.device, generator))

    @staticmethod
    def _axes(h: int, w: int, start: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Pixel-centre coordinates as torchvision's _affine_grid / _perspective_grid build them: x as
        # 1 x 1 x W, y as 1 x H x 1, so per-image 3x2 maps broadcast to n x H x W without a (slow, K=3) bmm.
        xs = torch.linspace(start, w - 1.0 + start, steps=w, device=device).view(1, 1, w)
        ys = torch.linspace(start, h - 1.0 + start, steps=h, device=device).view(1, h, 1)
        return xs, ys

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        n, _, h, w = x.shape
        if n == 0:
            return x
        # Rotation: torchvision's inverse affine matrix for -angle about the centre, the flip folded in
        # (a flipped output pixel samples the rotated image at -x). Rows scaled to grid_sample's [-1, 1].
        rad = params["angle"].to(torch.float64) * (-math.pi / 180.0)
        cos, sin = torch.cos(rad).to(x.dtype), torch.sin(rad).to(x.dtype)
        sign = torch.where(params["flip"], -1.0, 1.0).to(x.dtype)
        xs, ys = self._axes(h, w, (1.0 - w) * 0.5, x.device)
        col = lambda v: v.view(n, 1, 1)  # noqa: E731
        gx = xs * col(cos * sign / (0.5 * w)) + ys * col(sin / (0.5 * w))
        gy = xs * col(-sin * sign / (0.5 * h)) + ys * col(cos / (0.5 * h))
        grid = torch.stack([gx, gy], dim=-1)
        # Nearest with zero padding: out-of-image pixels become 0, torchvision's fill=0.
        x = torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

        chosen = params["perspective"]
        if x.is_cuda:  # no data-dependent shapes: warp all, keep the chosen (no host sync)
            return torch.where(chosen.view(n, 1, 1, 1), self._perspective(x, params["endpoints"]), x)
        index = chosen.nonzero().flatten()
        if len(index):
            x.index_copy_(0, index, self._perspective(x[index], params["endpoints"][index]))
        return x

    def _perspective(self, x: torch.Tensor, endpoints: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # _get_perspective_coeffs: the 8x8 system mapping the moved corners back to the image corners,
        # solved in float64 (exact: four point pairs, eight unknowns).
        start = image_corners(h, w, x.device).expand(n, 4, 2)
        end = endpoints.to(torch.float64)
        ex, ey, sx, sy = end[..., 0], end[..., 1], start[..., 0], start[..., 1]
        a = torch.zeros(n, 8, 8, dtype=torch.float64, device=x.device)
        a[:, 0::2, 0], a[:, 0::2, 1], a[:, 0::2, 2] = ex, ey, 1.0
        a[:, 1::2, 3], a[:, 1::2, 4], a[:, 1::2, 5] = ex, ey, 1.0
        a[:, 0::2, 6], a[:, 0::2, 7] = -sx * ex, -sx * ey
        a[:, 1::2, 6], a[:, 1::2, 7] = -sy * ex, -sy * ey
        k = torch.linalg.solve_ex(a, start.reshape(n, 8)).result.to(x.dtype).unbind(1)  # _ex: no host sync
        # _perspective_grid: ((k0 x + k1 y + k2) / (0.5 w), (k3 x + k4 y + k5) / (0.5 h)) / (k6 x + k7 y + 1) - 1
        xs, ys = self._axes(h, w, 0.5, x.device)
        col = lambda v: v.view(n, 1, 1)  # noqa: E731
        den = xs * col(k[6]) + (ys * col(k[7]) + 1.0)
        gx = (xs * col(k[0] / (0.5 * w)) + (ys * col(k[1] / (0.5 * w)) + col(k[2] / (0.5 * w)))) / den - 1.0
        gy = (xs * col(k[3] / (0.5 * h)) + (ys * col(k[4] / (0.5 * h)) + col(k[5] / (0.5 * h)))) / den - 1.0
        grid = torch.stack([gx, gy], dim=-1)
        # _apply_grid_transform with fill=0: a ones channel marks the image, out-of-image blends to 0.
        marked = torch.cat([x, torch.ones(n, 1, h, w, dtype=x.dtype, device=x.device)], 1)
        warped = torch.nn.functional.grid_sample(marked, grid, mode="bilinear", padding_mode="zeros",
                                                 align_corners=False)
        return warped[:, :c] * warped[:, c:]


class BatchShift:
    """Horizontal flip (p=0.5) and a shift by up to ``pixels`` whole pixels in x and y (zero fill), per
    image, batched. No resampling: the generators' pixel-grid artefacts, which tell the classes apart,
    are moved, never interpolated (the ablation in the README measures it against ``geometric``)."""

    def __init__(self, pixels: int = 6, flip_p: float = 0.5):
        self.pixels, self.flip_p = pixels, flip_p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        if n == 0:
            return x
        p = self.pixels
        flip = torch.rand(n, device=x.device, generator=generator) < self.flip_p
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        dy, dx = torch.randint(0, 2 * p + 1, (2, n, 1), device=x.device, generator=generator)
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1)  # crop window of each image
        cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        return padded[batch, chans, rows, cols]


class BatchAugmenter:
    """Training-time batch transform: augment (per image for ``geometric``, else per group of
    ``group_size``), optional CutMix/MixUp, normalise.

    With ``random`` (a run's own generators) every draw is the run's: ``geometric`` samples from its
    device generator, and the v2 transforms and mixes, which draw from torch's global generator,
    run inside ``global_draws`` with a seed from the run's sequence. Without it, torch's global
    generator is used as is."""

    def __init__(self, policy: str, normalize: str, device: torch.device, num_classes: int,
                 cutmix_alpha: float = 0.0, mixup_alpha: float = 0.0, group_size: int = 8,
                 random: RunRandom | None = None):
        self.policy = BatchGeometric() if policy == "geometric" else build_policy(policy)  # shift: BatchShift
        self.mix = build_mix(cutmix_alpha, mixup_alpha, num_classes)
        self.normalizer = Normalizer(normalize, device)
        self.group_size = group_size
        self.random = random

    def _global(self, fn, *args):
        """``fn(*args)``, its global-generator draws taken from this run's sequence when it has one."""
        if self.random is None:
            return fn(*args)
        with global_draws(self.random.next_seed()):
            return fn(*args)

    @property
    def soft_labels(self) -> bool:
        return self.mix is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalizer.scale(x)
        if isinstance(self.policy, (BatchGeometric, BatchShift)):  # per-image parameters, whole-batch kernels
            x = self.policy(x, self.random.device if self.random is not None else None)
        elif self.policy is not None:
            x = self._global(lambda: torch.cat([self.policy(chunk) for chunk in x.split(self.group_size)]))
        if self.mix is not None and len(x) > 1:
            x, y = self._global(self.mix, x, y)
        elif self.mix is not None:
            y = torch.nn.functional.one_hot(y, self.mix_classes()).float()
        return self.normalizer(x), y

    def mix_classes(self) -> int:
        mix = self.mix.transforms[0] if isinstance(self.mix, v2.RandomChoice) else self.mix
        return mix.num_classes
