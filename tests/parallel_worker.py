"""One rank of tests/test_parallel.py's runs (started by torchrun): for each case, the network
split per its scheme takes `steps` SGD steps on its share of fixed global batches; the rank saves
its logits, its gradients and the traffic of the first step, then the gathered full weights and
full optimizer state, a file per case (`case_file`). A case is
scheme:arch:input size:global batch:steps[:precision]."""
import sys

import torch
import torch.nn.functional as F

from alexnet_fast.model import distributed as D
from alexnet_fast.model.alexnet import build_model
from alexnet_fast.model.config import TrainConfig
from alexnet_fast.model.optim import make_optimizer
from alexnet_fast.model.parallel import split_network
from alexnet_fast.model.runtime import autocast, seed_everything

CLASSES = 5          # uneven over 2 and 4 ranks: the padded gathers are exercised


def batches(size: int, batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
            for _ in range(steps)]


def network(arch: str) -> torch.nn.Module:
    seed_everything(0)
    return build_model(arch, CLASSES, dropout=0.0, init="torch")


def optimizer_config() -> TrainConfig:
    return TrainConfig(lr=0.01, weight_decay=5e-4, momentum=0.9)


def case_file(rank: int, index: int) -> str:
    """Where rank `rank` saves the record of its `index`-th case."""
    return f"rank{rank}-case{index}.pt"


def run_case(ctx, scheme: str, arch: str, size: int, batch: int, steps: int, precision: str = "fp32") -> dict:
    model = network(arch)
    split = split_network(scheme, model, ctx, count_traffic=True)
    optimizer = make_optimizer(optimizer_config(), split.trainable)
    share = batch // split.data_ranks
    mine = slice(split.data_rank * share, (split.data_rank + 1) * share)
    split.network.train()
    record = {}
    for step, (images, labels) in enumerate(batches(size, batch, steps)):
        optimizer.zero_grad(set_to_none=True)
        split.traffic.reset()
        with autocast(ctx.device, precision):        # bf16: what the exchanged activations weigh
            logits = split.network(images[mine])
        F.cross_entropy(logits.float(), labels[mine]).backward()
        if step == 0:
            record["logits"] = logits.detach()
            record["grads"] = {name: p.grad.clone() for name, p in zip(
                (n for n, _ in model.named_parameters()), split.trainable.parameters())}
            record["passed"] = dict(split.traffic.passed)
        optimizer.step()
    split.sync_full_model()
    record["state"] = model.state_dict()
    record["optimizer"] = split.full_optimizer_state(optimizer)
    return record


if __name__ == "__main__":
    out, cases = sys.argv[1], sys.argv[2:]
    ctx = D.setup("cpu")
    for index, case in enumerate(cases):
        scheme, arch, size, batch, steps, *precision = case.split(":")
        # a file per case, written at once: a case's record is ~0.7 GB (alexnet-owt's gradients,
        # weights and momentum), and holding every case until the end took ~4 GB per rank
        torch.save(run_case(ctx, scheme, arch, int(size), int(batch), int(steps), *precision),
                   f"{out}/{case_file(ctx.rank, index)}")
    D.teardown()
