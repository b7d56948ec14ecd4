"""Krizhevsky, Sutskever, Hinton 2012, section 3.2 and Figure 2: the network as two columns, one
per GPU, exchanging activations only where the paper's layers read both columns.

Each rank of a pair holds one column: half of every layer's kernels or neurons (dim 0 of each
weight). The single-device AlexNet2012 says where the columns connect: a convolution with groups=2
reads its own column's maps (conv2, conv4, conv5: no exchange); conv1 reads the image (both ranks
get the same batch); conv3 (groups=1) and every FC layer read both columns, so the pair all-gathers
their input first. The last layer's outputs are gathered too: both ranks then hold the logits of
the replica's batch and compute the same loss (so that gather's backward takes each rank's own
slice: no traffic).

One exchange the paper's network did not have: the single-device net's local response
normalization runs over 5 neighbouring maps across the column boundary (model/alexnet.py says so),
so each LRN first swaps the 2 boundary maps with the other column (a halo) to equal it exactly.

More than 2 ranks: 2 x N, N replicas of the pair, each on its share of the global batch; rank
2k + c is column c of replica k. Column c's gradients are all-reduced over the N ranks holding
column c, launched as backward produces them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from alexnet_fast.model.parallel.collectives import Backward, GradientReducer, Link, Traffic, gather
from alexnet_fast.model.parallel.sharded import ShardedNet

COLUMNS = 2


def check_columns(full: nn.Module) -> None:
    """ValueError unless `full` is a two-column network (AlexNet2012's layout)."""
    convs = [m for m in full.features if isinstance(m, nn.Conv2d)]
    if not any(m.groups == COLUMNS for m in convs) or any(m.groups not in (1, COLUMNS) for m in convs):
        raise ValueError(f"{type(full).__name__} has no two columns (no convolution with groups=2)")


class ColumnsNet(ShardedNet):
    def __init__(self, full: nn.Module, pair: Link, across: Link, traffic: Traffic) -> None:
        check_columns(full)
        super().__init__(full, {name: pair for name, _ in full.named_parameters()}, traffic)
        self.pair, self.replicas = pair, across.size
        self.reducer = GradientReducer(list(self.parameters()), across.named("column gradients"))
        self._same_images_checked = False

    def _check_same_images(self, images: torch.Tensor) -> None:
        """Both columns of a replica must see the same batch (each reads it from its own loader, which
        the same seed and share make identical): compared once, on the first batch, by its sum."""
        total = images.detach().double().sum().reshape(1)
        both = [torch.empty_like(total) for _ in range(COLUMNS)]
        dist.all_gather(both, total, group=self.pair.group)      # not counted: once per run, 8 bytes
        if not torch.equal(both[0], both[1]):
            raise RuntimeError("--parallel columns: the two columns of a replica were given different images")
        self._same_images_checked = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self._same_images_checked:
            self._check_same_images(images)
        x, last_conv = images, None
        for i, module in enumerate(self.full.features):
            if isinstance(module, nn.Conv2d):
                if module.groups == 1 and last_conv is not None:      # conv3: every map of both columns
                    x = gather(x, 1, self.pair.named(f"features.{i} input"))
                x = F.conv2d(x, self.param(f"features.{i}.weight"), self.param(f"features.{i}.bias"),
                             module.stride, module.padding, module.dilation)
                last_conv = i
            elif isinstance(module, nn.LocalResponseNorm):
                x = self._lrn(x, module, i)
            elif isinstance(module, nn.ReLU):
                x = F.relu(x)
            else:
                x = module(x)                                # pooling
        x = torch.flatten(x, 1)
        maps = self.sizes(f"features.{last_conv}.weight")          # the last convolution's maps per column
        sizes = tuple(m * x.shape[1] // maps[self.pair.rank] for m in maps)
        x, sizes = self.classifier(x, self._gather_input, sizes)
        # both ranks compute the same loss from the same logits: each one's gradient is its own slice
        return gather(x, 1, self.pair.named("logits"), sizes, backward=Backward.OWN, scale=1.0 / self.replicas)

    def _gather_input(self, x: torch.Tensor, index: int, sizes: tuple[int, ...]) -> torch.Tensor:
        """An FC layer reads both columns' neurons of the layer before."""
        return gather(x, 1, self.pair.named(f"classifier.{index} input"), sizes)

    def _lrn(self, x: torch.Tensor, lrn: nn.LocalResponseNorm, index: int) -> torch.Tensor:
        """LRN over this column's maps plus the other column's `size // 2` maps next to them."""
        width = lrn.size // 2
        edge = x[:, -width:] if self.pair.rank == 0 else x[:, :width]
        halos = gather(edge, 1, self.pair.named(f"features.{index} LRN halo"))   # [col 0's last, col 1's first]
        if self.pair.rank == 0:
            return lrn(torch.cat([x, halos[:, width:]], 1))[:, :x.shape[1]]
        return lrn(torch.cat([halos[:, :width], x], 1))[:, width:]
