"""`alexnet-fast profile`: one real profile of every stage on the shard_set fixture (CPU), and the
scaling model's behaviour."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from alexnet_fast.model.flops import layer_flops, train_flops_per_image
from alexnet_fast.pipeline.loader_spec import default_loader_workers
from alexnet_fast.tools.cli import run_command
from alexnet_fast.tools.cmd_profile import profile_command
from alexnet_fast.tools.scaling import (ScalingInputs, Strategy, ddp_buckets, default_strategies, predict,
                                        predict_table, ring_allreduce_seconds)

STAGES = ["read", "decode", "baseline_decode", "model", "end_to_end"]
REPEATS = 2
STEPS = 2       # per timed run: 2 runs of 2 steps (no speed is compared here: a median of few is enough)


def _cli(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_command(profile_command, "alexnet-fast profile", [str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def profiled(shard_set, tmp_path_factory):
    """One full CPU profile with tiny sizes: (exit code, stdout, the JSON report, plot path)."""
    out = tmp_path_factory.mktemp("profile")
    args = ["--data", shard_set, "--device", "cpu", "--batch-size", 4, "--steps", STEPS, "--repeats", REPEATS,
            "--warmup", 1, "--workers", 1, "--json", out / "report.json", "--plot", out / "stages.png",
            "--scaling", "--link-gbps", 100, "--decode", "cpu"]
    # capsys is function-scoped; this module-scoped run captures its output by hand.
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        run_command(profile_command, "alexnet-fast profile", [str(a) for a in args])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return exit_info.value.code, stdout.getvalue() + stderr.getvalue(), report, out / "stages.png"


def test_json_shape_and_positive_numbers(profiled):
    code, output, report, _ = profiled
    assert code == 0, output
    assert set(report) >= {"device", "stages", "bound_by", "efficiency", "scaling"}
    assert report["device"].startswith("cpu")
    assert list(report["stages"]) == STAGES
    for name, stage in report["stages"].items():
        assert stage["img_per_s"] > 0, name
        assert len(stage["runs_img_per_s"]) == REPEATS and all(v > 0 for v in stage["runs_img_per_s"])
        assert min(stage["runs_img_per_s"]) <= stage["img_per_s"] <= max(stage["runs_img_per_s"])
    assert report["stages"]["read"]["mb_per_s"] > 0
    model = report["stages"]["model"]
    assert model["arch"] == "alexnet-owt" and model["precision"] == "fp32" and model["batch_size"] == 4
    assert report["config"]["compile"] is False and model["compile"] is False
    assert model["peak_tflop_per_s"] is None and model["fraction_of_peak"] is None   # CPU: peak unknown
    assert model["tflop_per_s"] == pytest.approx(model["img_per_s"] * model["gflop_per_image"] / 1e3)
    assert model["step_ms"] == pytest.approx(4 / model["img_per_s"] * 1e3)
    # host time per step: on the CPU the step computes before it returns, so it is about the
    # whole step (the median call vs the median repetition's mean), and no host-bound batch is claimed
    assert 0.5 * model["step_ms"] < model["host_ms_per_step"] < 2 * model["step_ms"]
    assert model["host_bound_below_batch"] is None


def test_efficiency_is_end_to_end_over_its_slowest_part(profiled):
    """The report's arithmetic, not the speeds: whether end_to_end really stays within its parts
    is a measurement (a CI rehearsal once saw it 1.4x above a part caught at a slow moment), made
    on a quiet machine by `alexnet-fast profile` itself (benchmarks/RESULTS.md)."""
    _, _, report, _ = profiled
    stages = report["stages"]
    parts = min(stages["decode"]["img_per_s"], stages["model"]["img_per_s"])
    assert report["efficiency"] == pytest.approx(stages["end_to_end"]["img_per_s"] / parts)


def test_cpu_verdict_is_model(profiled):
    code, output, report, _ = profiled
    assert report["bound_by"] == "model"
    assert "bound by: model" in output
    for name in STAGES:
        assert name in output


def test_the_decode_placement_is_the_one_a_cpu_run_can_measure(profiled):
    """A CPU run decodes on the CPU whatever --decode says: one placement measured (the decode
    stage itself), set against the model stage."""
    _, output, report, _ = profiled
    assert report["config"]["decode"] == "cpu" and report["stages"]["decode"]["decode"] == "cpu"
    advice = report["decode_placement"]
    assert advice["needs"] == "cpu" and advice["img_per_s"] == {"cpu": report["stages"]["decode"]["img_per_s"]}
    assert advice["model_img_per_s"] == report["stages"]["model"]["img_per_s"]
    assert "decode placement: the run needs --decode cpu" in output


def test_plot_is_a_png(profiled):
    _, _, _, plot = profiled
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_scaling_section_from_the_measured_step(profiled):
    _, output, report, _ = profiled
    scaling = report["scaling"]
    model = report["stages"]["model"]
    assert scaling["inputs"]["step_seconds"] == pytest.approx(model["step_ms"] / 1e3)
    assert scaling["inputs"]["params"] == model["params"] == 61_100_840   # alexnet-owt, 1000 classes
    assert "measured" in scaling["source"]
    rows = {(p["gpus"], p["strategy"]) for p in scaling["predictions"]}
    assert {g for g, _ in rows} == {1, 2, 8, 64, 512} and len(rows) == 5 * 4
    assert "scaling prediction" in output


@pytest.mark.parametrize("arch, scaled_by_std", [("alexnet2012", False), ("alexnet-owt", True)])
def test_profiled_loader_is_the_trainers(shard_set, arch, scaled_by_std):
    """The profiler feeds the model stage's network from the loader `alexnet-fast train` builds for
    the same settings on one device (model/train.py load_data), input scaling and loader threads
    included: alexnet2012 with its paper init is fed mean-centred raw values, not unit-variance ones."""
    from alexnet_fast.model.config import TrainConfig
    from alexnet_fast.model.distributed import DistContext
    from alexnet_fast.model.runtime import resolve_precision
    from alexnet_fast.model.train import load_data
    from alexnet_fast.pipeline.shardset import ShardSet
    from alexnet_fast.tools.profile_config import ProfileConfig
    from alexnet_fast.tools.profile_stages import train_loader_spec

    batch = 8
    train = TrainConfig(data=str(shard_set), arch=arch, batch_size=batch, device="cpu")
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    trainers, _val = load_data(train, ctx, ShardSet.open(shard_set), batch, resolve_precision(train.precision, "cpu"))
    profiled = train_loader_spec(ProfileConfig(data=shard_set, device="cpu", arch=arch, batch_size=batch).resolved(),
                                 "dali")
    assert profiled == trainers.spec
    assert profiled.scale_by_std is scaled_by_std
    assert profiled.workers == default_loader_workers("cpu")


def test_flops_are_the_layer_shapes(tmp_path):
    """The hand count against torch's flop counter where that counter is right (no grouped convs in
    alexnet-owt; forward passes of both)."""
    from torch.utils.flop_counter import FlopCounterMode

    for arch in ("alexnet-owt", "alexnet2012"):
        from alexnet_fast.model.alexnet import build_model

        model = build_model(arch, 1000).to("meta")
        images = torch.empty(2, 3, 227, 227, device="meta")
        with FlopCounterMode(display=False) as forward:
            logits = model(images)
        assert sum(f for _, f in layer_flops(arch, 1000)) == forward.get_total_flops() / 2
        if arch == "alexnet-owt":
            with FlopCounterMode(display=False) as train:
                model(images).sum().backward()
            assert train_flops_per_image(arch, 1000) == train.get_total_flops() / 2
        del logits


@pytest.mark.slow
def test_compile_is_absorbed_by_the_warm_up(shard_set, tmp_path):
    """--compile: the model and end_to_end stages train a torch.compile'd network (inductor builds
    C++ kernels with the machine's compiler: ~40 CPU-s with the empty cache given here).
    Asked for no warm-up, the profile still runs one, and the compilation lands there, not in a
    timed step: the warm-up step takes longer than the slowest timed one. Run in its own process so
    the compiler's worker pool and dynamo's caches do not outlive the test."""
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "alexnet_fast.tools.cli", "profile", "--data", str(shard_set), "--device", "cpu",
         "--stages", "model,end_to_end", "--compile", "--batch-size", "4", "--steps", "1", "--repeats", "2",
         "--warmup", "0", "--workers", "1", "--json", str(report_path)],
        capture_output=True, text=True, timeout=600,
        # an empty cache: a real compile; one compile thread: inductor's default on 2 cores is a
        # pool of compile workers, each importing torch again (~12% more CPU time, 2026-12-03)
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TORCHINDUCTOR_COMPILE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["config"]["compile"] is True and report["config"]["warmup"] == 0
    assert list(report["stages"]) == ["model", "end_to_end"]
    for name, stage in report["stages"].items():
        assert stage["compile"] is True and stage["img_per_s"] > 0, name
    # The model stage's network is the first the process compiles (from an empty cache); end_to_end's,
    # the same architecture, reuses dynamo's graphs and compiles little more, so it is not checked so.
    model = report["stages"]["model"]
    slowest_step_s = model["batch_size"] / min(model["runs_img_per_s"])   # --steps 1: one step a run
    assert model["warmup_s"] > slowest_step_s, model
    assert "compiled" in proc.stdout


@pytest.mark.parametrize("args, expect", [
    (["--data", "{tmp}/nope"], "does not exist"),
    (["--data", "{tmp}"], "no manifest.json"),
    (["--stages", "model,warp"], "--stages"),
    (["--assume-img-per-s", "100"], "--assume-img-per-s"),
    (["--stages", "read"], "--data"),
    (["--stages", "model", "--json", "{tmp}/no/dir/r.json"], "does not exist"),
    (["--stages", "model", "--batch-size", "0"], "--batch-size"),
])
def test_one_line_errors(args, expect, tmp_path, capsys):
    code, out, err = _cli([a.format(tmp=tmp_path) for a in args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "error" in lines[0] and expect in lines[0], lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_requested_without_a_gpu(capsys):
    code, _, err = _cli(["--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU" in err and "Traceback" not in err


def test_scaling_what_if_needs_no_measurement(tmp_path, capsys):
    code, out, err = _cli(["--scaling", "--assume-img-per-s", "40000", "--batch-size", "256",
                           "--json", tmp_path / "s.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["stages"] == {} and "not a measurement" in report["scaling"]["source"]
    assert report["config"]["workers"] == default_loader_workers("cpu")   # the trainer's default, no --workers
    one = [p for p in report["scaling"]["predictions"] if p["gpus"] == 1]
    assert all(p["img_per_s"] == pytest.approx(40000) for p in one)


# ------------------------------------------------------------------------------------------------
# the scaling model (pure arithmetic)
# ------------------------------------------------------------------------------------------------
ALEXNET_PARAMS = 61_100_840
GPUS = (1, 2, 8, 64, 512)


def _inputs(**changes) -> ScalingInputs:
    base = dict(step_seconds=256 / 40_000, batch=256, params=ALEXNET_PARAMS, link_gbps=400.0)
    return ScalingInputs(**{**base, **changes})


def test_ring_allreduce_arithmetic():
    nbytes = ALEXNET_PARAMS * 4
    assert ring_allreduce_seconds(nbytes, 1, 400) == 0
    assert ring_allreduce_seconds(nbytes, 2, 400) == pytest.approx(nbytes / 50e9)        # 400 Gbit/s = 50 GB/s
    assert ring_allreduce_seconds(nbytes, 512, 400) == pytest.approx(2 * 511 / 512 * nbytes / 50e9)
    assert ring_allreduce_seconds(nbytes, 8, 400, hop_latency_us=5) == pytest.approx(
        2 * 7 / 8 * nbytes / 50e9 + 14 * 5e-6)
    assert ring_allreduce_seconds(nbytes, 8, 400, hop_latency_us=5, messages=10) == pytest.approx(
        2 * 7 / 8 * nbytes / 50e9 + 10 * 14 * 5e-6)
    assert ring_allreduce_seconds(nbytes, 64, math.inf) == 0
    assert ddp_buckets(ALEXNET_PARAMS) == 10   # 244 MB of fp32 gradients in 25 MiB buckets


@pytest.mark.parametrize("link", [10, 100, 400, 3200])
@pytest.mark.parametrize("overlap", [0.0, 2 / 3, 1.0])
def test_bf16_never_slower_and_bigger_batch_never_slower(link, overlap):
    inputs = _inputs(link_gbps=link, overlap=overlap)
    fp32, bf16, fp32_big, bf16_big = default_strategies(4)
    for n in GPUS:
        assert predict(inputs, bf16, n).img_per_s >= predict(inputs, fp32, n).img_per_s
        assert predict(inputs, bf16_big, n).img_per_s >= predict(inputs, fp32_big, n).img_per_s
        assert predict(inputs, fp32_big, n).img_per_s >= predict(inputs, fp32, n).img_per_s
        for p in (predict(inputs, s, n) for s in default_strategies(4)):
            assert 0 < p.efficiency <= 1 + 1e-12


def test_free_communication_scales_linearly():
    inputs = _inputs(link_gbps=math.inf)
    single = 40_000
    for strategy in default_strategies(4):
        totals = [predict(inputs, strategy, n).img_per_s for n in GPUS]
        assert totals == pytest.approx([n * single for n in GPUS])
        assert all(b > a for a, b in zip(totals, totals[1:]))


def test_more_gpus_never_lower_total_without_latency():
    """From 2 GPUs on, each GPU's all-reduce share 2(N-1)/N is bounded, so adding GPUs never lowers
    the total. Going from 1 to 2 can: a slow enough link costs more than the second GPU gives."""
    for link in (1, 25, 400):
        for strategy in default_strategies(4):
            totals = [predict(_inputs(link_gbps=link), strategy, n).img_per_s for n in GPUS]
            assert all(b >= a for a, b in zip(totals[1:], totals[2:])), (link, strategy)
    one, two = (predict(_inputs(link_gbps=1), Strategy("fp32", 4), n).img_per_s for n in (1, 2))
    assert two < one


def test_comm_bound_numbers_and_overlap():
    """244 MB over 400 Gbit/s at 512 GPUs: ~9.8 ms of all-reduce against a 6.4 ms step of which
    2/3 hides it: step = 6.4/3 + 9.76 ms."""
    p = predict(_inputs(), Strategy("fp32", 4), 512)
    comm = 2 * 511 / 512 * ALEXNET_PARAMS * 4 / 50e9
    assert p.bound == "comm"
    assert p.step_ms == pytest.approx((0.0064 / 3 + comm) * 1e3)
    assert p.img_per_s == pytest.approx(512 * 256 / (0.0064 / 3 + comm))
    no_overlap = predict(_inputs(overlap=0.0), Strategy("fp32", 4), 512)
    assert no_overlap.step_ms == pytest.approx((0.0064 + comm) * 1e3)


def test_loader_ceiling_and_latency():
    capped = predict(_inputs(loader_img_per_s=10_000), Strategy("bf16", 2, 4), 8)
    assert capped.bound == "loader" and capped.img_per_s == pytest.approx(8 * 10_000)
    slow = predict(_inputs(hop_latency_us=5), Strategy("fp32", 4), 512)
    latency_ms = 10 * 2 * 511 * 5e-3   # 10 buckets x 2(N-1) hops x 5 us
    assert slow.comm_ms == pytest.approx(predict(_inputs(), Strategy("fp32", 4), 512).comm_ms + latency_ms)


def test_bad_inputs_are_refused():
    for bad in (dict(step_seconds=0), dict(batch=0), dict(link_gbps=0), dict(overlap=1.5)):
        with pytest.raises(ValueError):
            _inputs(**bad)
    assert len(predict_table(_inputs())) == len(GPUS) * 4
