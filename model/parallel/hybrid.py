"""Krizhevsky 2014, "One weird trick for parallelizing convolutional neural networks": the
convolutions data-parallel, the fully connected layers model-parallel, on any number of ranks.

Forward, rank r of n with its b images of the global batch B = n b:
  convolutions on its own b images (replicated weights)           -> [b, 9216]
  all-gather the rows: every rank's conv output                   -> [B, 9216]
  fc6 with this rank's slice of its output neurons                -> [B, 4096/n]
  all-gather the features (each rank's neurons), fc7 likewise     -> [B, 4096]  -> [B, 4096/n]
  ... fc8 (this rank's classes)                                   -> [B, C/n]
  all-to-all: this rank's rows, every class                       -> [b, C]   (the loss of its images)
Backward is the adjoint of each collective: the all-to-all back; the FC weight gradients need no
communication (each rank holds all B examples for its neurons); the gradient of a gathered input
is reduce-scattered (each rank's neurons add their part for every example, the sum goes to the
rank the example or feature belongs to); the convolutions' weight gradients are all-reduced, each
launched as backward produces it (GradientReducer) so it overlaps the backward of earlier layers,
which is the overlap the paper names for the convolutional part. The paper's scheme (b) also
pipelines the FC layers by sending one worker's batch at a time; this implements its scheme (a)
(all batches at once, the same bytes), which keeps the FC matrix products as large as possible.

The loss of each rank is the mean over its b images, as in DDP; the all-to-all's backward scales by
1/n, so every gradient is that of the global batch's mean loss.
"""
from __future__ import annotations

import torch
from torch import nn

from alexnet_fast.model.parallel.collectives import GradientReducer, Link, Traffic, gather, rows_to_columns
from alexnet_fast.model.parallel.sharded import ShardedNet, trunk


class HybridNet(ShardedNet):
    def __init__(self, full: nn.Module, world: Link, traffic: Traffic) -> None:
        linears = [f"classifier.{i}" for i, m in enumerate(full.classifier) if isinstance(m, nn.Linear)]
        super().__init__(full, {f"{layer}.{kind}": world for layer in linears for kind in ("weight", "bias")},
                         traffic)
        self.world = world
        self.reducer = GradientReducer(self.replicated(), world.named("conv gradients"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, sizes = self.classifier(trunk(self.full, images), self._gather_input)
        return rows_to_columns(x, self.world.named("logits"), sizes, scale=1.0 / self.world.size)

    def _gather_input(self, x: torch.Tensor, index: int, sizes: tuple[int, ...] | None) -> torch.Tensor:
        """fc6: every rank's conv output rows ([b, 9216] -> [B, 9216]); later layers: every rank's
        neurons of the layer before ([B, 4096/n] -> [B, 4096])."""
        if sizes is None:
            return gather(x, 0, self.world.named("fc input rows"))
        return gather(x, 1, self.world.named(f"classifier.{index} input"), sizes)
