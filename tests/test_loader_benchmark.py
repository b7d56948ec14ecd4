"""The loader benchmark's own harness (benchmarks/window_harness.py), on real child processes:
windows obey both limits, contenders alternate with the order reversed each round, results are
medians with the spread (never best-of), and a child that dies is one clear error. No loader runs
here (the benchmark itself is not part of the suite: it takes minutes and wants a quiet machine)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from window_harness import Contender, WindowRule, interleave, output_problem, run_window, summarize  # noqa: E402

# A contender whose batches take `delay` seconds each; it logs each window's start to `log`.
CHILD = """
import sys, time
sys.path.insert(0, {bench!r})
from window_harness import serve
def batches():
    while True:
        time.sleep({delay})
        yield 4
serve(batches, warmup_batches=2)
"""


def _contender(name, delay):
    bench = str(Path(__file__).resolve().parent.parent / "benchmarks")
    return Contender(name, [sys.executable, "-c", CHILD.format(bench=bench, delay=delay)])


def test_a_window_lasts_both_its_seconds_and_its_batches():
    ticks = iter(range(1000))                       # a clock that advances 1 "second" per batch
    by_batches = run_window(iter([8] * 1000), WindowRule(seconds=3, min_batches=10), clock=lambda: next(ticks))
    assert by_batches["batches"] == 10 and by_batches["images"] == 80
    ticks = iter(range(1000))
    by_seconds = run_window(iter([8] * 1000), WindowRule(seconds=20, min_batches=10), clock=lambda: next(ticks))
    assert by_seconds["batches"] == 20 and by_seconds["img_per_s"] == pytest.approx(8.0)


def test_summary_is_the_median_with_the_spread_not_the_best_round():
    windows = [{"img_per_s": r, "cpu_ms_per_img": 1.0, "batches": 200, "seconds": 10.0} for r in (100.0, 300.0, 120.0)]
    s = summarize(windows)
    assert (s["img_per_s"], s["min"], s["max"], s["rounds"]) == (120.0, 100.0, 300.0, [100.0, 300.0, 120.0])


def test_contenders_alternate_in_child_processes_and_the_faster_one_measures_faster():
    fast, slow = _contender("fast", 0.002), _contender("slow", 0.02)
    order = []
    try:
        assert fast.warmup["warmup_batches"] == 2 and fast.warmup["warmup_s"] > 0
        interleave([fast, slow], 3, WindowRule(seconds=0.1, min_batches=5), log=order.append)
    finally:
        fast.close(), slow.close()
    assert [line.split()[2].rstrip(":") for line in order] == ["fast", "slow", "slow", "fast", "fast", "slow"]
    assert len(fast.windows) == len(slow.windows) == 3
    assert all(w["seconds"] >= 0.1 and w["batches"] >= 5 for w in fast.windows + slow.windows)
    assert fast.summary()["img_per_s"] > 2 * slow.summary()["img_per_s"]
    assert fast.proc.returncode == slow.proc.returncode == 0


def test_a_contender_that_dies_is_named_in_one_line():
    with pytest.raises(RuntimeError, match=r"^broken: the benchmark process ended \(exit 3\) without a result"):
        Contender("broken", [sys.executable, "-c", "import sys; sys.exit(3)"])


def test_every_contender_must_hand_out_the_same_dtype_and_layout():
    import torch

    nchw = torch.zeros(4, 3, 227, 227)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    assert output_problem(nchw.shape, nchw.stride(), str(nchw.dtype), "nchw", "float32") is None
    assert output_problem(nhwc.shape, nhwc.stride(), str(nhwc.dtype), "nhwc", "float32") is None
    assert "nchw" in output_problem(nhwc.shape, nhwc.stride(), str(nhwc.dtype), "nchw", "float32")
    assert output_problem(nchw.shape, nchw.stride(), "torch.float16", "nchw", "float32")
    assert output_problem((4, 227, 227, 3), (3 * 227 * 227, 3 * 227, 3, 1), "torch.float32", "nhwc", "float32")


# -- benchmarks/nhwc_bound.py: its Numba stand-in is exact, and the script runs end to end ----------
BOUND = Path(__file__).resolve().parent.parent / "benchmarks" / "nhwc_bound.py"


def test_the_nhwc_bounds_numba_normalize_gives_crop_mirror_normalizes_values(shard_set):
    """The bound's `train-numba` figure stands for crop_mirror_normalize's work only if it computes
    the same thing: the same draws (crop, mirror, lighting) through both, equal up to float32 rounding
    (a step or two at these magnitudes: 4.8e-7 measured), bounded here at 1e-6."""
    from nhwc_bound import check_numba_normalize

    assert check_numba_normalize(str(shard_set)) <= 1e-6


def test_the_nhwc_bound_benchmark_runs_its_contenders_and_writes_json(shard_set, tmp_path):
    """The script end to end on real shards: the chosen contenders only, each with its windows
    (which is faster is the benchmark's finding, on a quiet machine, not this test's)."""
    import json
    import subprocess

    out = tmp_path / "bound.json"
    run = subprocess.run([sys.executable, str(BOUND), "--data", str(shard_set), "--contender", "read",
                          "--contender", "train-dali", "--seconds", "0.2", "--min-batches", "2", "--rounds", "2",
                          "--warmup", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["contenders"]) == {"read", "train-dali"}
    for s in results["contenders"].values():
        assert len(s["rounds"]) == 2 and s["img_per_s"] > 0 and s["cpu_ms_per_img"] > 0


def test_the_nhwc_bound_benchmark_refuses_a_folder_that_is_no_shard_set_in_one_line(tmp_path):
    import subprocess

    run = subprocess.run([sys.executable, str(BOUND), "--data", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "manifest.json" in run.stderr.strip().splitlines()[-1]


# -- benchmarks/cpu_floor.py: its path outside DALI's CPU operators gives the train graph's values -----
def test_the_cpu_floors_fused_path_gives_the_train_graphs_values_exactly(shard_set):
    """cpu_floor's `fused` figures stand for the train graph's work only if they compute the same
    thing: libjpeg-turbo called directly decodes the window DALI's CPU decoder decodes (0 levels
    apart: the same library, the same IDCT and upsampling), and the Numba kernel, fed the graph's
    own draws, writes crop_mirror_normalize's float32 values to float32 rounding (0 on the benchmark
    set, 4.8e-7 here: one step at these magnitudes), in both layouts; one 0..255 level is ~0.015."""
    from cpu_floor import check_fused

    worst = check_fused(str(shard_set), batches=2)
    assert worst["decode_levels"] == 0 and worst["hwc"] <= 1e-6 and worst["chw"] <= 1e-6, worst


def test_the_cpu_floors_decode_stage_is_what_the_train_graph_decodes(shard_set):
    """cpu_floor's `decode` stands for the CPU half of `--decode cpu` (what the CPU does before the
    copy to the GPU) only if it decodes exactly the train graph's windows for the same draws;
    `decode-fast` (fast IDCT, FFCV's stock DCT) stays within the fast IDCT's stated bound."""
    from cpu_floor import check_decode_stages

    from alexnet_fast.pipeline.loader_spec import FAST_IDCT_MAX_LEVELS

    worst = check_decode_stages(str(shard_set), batches=2)
    assert worst["decode"] == 0 and 0 < worst["decode-fast"] <= FAST_IDCT_MAX_LEVELS, worst


def test_the_cpu_floor_benchmark_refuses_ffcv_without_its_venv_in_one_line(shard_set, tmp_path):
    import subprocess

    floor = BOUND.with_name("cpu_floor.py")
    run = subprocess.run([sys.executable, str(floor), "--data", str(shard_set), "--peer", "ffcv", "--ffcv-venv",
                          str(tmp_path / "no-venv")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "ffcv_setup.sh" in run.stderr.strip().splitlines()[-1]


# -- benchmarks/photo_tree.py: real photos named <wnid>_*.JPEG become a raw tree make_shards reads --
def test_photo_tree_lists_each_photo_copies_times_and_make_shards_reads_it(tmp_path):
    import json
    import subprocess

    import numpy as np
    from PIL import Image

    from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    names = ["n01440764_tench.JPEG", "n01443537_goldfish.JPEG", "not_a_class.JPEG"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), np.uint8)).save(photos / name, quality=90)
    raw = tmp_path / "raw"
    run = subprocess.run([sys.executable, str(BOUND.with_name("photo_tree.py")), str(photos), str(raw), "--copies", "3"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "6 samples (2 photos x 3) in 2 classes" in run.stdout and "left out 1" in run.stdout
    tench = sorted((raw / "train" / "n01440764").iterdir())
    assert [p.name for p in tench] == [f"n01440764_tench_{k}.JPEG" for k in range(3)]
    assert all(p.read_bytes() == (photos / names[0]).read_bytes() for p in tench)

    out = tmp_path / "shards"
    make_shards(raw, out, ShardOptions(per_shard=4), workers=1, progress=False, log=lambda msg: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["n01440764", "n01443537"] and manifest["splits"]["train"]["samples"] == 6


def test_photo_tree_refuses_a_folder_without_photos_in_one_line(tmp_path):
    import subprocess

    run = subprocess.run([sys.executable, str(BOUND.with_name("photo_tree.py")), str(tmp_path), str(tmp_path / "raw")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "no photo named" in run.stderr.strip().splitlines()[-1]
