"""What each --parallel scheme sends per step, from the network's shapes (the run-time count is
checked against the same accounting in tests/test_parallel.py), and the scaling model built on it."""
from __future__ import annotations

import math

import pytest
import torch

from alexnet_fast.model.alexnet import build_model, count_parameters
from alexnet_fast.model.distributed import DistContext
from alexnet_fast.model.parallel import split_network
from alexnet_fast.model.parallel.accounting import step_traffic
from alexnet_fast.model.parallel.collectives import shard_bounds
from alexnet_fast.tools.scaling import ScalingInputs, predict, predict_scheme, Strategy


def _params(arch: str, part: str = "") -> int:
    with torch.device("meta"):                 # shapes only
        model = build_model(arch, 1000, init="torch")
    return count_parameters(getattr(model, part) if part else model)


def test_shard_bounds_cover_every_row_once_the_first_ones_longer():
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(1000, 8) == [(i * 125, (i + 1) * 125) for i in range(8)]
    assert shard_bounds(4, 4)[-1] == (3, 4)


def test_ddp_sends_every_gradient_whatever_the_batch():
    params = _params("alexnet2012")
    for batch in (128, 1024):
        traffic = step_traffic("ddp", "alexnet2012", 1000, batch, 8)
        assert traffic.passed_bytes == 4 * params
        assert traffic.sent_bytes == pytest.approx(2 * 7 / 8 * 4 * params)


def test_hybrid_sends_the_conv_gradients_and_the_batch_activations():
    traffic = step_traffic("hybrid", "alexnet-owt", 1000, 128, 2)
    assert traffic.passed["all_reduce:conv gradients"] == 4 * _params("alexnet-owt", "features")
    assert traffic.passed["all_gather:fc input rows"] == 64 * 9216 * 4          # this rank's 64 images
    assert traffic.passed["reduce_scatter:fc input rows"] == 128 * 9216 * 4     # their gradient, both halves
    assert traffic.passed["all_to_all:logits"] == 2 * 128 * 500 * 4             # forward and backward
    assert traffic.sent_bytes < step_traffic("ddp", "alexnet-owt", 1000, 128, 2).sent_bytes / 10


def test_columns_exchange_where_the_paper_connects_them():
    traffic = step_traffic("columns", "alexnet2012", 1000, 128, 2)
    gathers = sorted(k.split(":", 1)[1] for k in traffic.passed if k.startswith("all_gather"))
    # conv3 (features.8) and the three FC layers read both columns; the LRN halos make the one-device
    # net's cross-column normalization; the logits end in both columns
    assert gathers == sorted(["features.2 LRN halo", "features.6 LRN halo", "features.8 input", "classifier.0 input",
                              "classifier.3 input", "classifier.6 input", "logits"])
    assert traffic.passed["all_gather:features.8 input"] == 128 * 128 * 13 * 13 * 4
    assert "reduce_scatter:logits" not in traffic.passed      # both columns computed the same loss
    assert not any("gradients" in k for k in traffic.passed)    # one replica: nothing to all-reduce
    wider = step_traffic("columns", "alexnet2012", 1000, 128, 4)
    assert wider.passed["all_reduce:column gradients"] == 4 * _params("alexnet2012") // 2


def test_columns_refuses_a_network_without_columns():
    with torch.device("meta"):
        owt = build_model("alexnet-owt", 4)
    with pytest.raises(ValueError, match="no two columns"):
        split_network("columns", owt, DistContext(0, 0, 2, torch.device("cpu")))


def test_scaling_model_uses_each_schemes_bytes():
    inputs = ScalingInputs(step_seconds=16 / 40_000, batch=16, params=_params("alexnet2012"), link_gbps=400)
    ddp = predict_scheme(inputs, "ddp", "alexnet2012", 1000, 8)
    assert ddp.img_per_s == pytest.approx(predict(inputs, Strategy("ddp_fp32", 4), 8).img_per_s)
    hybrid = predict_scheme(inputs, "hybrid", "alexnet2012", 1000, 8)
    assert hybrid.img_per_s > 2 * ddp.img_per_s             # batch 128 over 8 GPUs: the 2014 case
    assert predict_scheme(inputs, "columns", "alexnet2012", 1000, 3) is None
    assert predict_scheme(inputs, "columns", "alexnet-owt", 1000, 2) is None
    assert predict_scheme(inputs, "hybrid", "alexnet2012", 1000, 1).img_per_s == pytest.approx(40_000)


def test_bf16_autocast_halves_the_exchanged_activations_not_the_gradients():
    fp32 = step_traffic("hybrid", "alexnet2012", 1000, 128, 4)
    bf16 = step_traffic("hybrid", "alexnet2012", 1000, 128, 4, activation_bytes=2)
    assert bf16.passed["all_reduce:conv gradients"] == fp32.passed["all_reduce:conv gradients"]
    for key, value in fp32.passed.items():
        if "gradients" not in key:
            assert bf16.passed[key] * 2 == value, key
    ddp = step_traffic("ddp", "alexnet2012", 1000, 128, 4)
    assert step_traffic("ddp", "alexnet2012", 1000, 128, 4, activation_bytes=2).passed == ddp.passed
    # columns: LRN's output is fp32 under autocast, so conv3's input (pooled LRN maps) stays 4 bytes
    columns = step_traffic("columns", "alexnet2012", 1000, 128, 2, activation_bytes=2)
    assert columns.passed["all_gather:features.8 input"] == 128 * 128 * 13 * 13 * 4
    assert columns.passed["all_gather:classifier.0 input"] == 128 * 4608 * 2


@pytest.mark.parametrize("batch,ranks", [(128, 2), (128, 8), (1024, 8), (20, 4)])
def test_pipelined_hybrid_sends_what_the_batched_one_sends(batch, ranks):
    """Scheme (b) moves the same rows as (a): n broadcasts and n reduces of each rank's rows
    instead of one all-gather and one reduce-scatter, and the FC layers' gathers per share."""
    batched = step_traffic("hybrid", "alexnet-owt", 1000, batch, ranks)
    pipelined = step_traffic("hybrid-pipelined", "alexnet-owt", 1000, batch, ranks)
    assert pipelined.sent_bytes == pytest.approx(batched.sent_bytes)
    rows = batch // ranks * 9216 * 4
    assert pipelined.passed["broadcast:fc input rows"] == ranks * rows       # one per source rank
    assert pipelined.passed["reduce:fc input rows"] == ranks * rows
    assert "all_gather:fc input rows" not in pipelined.passed
    for key in ("all_gather:classifier.4 input", "all_to_all:logits", "all_reduce:conv gradients"):
        assert pipelined.passed[key] == batched.passed[key], key


def test_pipelined_rows_hide_under_the_fc_layers_and_only_there():
    """The scaling model: hybrid-pipelined's row transfers, all but one share's, hide under the FC
    layers' compute; nothing changes when communication is free."""
    from alexnet_fast.tools.scaling import fc_share

    params = _params("alexnet2012")
    slow = ScalingInputs(step_seconds=128 / 40_000, batch=128, params=params, link_gbps=100)
    batched = predict_scheme(slow, "hybrid", "alexnet2012", 1000, 8)
    pipelined = predict_scheme(slow, "hybrid-pipelined", "alexnet2012", 1000, 8)
    assert pipelined.img_per_s > batched.img_per_s
    saved = batched.step_ms - pipelined.step_ms
    assert saved <= fc_share("alexnet2012", 1000) * batched.compute_ms + 1e-9      # no more than the FC compute
    free = ScalingInputs(step_seconds=128 / 40_000, batch=128, params=params, link_gbps=math.inf)
    assert (predict_scheme(free, "hybrid-pipelined", "alexnet2012", 1000, 8).img_per_s
            == pytest.approx(predict_scheme(free, "hybrid", "alexnet2012", 1000, 8).img_per_s))
    assert 0.03 < fc_share("alexnet-owt", 1000) < 0.15             # the FC layers: a few % of the FLOPs


def test_profile_scaling_gpus_choose_the_rows_of_both_tables():
    from click.testing import CliRunner

    from alexnet_fast.tools.cli import main

    result = CliRunner().invoke(main, ["profile", "--scaling", "--assume-img-per-s", "40000", "--batch-size", "128",
                                       "--arch", "alexnet2012", "--scaling-gpus", "4,24"])
    assert result.exit_code == 0, result.output
    schemes = result.stdout.split("--parallel schemes")[1]
    counts = {int(line.split()[0]) for line in schemes.splitlines()[2:] if line.strip()}
    assert counts == {4, 24}
    assert "hybrid-pipelined" in schemes
