"""``geometric`` (reference 1's policy) batched: ``BatchGeometric``, and the rotation it shares with
``color``.

Every image draws its own parameters, exactly as the per-sample reference does, yet the whole batch
is warped by one ``grid_sample`` for rotation+flip and one for the perspective subset (the same grids,
interpolation and fill as torchvision's kernels).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def pixel_axes(h: int, w: int, start: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Pixel-centre coordinates as torchvision's _affine_grid / _perspective_grid build them: x as
    # 1 x 1 x W, y as 1 x H x 1, so per-image 3x2 maps broadcast to n x H x W without a (slow, K=3) bmm.
    xs = torch.linspace(start, w - 1.0 + start, steps=w, device=device).view(1, 1, w)
    ys = torch.linspace(start, h - 1.0 + start, steps=h, device=device).view(1, h, 1)
    return xs, ys


def rotate(x: torch.Tensor, angle: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image rotated by its ``angle`` (degrees) about the centre (nearest, fill 0: torchvision's
    ``rotate``), then mirrored where ``flip``: one ``grid_sample`` for the batch."""
    n, _, h, w = x.shape
    # Rotation: torchvision's inverse affine matrix for -angle about the centre, the flip folded in
    # (a flipped output pixel samples the rotated image at -x). Rows scaled to grid_sample's [-1, 1].
    rad = angle.to(torch.float64) * (-math.pi / 180.0)
    cos, sin = torch.cos(rad).to(x.dtype), torch.sin(rad).to(x.dtype)
    sign = torch.where(flip, -1.0, 1.0).to(x.dtype)
    xs, ys = pixel_axes(h, w, (1.0 - w) * 0.5, x.device)
    col = lambda v: v.view(n, 1, 1)  # noqa: E731
    gx = xs * col(cos * sign / (0.5 * w)) + ys * col(sin / (0.5 * w))
    gy = xs * col(-sin * sign / (0.5 * h)) + ys * col(cos / (0.5 * h))
    grid = torch.stack([gx, gy], dim=-1)
    # Nearest with zero padding: out-of-image pixels become 0, torchvision's fill=0.
    return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


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

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        n, _, h, w = x.shape
        if n == 0:
            return x
        x = rotate(x, params["angle"], params["flip"])

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
        xs, ys = pixel_axes(h, w, 0.5, x.device)
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
