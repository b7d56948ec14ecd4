"""Bytes per training step that each scheme hands to collectives, from the network's shapes: the
same keys and numbers `Traffic` counts at run time (tests/test_parallel_traffic.py checks that they
agree exactly), at any batch and rank count, for the scaling model and the docs.

    step_traffic("hybrid", "alexnet-owt", 1000, global_batch=1024, ranks=8).sent_bytes

Per rank; gradients of parameters in fp32 (4 bytes an element: the parameters are fp32 under
autocast too), activations and their gradients at `activation_bytes` an element (4 in fp32, 2 under
bf16/fp16 autocast, the GPU default, where the convolutions and FC layers output bf16); where a
layer splits unevenly, for rank 0, whose share is the
largest (gathers pad every share to it anyway). `passed`: the bytes of the tensors passed to the collectives;
`sent`: what the rank sends under ring all-reduce / all-gather and direct reduce-scatter /
all-to-all (collectives.Traffic.add)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from alexnet_fast.model.alexnet import build_model
from alexnet_fast.model.parallel import Parallel, data_share
from alexnet_fast.model.parallel.collectives import Traffic, shard_bounds

FP32 = 4
INPUT = (3, 227, 227)


class _Meta:
    """Shapes only: a tensor of `numel` fp32 elements, as Traffic.add reads one."""

    def __init__(self, numel: int, element_size: int = FP32) -> None:
        self._numel, self._size = numel, element_size

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return self._size


def _shapes(features: nn.Sequential) -> dict[nn.Module, tuple[int, ...]]:
    """Each feature layer's input shape (channels, height, width) for one 227x227 image, from the
    layers' own sizes (no forward pass: no weights, no meta kernels to load)."""
    def out(size: int, kernel: int, stride: int, padding: int) -> int:
        return (size + 2 * padding - kernel) // stride + 1

    seen: dict[nn.Module, tuple[int, ...]] = {}
    channels, height, width = INPUT
    for module in features:
        seen[module] = (channels, height, width)
        if isinstance(module, nn.Conv2d):
            (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
            channels, height, width = module.out_channels, out(height, kh, sh, ph), out(width, kw, sw, pw)
        elif isinstance(module, nn.MaxPool2d):
            kernel, stride, padding = (module.kernel_size, module.stride, module.padding)
            height, width = out(height, kernel, stride, padding), out(width, kernel, stride, padding)
    return seen


@functools.lru_cache(maxsize=None)
def _network(arch: str, num_classes: int) -> nn.Module:
    """The network's layers and shapes, no weights (meta device); built once per arch."""
    with torch.device("meta"):
        return build_model(arch, num_classes, dropout=0.0, init="torch")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _gather(traffic: Traffic, where: str, chunk: int, ranks: int, element: int, backward_sum: bool = True) -> None:
    """One `collectives.gather` of `chunk` elements of `element` bytes per rank, and its reduce-scatter backward."""
    traffic.add(where, "all_gather", _Meta(chunk, element), ranks)
    if backward_sum:
        for _ in range(ranks):
            traffic.add(where, "reduce_scatter", _Meta(chunk, element), ranks)


def step_traffic(choice: Parallel | str, arch: str, num_classes: int, global_batch: int, ranks: int,
                 activation_bytes: int = FP32) -> Traffic:
    """What one rank passes and sends in one training step of `choice` on `ranks` ranks,
    activations at `activation_bytes` an element (2: bf16/fp16 autocast)."""
    choice = Parallel(choice)
    traffic = Traffic()
    if ranks <= 1:
        return traffic
    model = _network(arch, num_classes)
    shapes = _shapes(model.features)
    params = sum(p.numel() for p in model.parameters())
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    if choice is Parallel.DDP:
        traffic.add("gradient buckets", "all_reduce", _Meta(params), ranks)
    elif choice.is_hybrid:
        _hybrid(traffic, model, linears, global_batch, ranks, activation_bytes,
                pipelined=choice is Parallel.HYBRID_PIPELINED)
    else:
        _columns(traffic, model, shapes, global_batch, ranks, activation_bytes)
    return traffic


def _widest(size: int, ranks: int) -> int:
    return max(stop - start for start, stop in shard_bounds(size, ranks))


def _hybrid(traffic: Traffic, model: nn.Module, linears: list[nn.Linear], global_batch: int, ranks: int,
            element: int, pipelined: bool) -> None:
    """Scheme (a): one gather of every rank's rows, the FC layers on all of them. Scheme (b)
    (`pipelined`): a broadcast of each rank's rows and, per share, the FC layers' gathers; the
    backward reduces each share's gradient to its rank."""
    rows = global_batch // ranks
    index = {m: i for i, m in enumerate(model.classifier)}
    shares = ranks if pipelined else 1
    if pipelined:
        for _ in range(ranks):
            traffic.add("fc input rows", "broadcast", _Meta(rows * linears[0].in_features, element), ranks)
            traffic.add("fc input rows", "reduce", _Meta(rows * linears[0].in_features, element), ranks)
    else:
        _gather(traffic, "fc input rows", rows * linears[0].in_features, ranks, element)
    for previous, layer in zip(linears, linears[1:]):
        for _ in range(shares):
            _gather(traffic, f"classifier.{index[layer]} input",
                    global_batch // shares * _widest(previous.out_features, ranks), ranks, element)
    logits = _Meta(global_batch * _widest(linears[-1].out_features, ranks), element)
    traffic.add("logits", "all_to_all", logits, ranks)           # forward
    traffic.add("logits", "all_to_all", logits, ranks)           # backward
    convs = sum(p.numel() for p in model.features.parameters())
    traffic.add("conv gradients", "all_reduce", _Meta(convs), ranks)


def _columns(traffic: Traffic, model: nn.Module, shapes: dict, global_batch: int, ranks: int, element: int) -> None:
    replicas = data_share(Parallel.COLUMNS, 0, ranks)[1]
    batch = global_batch // replicas                             # both columns of a pair read it
    first = True
    current = element          # the element size of the maps flowing at this layer
    for i, module in enumerate(model.features):
        channels, height, width = shapes.get(module, (0, 0, 0))
        if isinstance(module, nn.Conv2d):
            if module.groups == 1 and not first:
                _gather(traffic, f"features.{i} input", batch * channels // 2 * height * width, 2, current)
            first, current = False, element
        elif isinstance(module, nn.LocalResponseNorm):
            _gather(traffic, f"features.{i} LRN halo", batch * (module.size // 2) * height * width, 2, current)
            # autocast runs LRN's pow in fp32 (CUDA's and the CPU's fp32 lists), so its output, and
            # the pooled maps conv3 reads, are fp32 even under bf16 (counted: tests/test_parallel.py)
            current = FP32
    for i, module in enumerate(model.classifier):
        if isinstance(module, nn.Linear):
            _gather(traffic, f"classifier.{i} input", batch * _widest(module.in_features, 2), 2, element)
            last = module
    _gather(traffic, "logits", batch * _widest(last.out_features, 2), 2, element, backward_sum=False)
    if replicas > 1:
        for name, p in model.named_parameters():
            # column 0's share: the larger one where a layer's outputs split unevenly
            traffic.add("column gradients", "all_reduce", _Meta(_widest(p.shape[0], 2) * _numel(p.shape[1:])),
                        replicas)
