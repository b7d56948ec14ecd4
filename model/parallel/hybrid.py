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
which is the overlap the paper names for the convolutional part.

The paper offers the FC layers' input two ways, and both are here:
  --parallel hybrid            its scheme (a): every rank's conv output gathered at once, the FC
                               layers run on all B rows (the largest matrix products; the exchange
                               on the critical path)
  --parallel hybrid-pipelined  its scheme (b): one rank's b rows at a time (RowExchange): all n
                               broadcasts start at once, the FC layers run on rank s's rows while
                               rank s+1's are in flight; backward reduces each share's input
                               gradient to its rank while the FC backward of the other shares goes
                               on. The same bytes as (a) (n broadcasts and n reduces move what one
                               all-gather and one reduce-scatter move), the exchange off the
                               critical path except for the first share's, at the price of n FC
                               products of b rows instead of one of B: n passes over the FC weights
                               and n weight gradients summed (slower than (a) on CPU ranks:
                               benchmarks/RESULTS.md).
Unlike the paper's (b), the forward of every share precedes the backward of any (the loss is the
training loop's, on the whole batch), and the FC weight gradients of the n shares are summed into
one update: the step equals one device's, as under (a).

The loss of each rank is the mean over its b images, as in DDP; the all-to-all's backward scales by
1/n, so every gradient is that of the global batch's mean loss.
"""
from __future__ import annotations

import torch
from torch import nn

from alexnet_fast.model.parallel.collectives import GradientReducer, Link, RowExchange, Traffic, gather, rows_to_columns
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
            return self._fc_input(x)
        return gather(x, 1, self.world.named(f"classifier.{index} input"), sizes)

    def _fc_input(self, x: torch.Tensor) -> torch.Tensor:
        return gather(x, 0, self.world.named("fc input rows"))


class PipelinedHybridNet(HybridNet):
    """Scheme (b): the FC layers on one rank's rows at a time, the next rank's rows in flight.
    `rows`: a link of the same ranks on a process group of its own (RowExchange says why)."""

    def __init__(self, full: nn.Module, world: Link, rows: Link, traffic: Traffic) -> None:
        super().__init__(full, world, traffic)
        self.rows = rows

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shares = RowExchange(self.rows.named("fc input rows")).rows_of_each_rank(trunk(self.full, images))
        outputs = []
        for rows in shares:                          # rank 0's b rows, then rank 1's, ...
            x, sizes = self.classifier(rows, self._gather_input)
            outputs.append(x)
        return rows_to_columns(torch.cat(outputs), self.world.named("logits"), sizes, scale=1.0 / self.world.size)

    def _fc_input(self, x: torch.Tensor) -> torch.Tensor:
        """fc6 reads the share's rows as they came (the later layers' gathers are then per share:
        [b, 4096/n] -> [b, 4096])."""
        return x
