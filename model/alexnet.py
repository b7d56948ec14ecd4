"""The two AlexNets: the 2012 paper's network and torchvision's "one weird trick" variant.

    model = build_model("alexnet2012", num_classes=1000)   # Krizhevsky, Sutskever, Hinton (2012)
    model = build_model("alexnet-owt", num_classes=1000)   # Krizhevsky (2014), = torchvision.models.alexnet

Both take [B, 3, 227, 227] images and return [B, num_classes] logits.
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class Arch(str, Enum):
    """Network names as the CLI and checkpoints spell them."""

    ALEXNET2012 = "alexnet2012"
    ALEXNET_OWT = "alexnet-owt"


ARCH_NAMES: tuple[str, ...] = tuple(a.value for a in Arch)

# The paper's local response normalization: b = a / (k + alpha * sum_{n neighbours} a^2) ** beta.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


class AlexNet2012(nn.Module):
    """The network of "ImageNet Classification with Deep Convolutional Neural Networks" (NIPS 2012).

    The paper split every layer over two GPUs; here one module holds both columns and the layers
    whose kernels saw only their own GPU's maps (conv2, conv4, conv5) are grouped convolutions with
    groups=2, so the connectivity — and the parameter count, 60,965,224 for 1000 classes — is the
    paper's. conv3 and the FC layers read both columns (groups=1), as in the paper.

    Feature maps for a 227x227 input: conv1 55 -> pool 27 -> conv2 27 -> pool 13 -> conv3/4/5 13
    -> pool 6, so FC6 sees 256*6*6 = 9216 inputs. (The paper's "224" only gives 55 with 227.)
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4),                 # 0 conv1 -> 96x55x55
            nn.ReLU(inplace=True),
            _paper_lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),                      # overlapping pool -> 27
            nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),     # 4 conv2 -> 256x27x27
            nn.ReLU(inplace=True),
            _paper_lrn(),
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: weights ~ N(0, 0.01); bias 1 on conv2, conv4, conv5 and the hidden FC
        layers ("accelerates the early stages of learning by providing the ReLUs with positive
        inputs"), bias 0 on conv1, conv3 and the output layer."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        fcs = [m for m in self.classifier if isinstance(m, nn.Linear)]
        bias_one = {convs[1], convs[3], convs[4], fcs[0], fcs[1]}
        for layer in convs + fcs:
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.constant_(layer.bias, 1.0 if layer in bias_one else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _paper_lrn() -> nn.LocalResponseNorm:
    # torch computes b = a / (k + alpha/n * sum a^2)^beta (it averages over the window), while the
    # paper's formula has alpha * sum. Passing alpha*n makes torch's alpha/n equal the paper's 1e-4.
    # (In the paper the window stays inside one GPU's maps; here it may cross the column boundary
    # at channels 47/48 and 127/128 — two channels of 96/256, left as is for one fused kernel.)
    return nn.LocalResponseNorm(size=LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)


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


INIT_NAMES = ("default", "kaiming")


def build_model(arch: str, num_classes: int = 1000, dropout: float = 0.5, init: str = "default") -> nn.Module:
    """The network named `arch` ("alexnet2012" or "alexnet-owt") with `num_classes` outputs.

    init="default" keeps each network's own init (the paper's for alexnet2012, torch's for
    alexnet-owt as torchvision ships it); "kaiming" is `kaiming_init_` (for short runs)."""
    if init not in INIT_NAMES:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INIT_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    try:
        arch = Arch(arch)
    except ValueError:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_NAMES)}") from None
    model = AlexNet2012(num_classes, dropout) if arch is Arch.ALEXNET2012 else AlexNetOWT(num_classes, dropout)
    if init == "kaiming":
        kaiming_init_(model)
    return model


def kaiming_init_(model: nn.Module) -> nn.Module:
    """He-normal weights (fan-in, ReLU gain), zero biases, and a zero output layer.

    Why: the paper's N(0, 0.01) + bias-1 init was tuned for mean-subtracted 0..255 pixels; on the
    unit-variance inputs the pipeline feeds, the bias-1 layers drown the image signal, and torch's
    default init fades behind LRN, so both sit at loss = log(classes) for many steps. He init keeps
    the signal's scale through the ReLUs; a zero output layer starts at exactly log(classes) without
    the large first-step gradients that otherwise blow up momentum SGD."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    nn.init.zeros_(layers[-1].weight)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
