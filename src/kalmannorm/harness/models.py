"""Image classifiers that take ``norm_layer=``, for checking BKN on real data.

Two families, both built by :func:`build_model` from an architecture name:

* ``preact_resnet{D}`` -- the pre-activation CIFAR ResNet of the released BKN code (Wang et al.,
  "Batch Kalman Normalization", arXiv 1802.03133; ``docs/method.md`` section 6): conv0 with 16
  channels followed by norm + ReLU, three stages of ``n = (D - 2) / 6`` basic blocks at widths
  16/32/64, stride-2 stage entries, the parameter-free shortcut (2x2 average pool + zero channel
  padding, the input's channels in the middle as the released ``tf.pad`` puts them), a final norm
  + ReLU, global average pooling and a linear layer. Any ``D = 6n + 2`` works (20, 32, 56, 110).
* ``resnet{18,34,50,101,152}`` -- the standard (post-activation) ResNet of He et al. with the
  ImageNet stem (7x7 stride-2 conv, 3x3 max pool) and 1x1 conv + norm projection shortcuts, for
  users' own data. ``stem="cifar"`` swaps in a 3x3 stride-1 stem without pooling for small images.

Every normalization is created by the ``norm_layer(num_channels)`` callable, never hard-coded.
Convolutions use He initialization with ``mode="fan_out"`` (as the released code).
"""
from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_WIDTH",
    "ChannelPadShortcut",
    "PreActBlock",
    "PreActResNet",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "InvertedResidual",
    "MobileNetV2",
    "build_model",
    "list_architectures",
]

NormLayer = Callable[[int], nn.Module]

# Base width (channels of the first stage) when ``width`` is not given, per family.
DEFAULT_WIDTH = {"preact_resnet": 16, "resnet": 64}

# ImageNet ResNets: blocks per stage (He et al. 2016, table 1).
_RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_PREACT_DEPTHS = (20, 32, 44, 56, 110)  # named in help; any 6n + 2 is accepted
ARCHITECTURES = tuple(f"preact_resnet{d}" for d in _PREACT_DEPTHS) + tuple(
    f"resnet{d}" for d in _RESNET_LAYOUTS
) + ("mobilenet_v2", "mobilenet_v2_w050")


def list_architectures() -> List[str]:
    """Names accepted by :func:`build_model` (``preact_resnet{6n+2}`` for any ``n >= 1``)."""
    return list(ARCHITECTURES)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def _he_init(model: nn.Module) -> None:
    # Released code: variance_scaling(scale=2, mode="fan_out") on convolutions. Norm layers keep
    # their own reset (weight 1, bias 0); linear layers keep PyTorch's default.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ChannelPadShortcut(nn.Module):
    """Parameter-free shortcut: 2x2 average pool (if ``stride == 2``) and zero channel padding.

    The input's ``in_channels`` channels land in the middle of the ``out_channels`` output
    channels, with ``(out - in) // 2`` zero channels before them and the rest after, as the
    released code's ``tf.pad(l, [[0, 0], [in // 2, in // 2], [0, 0], [0, 0]])``.

    Shape:
        ``[N, in_channels, H, W] -> [N, out_channels, H / stride, W / stride]``
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"ChannelPadShortcut cannot shrink channels (got {in_channels} -> {out_channels})"
            )
        if stride not in (1, 2):
            raise ValueError(f"ChannelPadShortcut supports stride 1 or 2 (got {stride})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 2:
            x = F.avg_pool2d(x, 2)
        extra = self.out_channels - self.in_channels
        if extra:
            before = extra // 2
            x = F.pad(x, (0, 0, 0, 0, before, extra - before))  # pads dim 1 (channels)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``x + conv(relu(norm(conv(relu(norm(x))))))``.

    ``preactivate=False`` skips the first norm + ReLU (the released code's ``first=True`` block,
    whose input already went through conv0's norm + ReLU).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer,
        *, preactivate: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(in_channels) if preactivate else None
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.norm2 = norm_layer(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = (
            ChannelPadShortcut(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.norm1 is None else self.relu(self.norm1(x))
        out = self.conv1(out)
        out = self.conv2(self.relu(self.norm2(out)))
        return out + self.shortcut(x)


class PreActResNet(nn.Module):
    """Pre-activation CIFAR ResNet of the released BKN code (``docs/method.md`` section 6).

    Args:
        depth: ``6n + 2`` (20, 32, 56, 110, ...).
        num_classes: output logits.
        norm_layer: ``norm_layer(num_channels) -> nn.Module``. Default: ``nn.BatchNorm2d``.
        in_channels: image channels. Default: 3.
        width: channels of conv0 and the first stage (the stages are ``w, 2w, 4w``). Default: 16.

    Shape:
        ``[N, in_channels, H, W] -> [N, num_classes]`` (``H, W`` divisible by 4).

    >>> PreActResNet(20, 10)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self, depth: int, num_classes: int, norm_layer: Optional[NormLayer] = None,
        in_channels: int = 3, *, width: int = 16,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"pre-activation ResNet depth must be 6n + 2 with n >= 1 (got {depth})")
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        n = (depth - 2) // 6
        self.depth, self.width = depth, width
        self.conv0 = _conv3x3(in_channels, width)
        self.norm0 = norm_layer(width)
        self.relu = nn.ReLU(inplace=False)
        blocks: List[nn.Module] = []
        channels = width
        for stage in range(3):
            out_channels = width * 2**stage
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(
                    PreActBlock(channels, out_channels, stride, norm_layer,
                                preactivate=not (stage == 0 and i == 0))
                )
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.norm_last = norm_layer(channels)
        self.fc = nn.Linear(channels, num_classes)
        _he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.norm0(self.conv0(x)))
        x = self.blocks(x)
        x = self.relu(self.norm_last(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    """Post-activation basic block of ResNet-18/34: ``relu(x' + norm(conv(relu(norm(conv(x))))))``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.norm1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, out_channels)
        self.norm2 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = _projection(in_channels, out_channels, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        return self.norm2


class Bottleneck(nn.Module):
    """Post-activation bottleneck of ResNet-50/101/152 (stride on the 3x3 conv, "ResNet v1.5")."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv1x1(in_channels, planes)
        self.norm1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.norm2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, out_channels)
        self.norm3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = _projection(in_channels, out_channels, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        return self.norm3


def _projection(in_ch: int, out_ch: int, stride: int, norm_layer: NormLayer) -> Optional[nn.Module]:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))


class ResNet(nn.Module):
    """Standard ResNet (He et al. 2016) with ``norm_layer=``, for users' own data.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: output logits.
        norm_layer: ``norm_layer(num_channels) -> nn.Module``. Default: ``nn.BatchNorm2d``.
        in_channels: image channels. Default: 3.
        width: channels of the stem and the first stage. Default: 64.
        stem: ``"imagenet"`` (7x7 stride-2 conv + 3x3 stride-2 max pool) or ``"cifar"``
            (3x3 stride-1 conv, no pooling, for images of about 32x32 or smaller).
        zero_init_residual: zero the weight of each block's last norm layer (if it has one), so
            every block starts as the identity. Default: ``False``.

    Shape:
        ``[N, in_channels, H, W] -> [N, num_classes]``

    >>> ResNet(BasicBlock, (2, 2, 2, 2), 10)(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], num_classes: int,
        norm_layer: Optional[NormLayer] = None, in_channels: int = 3, *, width: int = 64,
        stem: str = "imagenet", zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                norm_layer(width), nn.ReLU(inplace=False), nn.MaxPool2d(3, stride=2, padding=1),
            )
        elif stem == "cifar":
            self.stem = nn.Sequential(_conv3x3(in_channels, width), norm_layer(width), nn.ReLU(inplace=False))
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")
        stages: List[nn.Module] = []
        channels = width
        for i, count in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(channels, planes, stride, norm_layer))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)
        _he_init(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    weight = getattr(m.last_norm(), "weight", None)
                    if isinstance(weight, nn.Parameter):
                        nn.init.zeros_(weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _make_divisible(value: float, divisor: int = 8) -> int:
    # torchvision's rounding of channel counts (never more than 10% below the value)
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection, each conv
    followed by a norm (ReLU6 after the first two); a residual sum when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int,
                 norm_layer: NormLayer) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), norm_layer(hidden),
                       nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   norm_layer(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), norm_layer(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with ``norm_layer=``: torchvision's layout, channel
    rounding and initialisation (the same parameter shapes as
    ``torchvision.models.mobilenet_v2(width_mult=...)``, tested), without torchvision.

    Inverted residuals with depthwise convolutions and linear bottlenecks: the family where
    priors propagated through depthwise convs are hardest (docs/results/prior/). On 32x32 inputs
    the last maps are 1x1, as with torchvision's model: statistics over groups of 2 rows then
    have 2 values per channel, and every batch-statistics norm at m=2 diverged there in the
    study's screening. ``stem_stride=1`` (the first convolution keeps the resolution, as CIFAR
    adaptations of the model do) ends in 2x2 maps for 4x the compute.

    Args:
        num_classes: output logits.
        norm_layer: ``norm_layer(num_channels) -> nn.Module``. Default: ``nn.BatchNorm2d``.
        in_channels: image channels. Default: 3.
        width_mult: channel multiplier. Default: 1.0.
        dropout: before the classifier. Default: 0.2.
        stem_stride: stride of the first convolution, 2 (torchvision) or 1. Default: 2.
    """

    # expansion t, channels c, blocks n, first stride s
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int, norm_layer: Optional[NormLayer] = None,
                 in_channels: int = 3, *, width_mult: float = 1.0, dropout: float = 0.2,
                 stem_stride: int = 2) -> None:
        super().__init__()
        if stem_stride not in (1, 2) or isinstance(stem_stride, bool):
            raise ValueError(f"stem_stride must be 1 or 2 (got {stem_stride!r})")
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        channels = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: List[nn.Module] = [nn.Conv2d(in_channels, channels, 3, stem_stride, 1, bias=False),
                                   norm_layer(channels), nn.ReLU6()]
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t, norm_layer))
                channels = out
        layers += [nn.Conv2d(channels, last, 1, bias=False), norm_layer(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


_ARCH_RE = re.compile(r"^(preact_resnet|resnet)(\d+)$")
_MOBILENET_RE = re.compile(r"^mobilenet_v2(?:_w(\d{3}))?$")


def build_model(
    arch: str, num_classes: int, norm_layer: Optional[NormLayer] = None, in_channels: int = 3,
    *, width: Optional[int] = None, **options,
) -> nn.Module:
    """Build a classifier by name; every normalization comes from ``norm_layer``.

    Args:
        arch: ``"preact_resnet{6n+2}"`` (``preact_resnet20``, ``32``, ``56``, ``110``, ...),
            ``"resnet{18,34,50,101,152}"``, or ``"mobilenet_v2"`` (:class:`MobileNetV2`;
            ``mobilenet_v2_w050`` is width multiplier 0.5).
        num_classes: output logits.
        norm_layer: ``norm_layer(num_channels) -> nn.Module`` (see ``kalmannorm.get_norm_layer``);
            a registry name is resolved with ``kalmannorm.get_norm_layer``. Default: BatchNorm2d.
        in_channels: image channels. Default: 3.
        width: base width (default 16 for ``preact_resnet*``, 64 for ``resnet*``).
        **options: ``stem`` and ``zero_init_residual`` for ``resnet*``, ``width_mult``,
            ``dropout`` and ``stem_stride`` for ``mobilenet_v2``; an option the architecture
            does not take raises ``ValueError``.

    A ``norm_layer`` that declares ``conv_weights`` (``"standardize"``: registry name
    ``groupnorm_ws``; ``"center"``: ``mabn``) gets every convolution of the model reparametrized
    by ``kalmannorm.standardize_conv_weights(model, conv_weights)``.

    >>> import kalmannorm
    >>> model = build_model("preact_resnet32", 10, kalmannorm.get_norm_layer("groupnorm", num_groups=4))
    """
    mobile = _MOBILENET_RE.match(arch) if isinstance(arch, str) else None
    if mobile:
        if width is not None:
            raise ValueError(f"{arch} takes width_mult (or the _w050 suffix), not width")
        if isinstance(norm_layer, str):
            from kalmannorm import get_norm_layer

            norm_layer = get_norm_layer(norm_layer)
        unknown = set(options) - {"width_mult", "dropout", "stem_stride"}
        if unknown or (mobile.group(1) and "width_mult" in options):
            raise ValueError(f"{arch} takes only width_mult (unless named by the suffix), "
                             f"dropout and stem_stride (got {sorted(options)})")
        if mobile.group(1):
            options["width_mult"] = int(mobile.group(1)) / 100
        model = MobileNetV2(num_classes, norm_layer, in_channels, **options)
        return _with_conv_weights(model, norm_layer)
    match = _ARCH_RE.match(arch) if isinstance(arch, str) else None
    depth = int(match.group(2)) if match else -1
    valid = (
        match is not None
        and (depth in _RESNET_LAYOUTS if match.group(1) == "resnet" else depth >= 8 and (depth - 2) % 6 == 0)
    )
    if not valid:
        raise ValueError(
            f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)} "
            "(preact_resnet accepts any depth 6n + 2)"
        )
    if isinstance(norm_layer, str):
        from kalmannorm import get_norm_layer  # lazy: the registry imports the norm modules

        norm_layer = get_norm_layer(norm_layer)
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be positive (got {num_classes}, {in_channels})")
    if match.group(1) == "preact_resnet":
        if options:
            raise ValueError(f"{arch} takes no options {sorted(options)} (only width)")
        model = PreActResNet(depth, num_classes, norm_layer, in_channels,
                             width=width or DEFAULT_WIDTH["preact_resnet"])
    else:
        allowed = {"stem", "zero_init_residual"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"{arch} got unknown options {sorted(unknown)}; allowed: {sorted(allowed)}")
        kind, layers = _RESNET_LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        model = ResNet(block, layers, num_classes, norm_layer, in_channels,
                       width=width or DEFAULT_WIDTH["resnet"], **options)
    return _with_conv_weights(model, norm_layer)


def _with_conv_weights(model: nn.Module, norm_layer: Optional[NormLayer]) -> nn.Module:
    """``model`` with its convolutions reparametrized as ``norm_layer`` declares (its
    ``conv_weights``: weight standardization for GN+WS, centring for MABN)."""
    conv_weights = getattr(norm_layer, "conv_weights", None)
    if conv_weights is not None:
        from kalmannorm import standardize_conv_weights

        standardize_conv_weights(model, conv_weights)
    return model
