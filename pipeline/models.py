"""Plain ``nn.Module`` architectures, a name -> class dict, and ``build_model(cfg)``.

Every network takes 3-channel images of any size and returns ``num_classes`` logits: its max-pools
are ``HalvingMaxPool``s (a 1-px side passes through) and an adaptive pool sizes the head, so 8-px images
(the smallest ``data.image_size``) train too, and the 32-100 px they were designed for compute as before.
Each exposes ``features`` (conv trunk, feature dropout included) and ``classifier`` (the dense head,
its dropout included), so callers and tests can find the two dropout groups by name.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv

from .config import NUM_CLASSES, ModelConfig


def _conv_block(in_channels: int, out_channels: int, convs: int) -> list[nn.Module]:
    """``convs`` x (3x3 conv, BatchNorm, ReLU). No conv bias: BatchNorm's shift replaces it."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return layers


class HalvingMaxPool(nn.MaxPool2d):
    """``MaxPool2d(2)`` that passes a 1-px side through instead of pooling it to 0 px.

    Where both sides are >= 2 px it is ``MaxPool2d(2)`` itself (``super().forward``): at the sizes the
    networks were designed for nothing changes. A network with more pools than its input has halvings
    (cnn_v2's fourth and vgg16's fourth and fifth on 8-px images) passes the 1-px map on to the
    adaptive pool before its head. No parameters, so state_dicts (torchvision's VGG16 files too) are
    unchanged.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h >= 2 and w >= 2:
            return super().forward(x)
        kernel = (min(h, 2), min(w, 2))
        return F.max_pool2d(x, kernel, kernel)


def _head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def _init_weights(model: nn.Module) -> None:
    # Kaiming suits conv -> BN -> ReLU stacks; Linear keeps torch's default init.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CNNv1(nn.Module):
    """Three conv blocks 3 -> 64 -> 96 -> 128, MaxPool(2) after each, then a 512 -> 256 head.

    A conv block is ``convs_per_block`` x (3x3 conv, padding 1, BatchNorm, ReLU). The reference
    solution does not spell the block out, so the count is a constructor argument (default 2).
    Feature dropout is ``Dropout2d`` (whole channels): neighbouring pixels are correlated, so
    dropping single activations regularises little. AdaptiveAvgPool2d(2) makes the head 128*2*2
    wide at any input size.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        dropout_features: float = 0.2,
        dropout_fc: float = 0.4,
        convs_per_block: int = 2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, 64), (64, 96), (96, 128)):
            layers += [*_conv_block(cin, cout, convs_per_block), HalvingMaxPool()]
        self.features = nn.Sequential(*layers, nn.Dropout2d(dropout_features))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = _head(128 * 2 * 2, 256, num_classes, dropout_fc)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class CNNv2(nn.Module):
    """Four conv blocks 3 -> 64 -> 128 -> 256 -> 512, MaxPool(2) after each, then a 512 -> 256 head.

    A conv block is ``convs_per_block`` x (3x3 conv, padding 1, BatchNorm, ReLU). The reference
    solution does not spell the block out, so the count is a constructor argument (default 2).
    Feature dropout is ``Dropout2d`` (see ``CNNv1``); global average pooling makes the head 512
    wide at any input size.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        dropout_features: float = 0.4,
        dropout_fc: float = 0.5,
        convs_per_block: int = 2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, 64), (64, 128), (128, 256), (256, 512)):
            layers += [*_conv_block(cin, cout, convs_per_block), HalvingMaxPool()]
        self.features = nn.Sequential(*layers, nn.Dropout2d(dropout_features))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = _head(512, 256, num_classes, dropout_fc)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class DeepFakeNet(nn.Module):
    """The second reference's DeepFakeNet: three blocks 3 -> 32 -> 64 -> 128 and a 256-wide head.

    Each block is one 3x3 conv, BatchNorm, ReLU, MaxPool(2), Dropout (element-wise, as in the
    reference). The reference trained at 128x128 and flattened the 16x16 map straight into
    Linear(128*16*16, 256); here AdaptiveAvgPool2d(4) first (so any input size works), which makes
    the head Linear(128*4*4 = 2048, 256) and about 7.9M parameters smaller.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        dropout_features: float = 0.25,
        dropout_fc: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, 32), (32, 64), (64, 128)):
            layers += [*_conv_block(cin, cout, 1), HalvingMaxPool(), nn.Dropout(dropout_features)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = _head(128 * 4 * 4, 256, num_classes, dropout_fc)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class VGG16(nn.Module):
    """torchvision's VGG16 (``batch_norm`` selects ``vgg16_bn``) with a ``num_classes`` head.

    Always built with ``weights=None``: nothing is ever downloaded; ``load_pretrained`` reads a local
    torchvision state_dict. The submodules are torchvision's own (``features``, ``avgpool``,
    ``classifier``), so state_dict keys match torchvision files one to one. Both classifier
    dropouts use ``dropout_fc``. At small inputs the 7x7 adaptive pool repeats the last map, so the
    classifier stays 512*7*7 = 25088 wide (about 120M of the 134M parameters). Its five max-pools are
    ``HalvingMaxPool``s, so it also runs below 16 px, where torchvision's own pools a 1-px map to nothing.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        dropout_fc: float = 0.5,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        factory = tv.vgg16_bn if batch_norm else tv.vgg16
        net = factory(weights=None, num_classes=num_classes, dropout=dropout_fc)
        for i, layer in enumerate(net.features):
            if isinstance(layer, nn.MaxPool2d):  # torchvision's are MaxPool2d(2, 2), as HalvingMaxPool is at >= 2 px
                net.features[i] = HalvingMaxPool()
        self.features = net.features
        self.avgpool = net.avgpool
        self.classifier = net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


MODELS: dict[str, type[nn.Module]] = {
    "cnn_v1": CNNv1,
    "cnn_v2": CNNv2,
    "deepfakenet": DeepFakeNet,
    "vgg16": VGG16,
}


def _model_class(arch: str) -> type[nn.Module]:
    try:
        return MODELS[arch]
    except KeyError:
        raise ValueError(f"unknown model arch {arch!r}; known: {', '.join(MODELS)}") from None


def arch_args(arch: str) -> dict[str, object]:
    """The ``ModelConfig`` fields ``arch``'s constructor accepts, with its defaults.

    Lets a search space sample only what an architecture has (no ``dropout_features`` for vgg16).
    """
    params = inspect.signature(_model_class(arch).__init__).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def model_kwargs(cfg: ModelConfig) -> dict[str, object]:
    """The constructor arguments of ``cfg.arch`` from ``cfg``, checked without building anything.

    ``None`` dropouts keep the architecture's default. A field the architecture does not have but
    which is set away from its ``ModelConfig`` default raises ``ValueError`` rather than being
    ignored; ``cfg.weights`` must be an existing file, for vgg16 only.
    """
    cls = _model_class(cfg.arch)
    accepted = arch_args(cfg.arch)
    defaults = ModelConfig()
    kwargs: dict[str, object] = {}
    for name in ("num_classes", "dropout_features", "dropout_fc", "convs_per_block", "batch_norm"):
        value = getattr(cfg, name)
        if name in accepted:
            if value is not None:
                kwargs[name] = value
        elif value != getattr(defaults, name):
            raise ValueError(
                f"model.{name}={value!r} does not apply to arch {cfg.arch!r} "
                f"(it takes {', '.join(accepted)})"
            )
    if cfg.weights is not None and cls is not VGG16:
        raise ValueError(f"model.weights is only supported for vgg16, not arch {cfg.arch!r}")
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        # Checked before building: a 134M-parameter model takes seconds to initialise.
        raise FileNotFoundError(f"VGG16 weights file not found: {cfg.weights}")
    return kwargs


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build ``cfg.arch`` from the ``ModelConfig`` fields its constructor takes (``model_kwargs``);
    ``cfg.weights`` (vgg16 only) is loaded with ``load_pretrained``."""
    model = _model_class(cfg.arch)(**model_kwargs(cfg))
    if isinstance(model, VGG16):
        if cfg.weights is None:
            # warnings.warn shows a given message once per process by default: no state of our own.
            warnings.warn("vgg16: no model.weights given, training from scratch", stacklevel=2)
        else:
            load_pretrained(model, cfg.weights)
    return model


def load_pretrained(model: VGG16, path: str | Path) -> VGG16:
    """Copy a local torchvision VGG16 state_dict into ``model``, in place; returns ``model``.

    The head (last classifier Linear) is loaded only if its shape matches, so the original
    1000-class head is skipped. Any other missing, extra or mis-shaped key raises ``ValueError``
    naming the file: usually a vgg16 / vgg16_bn mix-up (``model.batch_norm``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights file not found: {path}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # unpickling errors vary by file; the message must name the file
        raise ValueError(f"{path}: not a loadable torch state_dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a torchvision VGG16 state_dict (a dict of tensors)")

    head = f"classifier.{len(model.classifier) - 1}."
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith(head))
    unexpected = sorted(k for k in state if k not in own)
    mis_shaped = sorted(
        k for k in state if k in own and state[k].shape != own[k].shape and not k.startswith(head)
    )
    if missing or unexpected or mis_shaped:
        variant = "vgg16_bn" if any(isinstance(m, nn.BatchNorm2d) for m in model.features) else "vgg16"
        raise ValueError(
            f"{path}: does not match a torchvision {variant} state_dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {mis_shaped[:3]}); "
            "check model.batch_norm"
        )
    keep = {k: v for k, v in state.items() if v.shape == own[k].shape}
    model.load_state_dict(keep, strict=False)
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters (trainable or not); buffers such as BatchNorm running stats excluded."""
    return sum(p.numel() for p in model.parameters())
