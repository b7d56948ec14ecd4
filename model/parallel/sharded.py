"""A network whose parameters are split across ranks, kept as views of one full network.

Every rank builds the whole unwrapped network (`full`, what checkpoints and `eval` see). A
`ShardedNet` registers, in the full network's parameter order and under its names ('.' -> '_'),
either the full parameter itself (replicated) or a view of this rank's slice of it along dim 0 (a
shard). The optimizer is built over the ShardedNet, so it steps exactly the shards, in place, in
the full network's storage; `make_optimizer` then forms the same groups in the same order as for
the full network, which is what lets an optimizer state move between schemes.

The other ranks' slices of a sharded tensor in `full` are stale between syncs: `sync_full_model`
(a collective) gathers them, before an evaluation or a checkpoint. The optimizer's momentum is
gathered the same way into the full network's optimizer state (`full_optimizer_state`) and sliced
back on load, so a checkpoint is one unwrapped state whatever the scheme that wrote it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_fast.model.parallel.collectives import Link, Traffic, gather, shard_bounds


Sizes = Optional[tuple[int, ...]]       # each rank's extent along a split dimension; None: not split


def local_name(name: str) -> str:
    return name.replace(".", "_")


class ShardedNet(nn.Module):
    """`shards`: {full parameter name: the link whose ranks split it along dim 0}; every other
    parameter is replicated. Subclasses write `forward` with `param(name)`."""

    def __init__(self, full: nn.Module, shards: dict[str, Link], traffic: Traffic) -> None:
        super().__init__()
        object.__setattr__(self, "full", full)       # not a submodule: parameters() are the shards
        self.traffic = traffic
        self._links: dict[str, Link] = {}
        self._bounds: dict[str, list[tuple[int, int]]] = {}
        self._names: dict[int, str] = {}               # id(registered parameter) -> full name
        for name, param in full.named_parameters():
            if name in shards:
                link = shards[name]
                bounds = shard_bounds(param.shape[0], link.size)
                start, stop = bounds[link.rank]
                local = nn.Parameter(param.detach()[start:stop])     # a view: steps land in `full`
                self._links[name], self._bounds[name] = link, bounds
            else:
                local = param
            self.register_parameter(local_name(name), local)
            self._names[id(local)] = name

    def param(self, name: str) -> nn.Parameter:
        return getattr(self, local_name(name))

    def sizes(self, name: str) -> tuple[int, ...]:
        """Each rank's extent of sharded parameter `name` along dim 0."""
        return tuple(stop - start for start, stop in self._bounds[name])

    def classifier(self, x: torch.Tensor, gather_input: Callable[[torch.Tensor, int, Sizes], torch.Tensor],
                   sizes: Sizes = None) -> tuple[torch.Tensor, Sizes]:
        """The full network's classifier on this rank's shards: before each Linear layer
        `gather_input(x, its index, each rank's extent of x's features or None)` assembles the
        input it reads; ReLU and dropout act on whatever slice this rank holds. Returns the last
        layer's output slice and each rank's extent of it."""
        for i, module in enumerate(self.full.classifier):
            if isinstance(module, nn.Linear):
                x = gather_input(x, i, sizes)
                x = F.linear(x, self.param(f"classifier.{i}.weight"), self.param(f"classifier.{i}.bias"))
                sizes = self.sizes(f"classifier.{i}.weight")
            elif isinstance(module, nn.ReLU):
                x = F.relu(x)
            elif isinstance(module, nn.Dropout):
                x = F.dropout(x, module.p, self.training)
            else:
                raise TypeError(f"{type(self).__name__}: no rule for {type(module).__name__} in the classifier")
        return x, sizes

    def replicated(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if self._names[id(p)] not in self._links]

    def train(self, mode: bool = True) -> "ShardedNet":
        super().train(mode)
        self.full.train(mode)
        return self

    # --- the full network, for evaluation and checkpoints (collectives) -------------------------
    def _gathered(self, name: str, local: torch.Tensor) -> torch.Tensor:
        link = self._links[name].named("checkpoint")
        with torch.no_grad():
            return gather(local.detach(), 0, link, self.sizes(name))

    def sync_full_model(self) -> None:
        """Fill the other ranks' slices into `full` (in place): afterwards `full` holds the network."""
        full = dict(self.full.named_parameters())
        for name in self._links:
            with torch.no_grad():
                full[name].copy_(self._gathered(name, self.param(name)))

    def _by_index(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Full names of the optimizer's parameters in its state_dict's index order."""
        return [self._names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state_dict as the full network's optimizer would hold it (collective)."""
        state = optimizer.state_dict()
        for index, name in enumerate(self._by_index(optimizer)):
            entry = state["state"].get(index)
            if name in self._links and entry is not None:
                state["state"][index] = {k: self._gathered(name, v) if isinstance(v, torch.Tensor) and v.ndim else v
                                         for k, v in entry.items()}
        return state

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a full network's optimizer state_dict: each sharded tensor's slice of this rank."""
        state = {**state, "state": dict(state["state"])}
        for index, name in enumerate(self._by_index(optimizer)):
            entry = state["state"].get(index)
            if name in self._links and entry is not None:
                start, stop = self._bounds[name][self._links[name].rank]
                state["state"][index] = {k: v[start:stop] if isinstance(v, torch.Tensor) and v.ndim else v
                                         for k, v in entry.items()}
        optimizer.load_state_dict(state)


def trunk(full: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The full network's forward up to its classifier: features, (alexnet-owt) avgpool, flatten."""
    x = full.features(x)
    if hasattr(full, "avgpool"):
        x = full.avgpool(x)
    return torch.flatten(x, 1)
