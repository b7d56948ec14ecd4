"""FLOPs of the network, counted from its layer shapes: what one image costs in a forward pass and
in a training step. The profiler turns a measured img/s into TFLOP/s with these (tools/profile_stages.py),
and the scaling model's compute side rests on them (docs/scaling.md).

    layer_flops("alexnet-owt", 1000)             # [("features.0", 140_553_600), ...] forward, per image
    train_flops_per_image("alexnet-owt", 1000)   # ~4.15e9

Why not torch.utils.flop_counter: it counts the backward pass of a grouped convolution as three
forwards instead of two (torch 2.13), so alexnet2012's grouped conv2/4/5 would give 4.96 instead of
4.14 GFLOP per image. Where it is right (no groups, alexnet-owt) the two counts agree exactly
(tests/test_profile.py checks it).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from alexnet_fast.model.alexnet import build_model

CROP = 227   # the network's input size (the loaders' crop)


def layer_flops(arch: str, num_classes: int, crop: int = CROP) -> list[tuple[str, int]]:
    """Forward FLOPs (multiply-add = 2) per image of each conv and linear layer, in forward order,
    from the layer shapes (a meta-device forward pass: nothing is computed). Pooling, ReLU, LRN and
    bias adds are left out: well under 1% of the total."""
    model = build_model(arch, num_classes).to("meta")
    counted: list[tuple[str, int]] = []

    def count(name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kernel = module.kernel_size[0] * module.kernel_size[1]
                counted.append((name, 2 * output[0].numel() * module.in_channels // module.groups * kernel))
            else:
                counted.append((name, 2 * output[0].numel() * module.in_features))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(count(name))
    model(torch.empty(1, 3, crop, crop, device="meta"))
    return counted


@lru_cache(maxsize=None)
def train_flops_per_image(arch: str, num_classes: int, crop: int = CROP) -> float:
    """FLOPs of one training step per image: the forward pass, plus a backward pass that costs two
    forwards per layer (gradients of the inputs and of the weights), less the first layer's input
    gradient (the images need none). Counted by hand, not with torch's flop counter (see above)."""
    layers = layer_flops(arch, num_classes, crop)
    forward = sum(f for _, f in layers)
    return float(3 * forward - layers[0][1])
