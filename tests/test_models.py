"""Every registered architecture: shapes, gradients, channels_last / bf16, and build_model wiring.

Parametrised over ``MODELS`` so a new architecture is tested without editing this file. VGG16 is
the slow one (134M parameters, ~2 s to build), so inputs stay at batch 2-4 and 8-48 px (100 px once).
Every network must train on 8-px images (the smallest ``data.image_size``) and, at the sizes it was
designed for, compute exactly what it did before its max-pools became ``HalvingMaxPool``s.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import MODELS, VGG16, HalvingMaxPool, arch_args, build_model, count_parameters, load_pretrained

ARCHS = list(MODELS)
BLOCK_ARCHS = [a for a in ARCHS if "convs_per_block" in arch_args(a)]


def build(cfg: ModelConfig) -> nn.Module:
    """``build_model`` without the expected vgg16 'training from scratch' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="vgg16: no model.weights")
        return build_model(cfg)


@pytest.fixture(scope="module", params=ARCHS)
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


def _dropout_ps(module: nn.Module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]


def _biases_feeding_batchnorm(model: nn.Module) -> set[int]:
    """Conv biases right before a BatchNorm: train-mode BN subtracts the batch mean, so their true
    gradient is exactly zero (torchvision's vgg16_bn has them; our own blocks drop them)."""
    found: set[int] = set()
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            for a, b in zip(seq, list(seq)[1:], strict=False):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and a.bias is not None:
                    found.add(id(a.bias))
    return found


@pytest.mark.parametrize("size", [8, 32, 48])
def test_output_shape_and_finite(model: nn.Module, size: int) -> None:
    with torch.no_grad():
        out = model(_images(2, size))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_on_8_px_images(arch: str) -> None:
    """A training step at the smallest image size: cnn_v2's fourth pool and vgg16's fourth and fifth
    meet a 1-px map there (plain MaxPool2d(2) raised "Output size is too small" in tune's speed probe)."""
    torch.manual_seed(0)
    model = build(ModelConfig(arch=arch, num_classes=3)).train()
    out = model(_images(4, 8))
    assert out.shape == (4, 3)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def _pairwise_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over neighbouring pairs along ``dim`` (an odd last row dropped); a 1-px side as it is."""
    n = x.shape[dim]
    if n == 1:
        return x
    even, odd = torch.arange(0, n - 1, 2), torch.arange(1, n, 2)
    return torch.maximum(x.index_select(dim, even), x.index_select(dim, odd))


@pytest.mark.parametrize("h, w", [(2, 2), (5, 9), (100, 100), (1, 6), (7, 1), (1, 1)])
def test_halving_pool_halves_every_side_but_a_1_px_one(h: int, w: int) -> None:
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    out = HalvingMaxPool()(x)
    assert torch.equal(out, _pairwise_max(_pairwise_max(x, -2), -1))
    if h >= 2 and w >= 2:
        assert torch.equal(out, nn.MaxPool2d(2)(x))


def _with_plain_pools(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every HalvingMaxPool back to nn.MaxPool2d(2), the only difference from
    the networks before small images were supported (same modules, same order, same weights)."""
    old = copy.deepcopy(model)
    for parent in old.modules():
        for name, child in parent.named_children():
            if isinstance(child, HalvingMaxPool):
                setattr(parent, name, nn.MaxPool2d(2))
    return old


@pytest.mark.parametrize("size", [32, 100])
def test_designed_sizes_compute_what_plain_pools_did(model: nn.Module, size: int) -> None:
    """Bitwise the same outputs as with plain MaxPool2d(2), in eval mode and in train mode (BatchNorm
    batch statistics, the same dropout masks from the same seed)."""
    old = _with_plain_pools(model)
    assert not any(isinstance(m, HalvingMaxPool) for m in old.modules())
    assert sum(isinstance(m, nn.MaxPool2d) for m in old.modules()) == \
        sum(isinstance(m, HalvingMaxPool) for m in model.modules()) > 0
    new = copy.deepcopy(model)  # train mode updates BatchNorm's running stats: not the shared fixture's
    x = _images(2, size)
    for train in (False, True):
        with torch.no_grad():
            torch.manual_seed(1)
            got = new.train(train)(x)
            torch.manual_seed(1)
            expected = old.train(train)(x)
        assert torch.equal(got, expected), f"train={train}"


def test_vgg16_keeps_torchvisions_weights_and_outputs() -> None:
    """The same seed builds torchvision's vgg16_bn weights exactly, and at 32 px our VGG16 (its pools
    swapped) computes exactly what torchvision's own network does."""
    torch.manual_seed(0)
    ours = VGG16().eval()
    torch.manual_seed(0)
    theirs = torchvision.models.vgg16_bn(weights=None, num_classes=5, dropout=0.5).eval()
    own, ref = ours.state_dict(), theirs.state_dict()
    assert list(own) == list(ref) and all(torch.equal(own[k], ref[k]) for k in own)
    with torch.no_grad():
        assert torch.equal(ours(_images(2, 32)), theirs(_images(2, 32)))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_gets_a_gradient(arch: str) -> None:
    torch.manual_seed(0)
    # Dropout 0: a random mask could zero a whole channel for the batch and starve its parameters.
    accepted = arch_args(arch)
    dropouts = {k: 0.0 for k in ("dropout_features", "dropout_fc") if k in accepted}
    model = build(ModelConfig(arch=arch, num_classes=3, **dropouts)).train()
    out = model(_images(4, 32))
    assert out.shape == (4, 3)  # build_model passes num_classes through
    F.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()

    exempt = _biases_feeding_batchnorm(model)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{arch}: {name} has a non-finite gradient"
        if id(p) in exempt:
            assert p.grad.abs().max() < 1e-4, f"{arch}: {name} feeds BatchNorm yet has a real gradient"
        else:
            assert p.grad.abs().sum() > 0, f"{arch}: {name} got an all-zero gradient"


def test_channels_last_matches_contiguous(model: nn.Module) -> None:
    x = _images(2, 32)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        got = cl_model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_channels_last(model: nn.Module) -> None:
    x = _images(2, 32).to(memory_format=torch.channels_last)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = cl_model(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_default_dropouts(arch: str) -> None:
    """``None`` dropouts in ModelConfig give the architecture's own defaults.

    VGG16 built without weights must also say it trains from scratch (checked here to save a build).
    """
    accepted = arch_args(arch)
    if MODELS[arch] is VGG16:
        with pytest.warns(UserWarning, match="from scratch"):
            model = build_model(ModelConfig(arch=arch))
    else:
        model = build_model(ModelConfig(arch=arch))
    for part, name in (("features", "dropout_features"), ("classifier", "dropout_fc")):
        ps = _dropout_ps(getattr(model, part))
        expected = {accepted[name]} if name in accepted else set()
        assert set(ps) == expected, f"{arch}.{part}: {ps}"


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_sets_dropouts(arch: str) -> None:
    accepted = arch_args(arch)
    values = {"dropout_features": 0.13, "dropout_fc": 0.37}
    model = build(ModelConfig(arch=arch, **{k: v for k, v in values.items() if k in accepted}))
    for part, name in (("features", "dropout_features"), ("classifier", "dropout_fc")):
        ps = _dropout_ps(getattr(model, part))
        if name in accepted:
            assert ps and set(ps) == {values[name]}, f"{arch}.{part}: {ps}"
        else:
            assert ps == [], f"{arch}.{part} has dropout but no {name} argument"


@pytest.mark.parametrize("arch", BLOCK_ARCHS)
def test_build_model_convs_per_block(arch: str) -> None:
    def convs(n: int) -> int:
        model = build(ModelConfig(arch=arch, convs_per_block=n))
        return sum(isinstance(m, nn.Conv2d) for m in model.modules())

    one = convs(1)
    assert one in (3, 4)  # one conv per block: cnn_v1 has 3 blocks, cnn_v2 has 4
    assert convs(2) == 2 * one
    assert convs(3) == 3 * one


def test_unknown_arch_names_it_and_lists_models() -> None:
    with pytest.raises(ValueError, match="resnet9") as info:
        build_model(ModelConfig(arch="resnet9"))
    assert all(name in str(info.value) for name in MODELS)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="vgg16", dropout_features=0.3),
        ModelConfig(arch="deepfakenet", convs_per_block=3),
        ModelConfig(arch="cnn_v1", batch_norm=False),
        ModelConfig(arch="cnn_v2", weights="vgg16.pth"),
    ],
    ids=["vgg16-dropout_features", "deepfakenet-convs", "cnn_v1-batch_norm", "cnn_v2-weights"],
)
def test_settings_the_arch_lacks_are_rejected(cfg: ModelConfig) -> None:
    with pytest.raises(ValueError, match=cfg.arch):
        build_model(cfg)


def test_vgg16_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.vgg16_bn(weights=None)  # the original 1000-class head
    saved = source.state_dict()
    path = tmp_path / "vgg16_bn.pth"
    torch.save(saved, path)
    del source

    model = build_model(ModelConfig(arch="vgg16", weights=str(path)))
    loaded = model.state_dict()
    body = [k for k in saved if not k.startswith("classifier.6.")]
    assert len(body) == len(loaded) - 2  # everything except the head's weight and bias
    for key in body:
        assert torch.equal(loaded[key], saved[key]), key
    assert model.classifier[-1].out_features == 5
    assert model(_images(2, 32)).shape == (2, 5)


def test_vgg16_missing_weights_names_the_file(tmp_path) -> None:
    path = tmp_path / "nowhere" / "vgg16_bn.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        build_model(ModelConfig(arch="vgg16", weights=str(path)))


def test_vgg16_bad_weights_name_the_file(tmp_path) -> None:
    model = MODELS["vgg16"]()
    assert isinstance(model, VGG16)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path in (wrong, garbage):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_pretrained(model, path)


def test_count_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert count_parameters(model) == 3 * 4 + 4 + 4 + 4  # BN buffers are not parameters
    assert count_parameters(MODELS["cnn_v1"]()) > 0
