"""The collectives the split networks are made of, as autograd functions, and the count of every
byte they pass.

Each function is one torch.distributed collective forward and its adjoint backward, on a process
group (NCCL on GPUs, gloo on the CPU: the same calls):

    gather(x, dim, group, sizes, backward=SUM)   all_gather along `dim` (uneven `sizes` padded);
                                                 backward: reduce_scatter of the gradient (SUM: the
                                                 ranks' consumers differ, each adds its part) or
                                                 this rank's slice of it (OWN: every rank computed
                                                 the same thing from the gathered tensor)
    rows_to_columns(x, group, sizes, scale)      [n*b, C_r] (all rows, this rank's columns) ->
                                                 [b, C] (this rank's rows, all columns): all_to_all;
                                                 backward the inverse all_to_all, times `scale`
    RowExchange(link).rows_of_each_rank(x)       every rank's rows, one rank's at a time (the 2014
                                                 paper's scheme (b)): n async broadcasts, each
                                                 waited for only when its rows are needed; backward:
                                                 each share's gradient reduced to its rank, launched
                                                 as soon as it exists

`Traffic` counts what each rank hands to collectives ("passed": bytes of the input tensors, padding
included) and what it sends under the usual algorithms ("sent": ring all-reduce 2(n-1)/n x size,
all-gather (n-1) x the input, reduce-scatter and all-to-all (n-1)/n x the input, ring broadcast and
reduce (n-1)/n x the tensor: n of them, one from or to each rank, send what one all-gather or
reduce-scatter of the same rows sends). Counting is
exact: it reads the tensors at the call, not a formula.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    """Bytes by (collective, where) since the last `reset`: what one rank passed and sent."""
    passed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sent: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, where: str, op: str, tensor: torch.Tensor, ranks: int) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        share = {"all_reduce": 2 * (ranks - 1) / ranks, "all_gather": ranks - 1,
                 "reduce_scatter": (ranks - 1) / ranks, "all_to_all": (ranks - 1) / ranks,
                 "broadcast": (ranks - 1) / ranks, "reduce": (ranks - 1) / ranks}[op]
        key = f"{op}:{where}"
        self.passed[key] += nbytes
        self.sent[key] += nbytes * share

    def reset(self) -> None:
        self.passed.clear()
        self.sent.clear()

    @property
    def passed_bytes(self) -> int:
        return sum(self.passed.values())

    @property
    def sent_bytes(self) -> float:
        return sum(self.sent.values())


class Backward(str, Enum):
    SUM = "sum"        # the ranks used the gathered tensor differently: add their gradients
    OWN = "own"        # every rank computed the same from it: take this rank's slice, no traffic


def shard_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `parts` near-equal slices of `size` (the first size % parts one longer)."""
    base, extra = divmod(size, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _pad(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if x.shape[dim] == size:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim).contiguous()


@dataclass(frozen=True)
class Link:
    """A process group, this rank's index in it, its size, and the traffic counter to charge."""
    group: object | None
    rank: int
    size: int
    traffic: Traffic
    where: str = ""

    def named(self, where: str) -> "Link":
        return Link(self.group, self.rank, self.size, self.traffic, where)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, link: Link, sizes: tuple[int, ...], mode: Backward, scale: float):
        ctx.dim, ctx.link, ctx.sizes, ctx.mode, ctx.scale = dim, link, sizes, mode, scale
        widest = max(sizes)
        mine = _pad(x, dim, widest)
        parts = [torch.empty_like(mine) for _ in sizes]
        link.traffic.add(link.where, "all_gather", mine, link.size)
        dist.all_gather(parts, mine, group=link.group)
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        link, dim, sizes = ctx.link, ctx.dim, ctx.sizes
        start = sum(sizes[:link.rank])
        if ctx.mode is Backward.OWN:
            mine = grad.narrow(dim, start, sizes[link.rank])
        else:
            widest = max(sizes)
            chunks = [_pad(c, dim, widest) for c in grad.split(list(sizes), dim)]
            mine = torch.empty_like(chunks[0])
            for chunk in chunks:
                link.traffic.add(link.where, "reduce_scatter", chunk, link.size)
            dist.reduce_scatter(mine, chunks, group=link.group)
            mine = mine.narrow(dim, 0, sizes[link.rank])
        if ctx.scale != 1.0:
            mine = mine * ctx.scale
        return mine.contiguous(), None, None, None, None, None


def gather(x: torch.Tensor, dim: int, link: Link, sizes: tuple[int, ...] | None = None,
           backward: Backward = Backward.SUM, scale: float = 1.0) -> torch.Tensor:
    """Every rank's `x`, concatenated along `dim` in rank order (`sizes`: each rank's extent along
    `dim`; default all equal). The gradient of this rank's `x` is the sum of the ranks' gradients
    of its slice (SUM) or this rank's own (OWN), times `scale`."""
    sizes = tuple(sizes) if sizes is not None else (x.shape[dim],) * link.size
    return _Gather.apply(x, dim, link, sizes, backward, scale)


class _RowsToColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, link: Link, sizes: tuple[int, ...], scale: float):
        ctx.link, ctx.sizes, ctx.scale = link, sizes, scale
        widest = max(sizes)
        send = _pad(x, 1, widest)                  # [n*b, widest]: row block s goes to rank s
        received = torch.empty_like(send)
        link.traffic.add(link.where, "all_to_all", send, link.size)
        dist.all_to_all_single(received, send, group=link.group)
        blocks = received.chunk(link.size, 0)      # block s: rank s's columns of this rank's rows
        return torch.cat([b.narrow(1, 0, s) for b, s in zip(blocks, sizes)], 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        link, sizes = ctx.link, ctx.sizes
        widest = max(sizes)
        send = torch.cat([_pad(c, 1, widest) for c in grad.split(list(sizes), 1)], 0)
        received = torch.empty_like(send)
        link.traffic.add(link.where, "all_to_all", send, link.size)
        dist.all_to_all_single(received, send, group=link.group)
        mine = received.narrow(1, 0, sizes[link.rank])
        return (mine * ctx.scale).contiguous(), None, None, None


def rows_to_columns(x: torch.Tensor, link: Link, sizes: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    """[n*b, sizes[rank]] (every rank's rows, this rank's columns) -> [b, sum(sizes)] (this rank's
    rows, every rank's columns); the gradient comes back the inverse way, times `scale`."""
    return _RowsToColumns.apply(x, link, tuple(sizes), scale)


class RowExchange:
    """Every rank's rows, one rank's share at a time, with the transfers overlapping the compute
    (Krizhevsky 2014, scheme (b) for the FC layers' input).

        for rows in RowExchange(link).rows_of_each_rank(x):    # rank 0's x, rank 1's x, ...
            ...                                                 # compute on them

    Forward: the n broadcasts (rank s sends its rows) are all launched at once, asynchronously;
    the loop waits for broadcast s only when it reaches share s, so share s+1 travels while the
    layers after this compute on share s. Backward: the gradient of share s is reduced (summed) to
    rank s, launched asynchronously as soon as backward has produced it, while backward goes on
    through the other shares; this rank's own rows' gradient is waited for last, just before
    backward enters the layers that made `x`.

    Autograd shape of it: x -> _Own (identity; its backward waits for this rank's reduce) -> one
    _Share node per source rank (forward: wait for that broadcast; backward: launch that reduce,
    pass no gradient on). Each _Share is its own node, so its backward runs as soon as its share's
    gradient is complete; a hook on the output of one multi-output node would fire only once all
    shares' gradients were in. Every rank launches the same collectives in the same order (the same
    graph), so the collectives match. `link.group` should be a group of its own (a second
    communicator): collectives queued on one group run in order, and the layers' own gathers
    between two shares would otherwise wait behind the broadcasts of the later shares.
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        self._buffers: list[torch.Tensor] = []
        self._broadcasts: list = []
        self._reduces: dict[int, tuple[object, torch.Tensor]] = {}

    def _global(self, rank: int) -> int:
        return rank if self.link.group is None else dist.get_global_rank(self.link.group, rank)

    def rows_of_each_rank(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Rank 0's rows, then rank 1's, ...: each waited for when the caller asks for it."""
        own = _Own.apply(x, self)
        for source in range(self.link.size):
            yield _Share.apply(own, self, source)

    def _start(self, x: torch.Tensor) -> None:
        link = self.link
        self._reduces.clear()
        self._buffers = [x.detach().clone() if s == link.rank else torch.empty_like(x) for s in range(link.size)]
        self._broadcasts = []
        for s, buffer in enumerate(self._buffers):
            link.traffic.add(link.where, "broadcast", buffer, link.size)
            self._broadcasts.append(dist.broadcast(buffer, src=self._global(s), group=link.group, async_op=True))

    def _received(self, source: int) -> torch.Tensor:
        work = self._broadcasts[source]
        if work is not None:
            work.wait()
            self._broadcasts[source] = None
        return self._buffers[source]

    def _reduce(self, source: int, grad: torch.Tensor) -> None:
        link = self.link
        total = grad.contiguous().clone()           # reduced in place: not the engine's buffer
        link.traffic.add(link.where, "reduce", total, link.size)
        self._reduces[source] = (dist.reduce(total, dst=self._global(source), group=link.group, async_op=True), total)

    def _own_gradient(self) -> torch.Tensor:
        for work, _ in self._reduces.values():
            work.wait()
        own = self._reduces[self.link.rank][1]
        self._reduces.clear()
        self._buffers = []
        return own


class _Own(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, exchange: RowExchange):
        ctx.exchange = exchange
        exchange._start(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # `grad` is what the _Share nodes passed on: nothing; this rank's rows' gradient is the sum
        # the other ranks reduced to it
        return ctx.exchange._own_gradient(), None


class _Share(torch.autograd.Function):
    @staticmethod
    def forward(ctx, own: torch.Tensor, exchange: RowExchange, source: int):
        ctx.exchange, ctx.source = exchange, source
        return exchange._received(source)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.exchange._reduce(ctx.source, grad)
        return None, None, None


class GradientReducer:
    """Sums the gradients of `params` over `link`'s group as backward produces them: each one's
    all-reduce is launched (async) from its post-accumulate hook, so it runs while backward goes on
    through earlier layers; a callback queued at the end of backward waits for them all. The
    optimizer never sees a gradient before its reduction ended."""

    def __init__(self, params: list[torch.nn.Parameter], link: Link) -> None:
        self.link = link
        self._works: list = []
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._launch) for p in params] if link.size > 1 else []

    def _launch(self, param: torch.Tensor) -> None:
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        self.link.traffic.add(self.link.where, "all_reduce", param.grad, self.link.size)
        self._works.append(dist.all_reduce(param.grad, group=self.link.group, async_op=True))

    def _finish(self) -> None:
        for work in self._works:
            work.wait()
        self._works.clear()
        self._queued = False
