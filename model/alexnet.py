"""The AlexNets: the 2012 paper's network, BVLC Caffe's replication of it, and torchvision's
"one weird trick" variant; and the named weight inits the published recipes use.

    model = build_model("alexnet2012", num_classes=1000)   # Krizhevsky, Sutskever, Hinton (2012)
    model = build_model("alexnet-bvlc", num_classes=1000)  # BVLC Caffe models/bvlc_alexnet
    model = build_model("alexnet-owt", num_classes=1000)   # Krizhevsky (2014), = torchvision.models.alexnet
    model = build_model("alexnet2012", 1000, init="bvlc")  # any init on any of them

All take [B, 3, 227, 227] images and return [B, num_classes] logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from torch import nn


class Arch(str, Enum):
    """Network names as the CLI and checkpoints spell them."""

    ALEXNET2012 = "alexnet2012"
    ALEXNET_OWT = "alexnet-owt"
    ALEXNET_BVLC = "alexnet-bvlc"


ARCH_NAMES: tuple[str, ...] = tuple(a.value for a in Arch)


@dataclass(frozen=True)
class LRNConstants:
    """Local response normalization across channels: b = a / (k + alpha' * S) ** beta, S the sum of
    a^2 over `size` neighbouring maps. `alpha_over_size` says what alpha' is: the paper writes
    alpha * S (alpha' = alpha); Caffe computes alpha / size * S (src/caffe/layers/lrn_layer.cpp,
    `alpha_over_size`), so the same "alpha: 0.0001" in a prototxt is 5x weaker than in the paper."""
    size: int
    alpha: float
    beta: float
    k: float
    alpha_over_size: bool

    def module(self) -> nn.LocalResponseNorm:
        # torch computes alpha/size * S, as Caffe does: the paper's alpha is passed as alpha*size.
        alpha = self.alpha if self.alpha_over_size else self.alpha * self.size
        return nn.LocalResponseNorm(size=self.size, alpha=alpha, beta=self.beta, k=self.k)


# The paper, section 3.3: k=2, n=5, alpha=1e-4, beta=0.75, b = a / (k + alpha * sum a^2)^beta.
PAPER_LRN = LRNConstants(size=5, alpha=1e-4, beta=0.75, k=2.0, alpha_over_size=False)
# BVLC models/bvlc_alexnet/train_val.prototxt lines 79-81 and 135-137: local_size 5, alpha 0.0001,
# beta 0.75, no k, so Caffe's default k = 1 (src/caffe/proto/caffe.proto, LRNParameter).
CAFFE_LRN = LRNConstants(size=5, alpha=1e-4, beta=0.75, k=1.0, alpha_over_size=True)


class AlexNet2012(nn.Module):
    """The network of "ImageNet Classification with Deep Convolutional Neural Networks" (NIPS 2012).

    The paper split every layer over two GPUs; here one module holds both columns and the layers
    whose kernels saw only their own GPU's maps (conv2, conv4, conv5) are grouped convolutions with
    groups=2, so the connectivity — and the parameter count, 60,965,224 for 1000 classes — is the
    paper's. conv3 and the FC layers read both columns (groups=1), as in the paper.

    Feature maps for a 227x227 input: conv1 55 -> pool 27 -> conv2 27 -> pool 13 -> conv3/4/5 13
    -> pool 6, so FC6 sees 256*6*6 = 9216 inputs. (The paper's "224" only gives 55 with 227.)
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, lrn: LRNConstants = PAPER_LRN) -> None:
        super().__init__()
        # (In the paper the LRN window stays inside one GPU's maps; here it may cross the column
        # boundary at channels 47/48 and 127/128 — two channels of 96/256, left as is for one kernel.)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4),                 # 0 conv1 -> 96x55x55
            nn.ReLU(inplace=True),
            lrn.module(),
            nn.MaxPool2d(kernel_size=3, stride=2),                      # overlapping pool -> 27
            nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),     # 4 conv2 -> 256x27x27
            nn.ReLU(inplace=True),
            lrn.module(),
            nn.MaxPool2d(kernel_size=3, stride=2),                      # -> 13
            nn.Conv2d(256, 384, kernel_size=3, padding=1),              # 8 conv3 -> 384x13x13
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2),    # 10 conv4 -> 384x13x13
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2),    # 12 conv5 -> 256x13x13
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),                      # -> 6
        )
        # The paper applies dropout to the outputs of the two hidden FC layers.
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096),                               # 0 fc6
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),                                      # 3 fc7
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),                               # 6 fc8
        )
        paper_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class AlexNetBVLC(AlexNet2012):
    """BVLC Caffe's `bvlc_alexnet` (models/bvlc_alexnet/train_val.prototxt). Layer for layer the
    paper's network — the same order (conv, relu, norm, pool: norm1 before pool1 and norm2 before
    pool2, unlike CaffeNet), kernels, strides, pads, group 2 on conv2/4/5, dropout 0.5 after fc6 and
    fc7, so the same 60,965,224 parameters — but Caffe's LRN: alpha divided by the window size and
    k = 1 (`CAFFE_LRN`). Caffe rounds pooled sizes up where torch rounds down; at 227 px every pool
    divides exactly (55 -> 27 -> 13 -> 6 either way), so that makes no difference here. Its init is
    `bvlc_init_`."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__(num_classes, dropout, lrn=CAFFE_LRN)
        bvlc_init_(self)


class AlexNetOWT(nn.Module):
    """torchvision.models.alexnet, layer for layer ("One weird trick for parallelizing CNNs", 2014):
    64-192-384-256-256 convolutions, no LRN, no groups, an adaptive 6x6 average pool, dropout before
    FC6/FC7. Module indices match torchvision's, so the state_dict keys and shapes are identical
    (61,100,840 parameters for 1000 classes) and weights load either way. Init is torch's default,
    as torchvision leaves it."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),      # features.0
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),               # features.3
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),              # features.6
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),              # features.8
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),              # features.10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),                               # classifier.1
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),                                      # classifier.4
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),                               # classifier.6
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# weight inits: each a function of the layer positions every AlexNet shares (5 convs, 3 FC layers)
# --------------------------------------------------------------------------------------------
def _layers(model: nn.Module) -> tuple[list[nn.Conv2d], list[nn.Linear]]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(convs) != 5 or len(fcs) != 3:
        raise ValueError(f"an AlexNet has 5 convolutions and 3 FC layers, this model {len(convs)} and {len(fcs)}")
    return convs, fcs


def _gaussian_init_(model: nn.Module, hidden_fc_std: float, bias: float) -> nn.Module:
    """Weights N(0, 0.01) (the hidden FC layers N(0, hidden_fc_std)); `bias` on conv2, conv4, conv5
    and the hidden FC layers, 0 on conv1, conv3 and the output layer."""
    convs, fcs = _layers(model)
    with_bias = {convs[1], convs[3], convs[4], fcs[0], fcs[1]}
    for layer in convs + fcs:
        std = hidden_fc_std if layer in (fcs[0], fcs[1]) else 0.01
        nn.init.normal_(layer.weight, mean=0.0, std=std)
        nn.init.constant_(layer.bias, bias if layer in with_bias else 0.0)
    return model


def paper_init_(model: nn.Module) -> nn.Module:
    """The paper's init (section 5): weights ~ N(0, 0.01); bias 1 on conv2, conv4, conv5 and the
    hidden FC layers ("accelerates the early stages of learning by providing the ReLUs with positive
    inputs"), bias 0 on conv1, conv3 and the output layer. Tuned for the centred raw RGB input
    (0..255 scale); on the demo sample it sits at loss log(C) for a while (docs/recipes.md)."""
    return _gaussian_init_(model, hidden_fc_std=0.01, bias=1.0)


def bvlc_init_(model: nn.Module) -> nn.Module:
    """BVLC Caffe's init (models/bvlc_alexnet/train_val.prototxt weight_filler/bias_filler):
    gaussian std 0.01, but 0.005 for fc6 and fc7 (lines 280, 320); the paper's non-zero biases are
    0.1 instead of 1 (lines 119, 208, 242, 284, 324; readme: "initialization to 1 gave flat loss")."""
    return _gaussian_init_(model, hidden_fc_std=0.005, bias=0.1)


def torch_init_(model: nn.Module) -> nn.Module:
    """torch's own layer init, what torchvision's alexnet ships with (it sets none): each layer's
    reset_parameters, weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_ with
    a=sqrt(5)); fan_in = in_channels/groups * kernel area."""
    convs, fcs = _layers(model)
    for layer in convs + fcs:
        layer.reset_parameters()
    return model


def kaiming_init_(model: nn.Module) -> nn.Module:
    """He-normal weights (fan-in, ReLU gain), zero biases, and a zero output layer.

    Why: the paper's N(0, 0.01) + bias-1 init was tuned for mean-subtracted 0..255 pixels; on the
    unit-variance inputs the pipeline feeds, the bias-1 layers drown the image signal, and torch's
    default init fades behind LRN, so both sit at loss = log(classes) for many steps. He init keeps
    the signal's scale through the ReLUs; a zero output layer starts at exactly log(classes) without
    the large first-step gradients that otherwise blow up momentum SGD."""
    convs, fcs = _layers(model)
    for layer in convs + fcs:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    nn.init.zeros_(fcs[-1].weight)
    return model


class Init(str, Enum):
    """Init names as the CLI and checkpoints spell them. DEFAULT ("default", what checkpoints from
    before the named inits hold) is the network's own: `ARCH_INIT`."""

    PAPER = "paper"
    BVLC = "bvlc"
    TORCH = "torch"
    KAIMING = "kaiming"
    DEFAULT = "default"


INIT_NAMES: tuple[str, ...] = tuple(i.value for i in Init)
INIT_FUNCTIONS: dict[Init, Callable[[nn.Module], nn.Module]] = {
    Init.PAPER: paper_init_, Init.BVLC: bvlc_init_, Init.TORCH: torch_init_, Init.KAIMING: kaiming_init_,
}
# Each network's own init, which its constructor draws and init="default" keeps.
ARCH_INIT: dict[Arch, Init] = {Arch.ALEXNET2012: Init.PAPER, Arch.ALEXNET_BVLC: Init.BVLC, Arch.ALEXNET_OWT: Init.TORCH}
# Inits tuned for the centred raw RGB input (0..255 scale) rather than unit variance.
RAW_SCALE_INITS = frozenset({Init.PAPER, Init.BVLC})


def resolve_init(arch: str, init: str) -> Init:
    """The init `init` names on network `arch`: "default" is the network's own."""
    chosen = Init(init)
    return ARCH_INIT[Arch(arch)] if chosen is Init.DEFAULT else chosen


def build_model(arch: str, num_classes: int = 1000, dropout: float = 0.5, init: str = "default") -> nn.Module:
    """The network named `arch` (ARCH_NAMES) with `num_classes` outputs and weights per `init`
    (INIT_NAMES): "default" keeps the network's own (paper / bvlc / torch), any other name re-draws
    them with that init."""
    if init not in INIT_NAMES:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INIT_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    try:
        arch = Arch(arch)
    except ValueError:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_NAMES)}") from None
    network = {Arch.ALEXNET2012: AlexNet2012, Arch.ALEXNET_BVLC: AlexNetBVLC, Arch.ALEXNET_OWT: AlexNetOWT}[arch]
    model = network(num_classes, dropout)
    chosen = resolve_init(arch, init)
    if chosen is not ARCH_INIT[arch]:       # the constructor drew the network's own already
        INIT_FUNCTIONS[chosen](model)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
