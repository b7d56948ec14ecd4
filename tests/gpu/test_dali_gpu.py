"""The DALI GPU path (mixed decoder) against its CPU twin, on the same shards and seed.

Bounds, stated once:
- CHROMA_MAX_LEVELS / CHROMA_MEAN_LEVELS: the mixed decoder (nvJPEG / the hardware decoder) upsamples
  4:2:0 chroma without libjpeg-turbo's "fancy" filter (`jpeg_fancy_upsampling=False`,
  dali_pipelines.py), the CPU twin with it; everything after decoding is the same operator on the
  same parameters (crop, no resize), so a pixel differs by what decoding differs by. Measured with
  libjpeg-turbo itself both ways (simplejpeg, fancy vs `fastupsample`) on the 640 JPEGs of
  `gpu_shards` (`python benchmarks/gpu_bounds.py`, 2026-12-03, benchmarks/RESULTS.md): at most 22
  levels at any pixel (31 on tests/conftest.py's 4-class set), 1.93 on average, 2.09 for the worst
  batch of 32, 4.12 for the worst image. The bounds add a different IDCT's share (nvJPEG's is not
  libjpeg-turbo's): FAST_IDCT_MAX_LEVELS (8) to the max -> 30, the fast IDCT's ~1.0 mean to the
  batch mean -> 3.1, kept at 3.5 for batches drawn in another order. The samples and the drawn
  crop/flip/lighting are asserted equal exactly, so these bounds only have to catch a wrong decode
  or normalization (tens of levels over most pixels), not another sample.
- GPU_HOST_CPU_SHARE: with decoding on the GPU the host only reads tars, parses headers and runs
  nvJPEG's host half for the share the hardware decoder does not take; the CPU twin decodes,
  crops and normalizes every pixel on the host. A silent fall-back to CPU decoding would cost about
  the twin's CPU time; half of it is far above what the GPU path needs and far below a fall-back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu(dali=True)

CHROMA_MAX_LEVELS = 30.0       # any pixel, any channel, in 0..255 levels (measured 22 + 8: see above)
CHROMA_MEAN_LEVELS = 3.5       # mean over a batch's pixels (measured 2.09 worst batch + ~1.0: see above)
GPU_HOST_CPU_SHARE = 0.5       # GPU path's host CPU time per image / the CPU twin's, at most
BATCH = 32


def _spec(data: Path, **kw):
    from alexnet_fast.pipeline.loaders import LoaderSpec

    return LoaderSpec(data=str(data), **{"batch_size": BATCH, "workers": 4, **kw})


def _loader(data: Path, **kw):
    from alexnet_fast.pipeline.loaders import make_loader

    loader = make_loader(_spec(data, **kw))
    loader.with_params = True          # (images, labels, "<tar>:<key>" names, drawn params) per batch
    return loader


def _batches(loader, limit: int | None = None):
    out = []
    for i, (x, y, names, params) in enumerate(loader):
        if limit is not None and i == limit:
            break
        out.append((x.float().cpu() if x.is_cuda else x.float(), y.cpu(), list(names),
                    tuple(np.asarray(p) for p in params)))
    return out


def _levels(gpu: torch.Tensor, cpu: torch.Tensor, std_255, channel_dim: int) -> torch.Tensor:
    """|gpu - cpu| in 0..255 levels (the loaders output (x - mean) / std)."""
    shape = [1] * gpu.ndim
    shape[channel_dim] = 3
    return (gpu - cpu).abs() * torch.tensor(std_255, dtype=torch.float32).view(shape)


def _assert_same_samples_close_pixels(gpu_batches, cpu_batches, std_255, channel_dim=1):
    assert len(gpu_batches) == len(cpu_batches) > 0
    worst, means = 0.0, []
    for (xg, yg, ng, pg), (xc, yc, nc, pc) in zip(gpu_batches, cpu_batches):
        assert ng == nc, "GPU and CPU twin read other samples or another order"
        assert torch.equal(yg, yc)
        assert len(pg) == len(pc) and all(np.array_equal(a, b) for a, b in zip(pg, pc)), \
            "GPU and CPU twin drew other crop/flip/lighting parameters"
        assert xg.shape == xc.shape
        diff = _levels(xg, xc, std_255, channel_dim)
        worst, means = max(worst, float(diff.max())), means + [float(diff.mean())]
    assert worst <= CHROMA_MAX_LEVELS and max(means) <= CHROMA_MEAN_LEVELS, \
        f"GPU vs CPU twin pixels: max {worst:.2f} levels, worst batch mean {max(means):.3f} levels " \
        f"(bounds {CHROMA_MAX_LEVELS}, {CHROMA_MEAN_LEVELS})"


def _host_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)      # every thread of this process: DALI's too
    return usage.ru_utime + usage.ru_stime


def test_mixed_decoder_decodes_on_the_gpu(gpu_shards):
    """CUDA tensors of the asked dtype and layout, libnvjpeg loaded in this process, and host CPU
    time per image far below the twin's over steady-state batches (the pipeline build, set_epoch's
    rebuild and the first fill are outside the window)."""
    def cpu_ms_per_image(device: str) -> tuple[float, list]:
        loader = _loader(gpu_shards, device=device, dtype=torch.float16, channels_last=True)
        batches = iter(loader)
        seen = [next(batches)[0]]
        if device == "cuda":
            torch.cuda.synchronize()
        start, images = _host_cpu_seconds(), 0
        for x, y, _names, _params in batches:
            images += len(y)
            seen.append(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return 1000 * (_host_cpu_seconds() - start) / images, seen

    gpu_ms, gpu_out = cpu_ms_per_image("cuda")
    nvjpeg = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libnvjpeg.so" in line]
    assert nvjpeg, "libnvjpeg is not loaded after the GPU loader ran: DALI decoded on the CPU (docs/gpu.md)"
    cpu_ms, _ = cpu_ms_per_image("cpu")
    x = gpu_out[0]
    assert x.is_cuda and x.dtype == torch.float16 and x.shape[1:] == (3, 227, 227)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert gpu_ms <= GPU_HOST_CPU_SHARE * cpu_ms, \
        f"host CPU per image: GPU path {gpu_ms:.3f} ms vs CPU twin {cpu_ms:.3f} ms: decoding did not move to the GPU"


def test_train_batches_match_the_cpu_twin(gpu_shards):
    from alexnet_fast.pipeline.augment import ColorStats
    from alexnet_fast.pipeline.shardset import ShardSet

    std_255 = ColorStats.from_dict(ShardSet.open(gpu_shards).stats()).std_255
    for epoch in (0, 1):
        gpu, cpu = _loader(gpu_shards, device="cuda"), _loader(gpu_shards, device="cpu")
        gpu.set_epoch(epoch), cpu.set_epoch(epoch)
        _assert_same_samples_close_pixels(_batches(gpu), _batches(cpu), std_255)


@pytest.mark.parametrize("ten_crop", [False, True], ids=["centre", "ten-crop"])
def test_val_batches_match_the_cpu_twin(gpu_shards, ten_crop):
    from alexnet_fast.pipeline.augment import ColorStats
    from alexnet_fast.pipeline.shardset import ShardSet

    shards = ShardSet.open(gpu_shards)
    std_255 = ColorStats.from_dict(shards.stats()).std_255
    gpu = _batches(_loader(gpu_shards, split="val", device="cuda", ten_crop=ten_crop))
    cpu = _batches(_loader(gpu_shards, split="val", device="cpu", ten_crop=ten_crop))
    _assert_same_samples_close_pixels(gpu, cpu, std_255, channel_dim=2 if ten_crop else 1)
    names = [n for _, _, batch_names, _ in gpu for n in batch_names]
    assert len(names) == len(set(names)) == shards.num_samples("val")
    if ten_crop:
        assert gpu[0][0].shape[1:] == (10, 3, 227, 227)


@pytest.mark.parametrize("dtype,channels_last,rtol", [
    (torch.float16, False, 2.0 ** -10),          # one rounding to fp16 (11-bit significand)
    (torch.bfloat16, False, 2.0 ** -10 + 2.0 ** -7),   # fp16 in DALI, then fp16 -> bf16 in torch
    (torch.float32, True, 0.0),                  # the same values in another layout
    (torch.bfloat16, True, 2.0 ** -10 + 2.0 ** -7),
])
def test_dtypes_and_layouts_equal_fp32_nchw_up_to_rounding(gpu_shards, dtype, channels_last, rtol):
    reference = _loader(gpu_shards, device="cuda")
    other = _loader(gpu_shards, device="cuda", dtype=dtype, channels_last=channels_last)
    for (xr, _yr, nr, pr), (xo, _yo, no, po) in zip(reference, other):
        assert no == nr and xo.dtype == dtype and xo.is_cuda
        if channels_last:
            assert xo.is_contiguous(memory_format=torch.channels_last) and not xo.is_contiguous()
            assert xo.stride()[1] == 1
        torch.testing.assert_close(xo.float(), xr, rtol=rtol, atol=1e-6)


def test_resume_from_the_dali_checkpoint_continues_with_the_uninterrupted_batches(gpu_shards):
    """state_dict() after k batches, a new GPU loader resume()d from it: the next batches are the
    uninterrupted loader's (the same samples, parameters and pixels: one decoder, one device)."""
    k = 3
    straight = _batches(_loader(gpu_shards, device="cuda"))
    first = _loader(gpu_shards, device="cuda")
    for i, _batch in enumerate(first):
        if i + 1 == k:
            break
    state = first.state_dict()
    assert state["dali"] and state["batches"] == k
    resumed = _loader(gpu_shards, device="cuda")
    assert resumed.resume(0, k, state) is True
    rest = _batches(resumed)
    assert len(rest) == len(straight) - k
    for (xs, ys, ns, ps), (xr, yr, nr, pr) in zip(straight[k:], rest):
        assert ns == nr and torch.equal(ys, yr) and all(np.array_equal(a, b) for a, b in zip(ps, pr))
        torch.testing.assert_close(xr, xs, rtol=0, atol=0)


def test_a_jpeg_the_gpu_decoder_rejects_is_named_or_skipped_and_counted(damaged_gpu_shards):
    from alexnet_fast.pipeline.loaders import CorruptSampleError, make_loader

    copy, name, tar, key = damaged_gpu_shards
    spec = _spec(copy, device="cuda")
    with pytest.raises(CorruptSampleError) as error:
        for _ in make_loader(spec):
            pass
    assert tar in str(error.value) and f"key {key}" in str(error.value) and "\n" not in str(error.value)
    loader = make_loader(dataclasses.replace(spec, on_corrupt="skip"))
    loader.with_params = True
    names = [n for batch in loader for n in batch[2]]
    assert name not in names and len(set(names)) == len(names) == len(loader) * BATCH - 1
    assert loader.skipped == [name]


CLI = [sys.executable, "-m", "alexnet_fast.tools.cli"]
SIGTERM_AT = [sys.executable, str(Path(__file__).with_name("sigterm_at.py"))]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_cli_names_the_corrupt_jpeg_or_skips_and_counts_it(damaged_gpu_shards, tmp_path):
    copy, _name, tar, key = damaged_gpu_shards
    flags = [*CLI, "train", "--data", str(copy), "--device", "cuda", "--gpus", "1", "--arch", "alexnet-owt",
             "--batch-size", str(BATCH), "--epochs", "1", "--log-every", "1"]
    failed = subprocess.run([*flags, "--out", str(tmp_path / "error")], env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert tar in last and key in last and "Traceback" not in failed.stderr
    skipped = subprocess.run([*flags, "--out", str(tmp_path / "skip"), "--on-corrupt", "skip"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped_samples") == 1 for r in records)


def test_sigterm_mid_epoch_then_resume_on_the_gpu_pipeline(gpu_shards, tmp_path):
    """A real `train` on the GPU DALI loader gets SIGTERM right after its 2nd in-epoch checkpoint:
    it exits 0 with a checkpoint; --resume restores DALI's pipeline state (no replay) and ends
    where the uninterrupted run ends, with finite losses close to it (cuDNN autotuning picks
    kernels per run, so losses agree to rounding, not bit for bit: the batches' equality is
    asserted exactly by the loader-level resume test above)."""
    flags = ["--data", str(gpu_shards), "--device", "cuda", "--gpus", "1", "--arch", "alexnet-owt",
             "--batch-size", str(BATCH), "--epochs", "2", "--log-every", "1", "--ckpt-every", "3",
             "--dropout", "0", "--seed", "3", "--lr", "0.005"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = subprocess.run([*CLI, "train", *flags, "--out", str(straight)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    term = subprocess.run([*SIGTERM_AT, str(stopped), "last.pt", "2", "--", *CLI[1:], "train", *flags,
                           "--out", str(stopped)], env=_env(), capture_output=True, text=True, timeout=300)
    assert term.returncode == 0, term.stderr[-3000:]
    saved = torch.load(stopped / "last.pt", map_location="cpu", weights_only=False)
    assert 0 < saved["step_in_epoch"] < 16, "the stop was not mid-epoch"
    resumed = subprocess.run([*CLI, "train", *flags, "--out", str(stopped), "--resume"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "loader state restored" in resumed.stdout

    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r and "val_top1" not in r}

    a, b = losses(straight), losses(stopped)
    assert sorted(a) == sorted(b) and all(np.isfinite(list(b.values())))
    assert max(abs(a[s] - b[s]) for s in a) < 0.05


def test_borrowed_batches_are_dalis_buffers_and_stay_valid_while_held(gpu_shards):
    """The trainer's hand-off (borrow_buffers): DALI's output buffer through DLPack, no
    device-to-device copy into torch's memory, and not reused by DALI while a tensor holds it."""
    layout = dict(device="cuda", dtype=torch.float16, channels_last=True)
    copies = [x for x, *_ in _loader(gpu_shards, **layout)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    held = [x for x, *_ in _loader(gpu_shards, borrow_buffers=True, **layout)]   # all held to the end
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert grown < held[0].nelement() * held[0].element_size(), \
        f"torch allocated {grown} bytes for {len(held)} borrowed batches: they were copied"
    assert len(held) == len(copies) > 2 and all(torch.equal(a, b) for a, b in zip(held, copies))
