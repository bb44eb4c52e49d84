"""The batched ``color`` policy against the torchvision transforms it replaces (reference 2's
``Compose([RandomHorizontalFlip, RandomRotation(15), ColorJitter(0.2, 0.2, 0.2, 0.05),
RandomApply([GaussianBlur(3, (0.1, 1.0))], p=0.3)])``): the same output image by image for given
parameters, and draws in the v2 transforms' ranges."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.data.color import ADJUSTMENTS, BatchColor

TV_ADJUST = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
             "saturation": F.adjust_saturation, "hue": F.adjust_hue}


def torchvision_color(image: torch.Tensor, p: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    """One image through torchvision's functional kernels, in the v2 Compose's order."""
    if p["flip"][i]:
        image = F.horizontal_flip(image)
    image = F.rotate(image, float(p["angle"][i]), InterpolationMode.NEAREST, fill=0)
    for index in p["order"][i].tolist():
        which = ADJUSTMENTS[index]
        image = TV_ADJUST[which](image, float(p[which][i]))
    if p["blur"][i]:
        sigma = float(p["sigma"][i])
        image = F.gaussian_blur(image, [3, 3], [sigma, sigma])
    return image


@pytest.mark.parametrize("size", [32, 37])
def test_batched_color_is_torchvisions_policy_per_image(size: int) -> None:
    torch.manual_seed(size)
    color = BatchColor()
    n = 24
    x = torch.rand(n, 3, size, size)
    x[0] = 0.5  # a grey image: hue and saturation are undefined, torchvision keeps them 0
    x[1, :, :4] = x[1, 0, :4]  # grey pixels inside a coloured image
    p = color.sample(n, torch.device("cpu"))
    p["flip"][::2], p["flip"][1::2] = True, False  # both branches whatever the draw
    p["blur"][:12], p["blur"][12:] = True, False
    p["order"][:4] = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    p["hue"][2], p["hue"][3] = 0.05, -0.05  # the range's ends: hue wraps around 0/1
    out = color.apply(x.clone(), p)
    for i in range(n):
        torch.testing.assert_close(out[i], torchvision_color(x[i], p, i), atol=2e-5, rtol=0,
                                   msg=lambda m, i=i: f"image {i}: {m}")


def test_each_adjustment_alone_matches_torchvision() -> None:
    """The four adjustments one at a time at the ends of their ranges (a swapped or inverted factor
    shows here even where the random order would hide it)."""
    from pipeline.data.color import adjust

    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 20)
    for which, factors in {"brightness": (0.8, 1.2), "contrast": (0.8, 1.2), "saturation": (0.8, 1.2),
                           "hue": (-0.05, 0.05)}.items():
        for f in factors:
            ours = adjust(x.clone(), torch.full((6,), f), which)
            theirs = torch.stack([TV_ADJUST[which](img, f) for img in x])
            assert (ours - theirs).abs().max() < 2e-5, f"{which} at {f}"


def test_batched_color_draws_like_the_v2_transforms() -> None:
    """Flips about half, angles in [-15, 15], every order of the four adjustments about equally often
    (ColorJitter draws a random permutation), factors in their ranges, blur about 30 % with sigma in
    [0.1, 1.0]."""
    g = torch.Generator().manual_seed(0)
    n = 24_000
    p = BatchColor().sample(n, torch.device("cpu"), g)
    assert 0.48 < p["flip"].float().mean() < 0.52 and 0.28 < p["blur"].float().mean() < 0.32
    assert p["angle"].abs().max() <= 15 and p["angle"].std() > 8
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(n, 4))  # permutations
    _, counts = torch.unique(p["order"], dim=0, return_counts=True)
    assert len(counts) == 24 and counts.min() > 0.8 * n / 24 and counts.max() < 1.2 * n / 24
    for which in ("brightness", "contrast", "saturation"):
        assert 0.8 <= p[which].min() and p[which].max() <= 1.2 and p[which].std() > 0.1
    assert p["hue"].abs().max() <= 0.05 and p["sigma"].min() >= 0.1 and p["sigma"].max() <= 1.0


def test_a_generator_makes_the_same_batch_and_torchs_global_one_is_left_alone() -> None:
    x = torch.rand(8, 3, 16, 16)
    state = torch.random.get_rng_state()
    first = BatchColor()(x.clone(), torch.Generator().manual_seed(3))
    again = BatchColor()(x.clone(), torch.Generator().manual_seed(3))
    other = BatchColor()(x.clone(), torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_cuda_path_computes_every_image_and_keeps_the_same_ones() -> None:
    """On CUDA every adjustment runs on the whole batch and ``where`` keeps the chosen images (no
    data-dependent shapes, no host sync); forced here on the CPU, it gives the CPU path's images."""
    torch.manual_seed(1)
    x = torch.rand(40, 3, 24, 24)
    p = BatchColor().sample(40, torch.device("cpu"))
    torch.testing.assert_close(BatchColor(sync_free=True).apply(x.clone(), p),
                               BatchColor(sync_free=False).apply(x.clone(), p), atol=1e-6, rtol=0)
