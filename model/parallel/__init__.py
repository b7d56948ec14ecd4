"""How a network is split across the ranks of a run: `--parallel ddp | columns | hybrid`.

    split = split_network(Parallel.HYBRID, model, ctx)
    optimizer = make_optimizer(cfg, split.trainable, ctx.device)   # the parameters this rank steps
    logits = split.network(images)       # this rank's images in, their logits out (every scheme)

ddp      every rank a whole replica; DDP all-reduces every gradient (model/distributed.wrap_ddp)
columns  the 2012 paper's two columns: 2 ranks per replica, activations exchanged where the columns
         connect (columns.py); 2 x N ranks = N replicas, gradients all-reduced per column
hybrid   2014's "one weird trick": convolutions data-parallel, FC layers split by output neuron
         across all ranks (hybrid.py), the FC input gathered from every rank at once (its scheme (a))
hybrid-pipelined   the same split, the FC layers fed one rank's rows at a time while the next
         rank's travel (its scheme (b), hybrid.py)

`split_network` is the one place the choice becomes a wrapper. Whatever the choice, the unwrapped
`model` stays the network checkpoints and `eval` see: `prepare_checkpoint` (a collective) fills it
and the optimizer's full state before a save or an evaluation; `checkpoint_optimizer` is what a
checkpoint saves and restores the optimizer through (always the full network's optimizer state).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alexnet_fast.model.parallel.collectives import Link, Traffic


class Parallel(str, Enum):
    DDP = "ddp"
    COLUMNS = "columns"
    HYBRID = "hybrid"
    HYBRID_PIPELINED = "hybrid-pipelined"

    @property
    def is_hybrid(self) -> bool:
        return self in (Parallel.HYBRID, Parallel.HYBRID_PIPELINED)


PARALLEL_NAMES: tuple[str, ...] = tuple(p.value for p in Parallel)


@dataclass
class Split:
    """A network as one scheme runs it on this rank."""
    network: nn.Module               # what a train step calls: this rank's images -> their logits
    trainable: nn.Module             # what the optimizer steps (its parameters in the full network's order)
    data_rank: int                   # which share of every global batch this rank reads...
    data_ranks: int                  # ...of how many (columns: both ranks of a pair read the same)
    traffic: Traffic = field(default_factory=Traffic)

    def sync_full_model(self) -> None:
        """Collective: make the unwrapped model whole on every rank (before an evaluation)."""
        if hasattr(self.network, "sync_full_model"):
            self.network.sync_full_model()

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective: the optimizer state the full network's optimizer would hold."""
        if hasattr(self.network, "full_optimizer_state"):
            return self.network.full_optimizer_state(optimizer)
        return optimizer.state_dict()

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if hasattr(self.network, "load_full_optimizer_state"):
            self.network.load_full_optimizer_state(optimizer, state)
        else:
            optimizer.load_state_dict(state)


class CheckpointOptimizer:
    """What a checkpoint saves and restores the optimizer through: the full network's optimizer
    state. `prepare` (all ranks, a collective) gathers it; `state_dict` (rank 0, at capture) hands
    the gathered state; `load_state_dict` slices a full state into this rank's optimizer."""

    def __init__(self, split: Split, optimizer: torch.optim.Optimizer) -> None:
        self.split, self.optimizer = split, optimizer
        self._gathered: dict[str, Any] | None = None

    def prepare(self) -> None:
        self.split.sync_full_model()
        self._gathered = self.split.full_optimizer_state(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        if self._gathered is None:
            raise RuntimeError("CheckpointOptimizer.state_dict before prepare()")
        return self._gathered

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.split.load_full_optimizer_state(self.optimizer, state)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups


def data_share(choice: Parallel | str, rank: int, world_size: int) -> tuple[int, int]:
    """(which share of every global batch rank `rank` reads, of how many shares): its own under ddp
    and hybrid; under columns both ranks of a pair read their replica's share."""
    if Parallel(choice) is Parallel.COLUMNS:
        from alexnet_fast.model.parallel.columns import COLUMNS

        return rank // COLUMNS, max(1, world_size // COLUMNS)
    return rank, world_size


def split_network(choice: Parallel | str, model: nn.Module, ctx: Any, grad_compression: str = "none",
                  count_traffic: bool = False) -> Split:
    """`model` (the unwrapped network, on ctx.device) split per `choice` over the ranks of `ctx`
    (a model.distributed.DistContext). One process: the network itself, whatever the choice but
    columns (which needs 2 ranks per replica). ValueError for a choice this run cannot take.
    `count_traffic`: also count DDP's gradient buckets (the split schemes always count)."""
    choice = Parallel(choice)
    if choice is Parallel.COLUMNS:
        return _columns(model, ctx)
    if not ctx.is_distributed:
        return Split(model, model, 0, 1)
    if choice.is_hybrid:
        return _hybrid(choice, model, ctx)
    return _ddp(model, ctx, grad_compression, count_traffic)


def _ddp(model: nn.Module, ctx: Any, grad_compression: str, count_traffic: bool) -> Split:
    from alexnet_fast.model.distributed import wrap_ddp

    traffic = Traffic()
    ddp = wrap_ddp(model, ctx, grad_compression)
    if count_traffic:
        if grad_compression != "none":
            raise ValueError("counting DDP's traffic replaces its comm hook: only without compression")
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def counted(state, bucket):        # no annotations: DDP checks them, and ours are strings
            traffic.add("gradient buckets", "all_reduce", bucket.buffer(), ctx.world_size)
            return default_hooks.allreduce_hook(state, bucket)
        ddp.register_comm_hook(state=None, hook=counted)
    return Split(ddp, model, ctx.rank, ctx.world_size, traffic)


def _hybrid(choice: Parallel, model: nn.Module, ctx: Any) -> Split:
    from alexnet_fast.model.parallel.hybrid import HybridNet, PipelinedHybridNet

    traffic = Traffic()
    world = Link(None, ctx.rank, ctx.world_size, traffic)
    if choice is Parallel.HYBRID:
        net = HybridNet(model, world, traffic)
    else:       # the row broadcasts on a communicator of their own (collectives.RowExchange says why)
        rows = Link(dist.new_group(list(range(ctx.world_size))), ctx.rank, ctx.world_size, traffic)
        net = PipelinedHybridNet(model, world, rows, traffic)
    return Split(net, net, ctx.rank, ctx.world_size, traffic)


def _columns(model: nn.Module, ctx: Any) -> Split:
    from alexnet_fast.model.parallel.columns import COLUMNS, ColumnsNet, check_columns

    check_columns(model)
    if ctx.world_size % COLUMNS:
        raise ValueError(f"--parallel columns runs {COLUMNS} ranks per replica: the world size must be even, "
                         f"not {ctx.world_size}")
    replica, replicas = data_share(Parallel.COLUMNS, ctx.rank, ctx.world_size)
    column = ctx.rank % COLUMNS
    # every rank creates every group, in the same order (torch.distributed's rule for new_group)
    pairs = [dist.new_group([COLUMNS * k + c for c in range(COLUMNS)]) for k in range(replicas)]
    across = ([dist.new_group(list(range(c, ctx.world_size, COLUMNS))) for c in range(COLUMNS)]
              if replicas > 1 else [None] * COLUMNS)
    traffic = Traffic()
    net = ColumnsNet(model, Link(pairs[replica], column, COLUMNS, traffic),
                     Link(across[column], replica, replicas, traffic), traffic)
    return Split(net, net, replica, replicas, traffic)
