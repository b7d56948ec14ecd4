"""The DALI pipelines (CPU twin) and the baseline loader on the real shard set make_shards writes.

Reference images come from PIL (`baseline.decode_rgb`); DALI's CPU decoder and PIL both use
libjpeg-turbo with the same IDCT, so the decoded pixels are identical (asserted below) and the
loaders' outputs agree to float rounding: 1e-5 on normalized values, where one pixel level is
about 1 / (255 * 0.26) = 0.015 -- an off-by-one crop or a wrong flip is hundreds of times that.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from alexnet_fast.pipeline.augment import ColorStats, SampleParams, reference_augment, reference_ten_crop, centre_params
from alexnet_fast.pipeline.baseline import decode_rgb
from alexnet_fast.pipeline.dali_loader import DaliLoader
from alexnet_fast.pipeline.host import usable_cores
from alexnet_fast.pipeline.loader_spec import FAST_IDCT_MAX_LEVELS, GPU_LOADER_WORKERS_CAP, default_loader_workers
from alexnet_fast.pipeline.loaders import LOADER_KINDS, ON_CORRUPT_MODES, LoaderSpec, make_loader
from alexnet_fast.pipeline.shardset import ShardSet

FLOAT_TOL = 1e-3      # the bound for float math
SAME_DECODER_TOL = 1e-5


@pytest.fixture(scope="session")
def samples(shard_set):
    """'<tar>:<key>' -> (HWC uint8 pixels from PIL, class from .cls) for every sample of both splits."""
    out = {}
    shards = ShardSet.open(shard_set)
    for split in ("train", "val"):
        for shard in shards.shards(split):
            for s in wds.WebDataset(str(shard.tar), shardshuffle=False, empty_check=False):
                out[f"{shard.tar}:{s['__key__']}"] = (decode_rgb(s["jpg"]), int(s["cls"]))
    return out


@pytest.fixture(scope="session")
def stats(shard_set):
    return ColorStats.from_dict(ShardSet.open(shard_set).stats())


def _dali(shard_set, **kw) -> DaliLoader:
    loader = make_loader(LoaderSpec(data=str(shard_set), **{"batch_size": 8, **kw}))
    loader.with_params = True
    return loader


def _epoch(loader):
    """(images, labels, names, params) of one epoch, concatenated."""
    xs, ys, names, params = [], [], [], []
    for x, y, n, p in loader:
        xs.append(x), ys.append(y), names.extend(n), params.append(p)
    cat = tuple(np.concatenate(ps) for ps in zip(*params)) if params and params[0] else ()
    return torch.cat(xs), torch.cat(ys), names, cat


def test_train_augmentation_matches_the_numpy_reference(shard_set, samples, stats):
    images, labels, names, (crop_x, crop_y, mirror, alpha) = _epoch(_dali(shard_set, split="train"))
    assert images.shape[1:] == (3, 227, 227) and images.dtype == torch.float32 and labels.dtype == torch.int64
    # the drawn parameters really vary, so the comparison covers both flips and many crops/alphas
    assert set(mirror.tolist()) == {0, 1} and len(set(np.round(crop_x, 3))) > 10 and np.abs(alpha).max() > 0.05
    for i, name in enumerate(names):
        pixels, cls = samples[name]
        params = SampleParams(float(crop_x[i]), float(crop_y[i]), bool(mirror[i]), alpha[i])
        assert np.abs(images[i].numpy() - reference_augment(pixels, params, stats)).max() <= FLOAT_TOL, name
        assert labels[i] == cls


def test_lighting_is_the_eigen_formula_with_the_dataset_stats(shard_set, samples, stats):
    raw = ShardSet.open(shard_set).stats()
    eigvec, eigval = np.array(raw["eigvec"]), np.array(raw["eigval"])
    # the columns of eigvec are the eigenvectors of the covariance stats.json reports
    assert np.allclose(eigvec @ np.diag(eigval) @ eigvec.T, np.array(raw["covariance"]), atol=1e-9)
    images, _, names, (crop_x, crop_y, mirror, alpha) = _epoch(_dali(shard_set, split="train", lighting_std=0.5))
    for i in range(0, len(names), 7):
        pixels, _ = samples[names[i]]
        unlit = reference_augment(pixels, SampleParams(float(crop_x[i]), float(crop_y[i]), bool(mirror[i]), np.zeros(3)), stats)
        shift = (images[i].numpy() - unlit).reshape(3, -1)           # one constant per channel
        expected = sum(alpha[i][j] * eigval[j] * eigvec[:, j] for j in range(3)) / np.array(raw["std"])
        assert np.abs(shift - expected[:, None]).max() <= FLOAT_TOL


def test_val_centre_crop_and_ten_crop_match_the_reference_and_the_baseline(shard_set, samples, stats):
    for ten_crop in (False, True):
        dali = _epoch(_dali(shard_set, split="val", ten_crop=ten_crop, batch_size=5))
        base = torch.cat([x for x, _ in make_loader(LoaderSpec(data=str(shard_set), split="val", kind="baseline",
                                                               batch_size=5, ten_crop=ten_crop, workers=1))])
        assert base.shape == dali[0].shape == ((len(dali[2]), 10, 3, 227, 227) if ten_crop else (len(dali[2]), 3, 227, 227))
        assert (dali[0] - base).abs().max() <= SAME_DECODER_TOL
        for i in (0, len(dali[2]) - 1):
            pixels, _ = samples[dali[2][i]]
            ref = reference_ten_crop(pixels, stats) if ten_crop else reference_augment(pixels, centre_params(), stats)
            assert np.abs(dali[0][i].numpy() - ref).max() <= FLOAT_TOL


def test_dali_cpu_decoder_and_pil_decode_identical_pixels(shard_set, samples, stats):
    # crop the full 256x256 at zero mean / unit std would need a second graph; instead undo the
    # normalization of a val centre crop and compare integer pixels with PIL's
    images, _, names, _ = _epoch(_dali(shard_set, split="val"))
    pixels = images.numpy() * stats.std_255[None, :, None, None] + stats.mean_255[None, :, None, None]
    for i, name in enumerate(names):
        ref = samples[name][0][15:242, 15:242].transpose(2, 0, 1)   # DALI's centre: round-half-up of 14.5
        assert np.array_equal(np.rint(pixels[i]).astype(np.uint8), ref), name


@pytest.mark.parametrize("split, ten_crop", [("train", False), ("val", False), ("val", True)])
def test_roi_decoding_gives_the_full_decodes_batches_exactly(shard_set, split, ten_crop):
    """Decoding only the crop window: the same samples, the same drawn parameters (the random
    operators are unchanged, so seeds and checkpoints keep their meaning) and bit-identical images."""
    full = _epoch(_dali(shard_set, split=split, ten_crop=ten_crop, seed=3, roi_decode=False))
    roi = _epoch(_dali(shard_set, split=split, ten_crop=ten_crop, seed=3, roi_decode=True))
    assert roi[2] == full[2] and torch.equal(roi[1], full[1]) and torch.equal(roi[0], full[0])
    assert all(np.array_equal(a, b) for a, b in zip(roi[3], full[3]))
    assert LoaderSpec(data=str(shard_set)).decode_roi and not LoaderSpec(data=str(shard_set), device="cuda").decode_roi


def test_fast_idct_stays_within_its_stated_bound_of_the_exact_decode(shard_set, stats):
    """fast_idct (libjpeg-turbo's integer IDCT) changes pixels, by at most FAST_IDCT_MAX_LEVELS
    levels: the val centre crops of every val image, de-normalized back to 0..255."""
    exact, _, names, _ = _epoch(_dali(shard_set, split="val"))
    fast, _, fast_names, _ = _epoch(_dali(shard_set, split="val", fast_idct=True))
    assert fast_names == names
    levels = ((fast - exact) * torch.tensor(stats.std_255, dtype=torch.float32).view(1, 3, 1, 1)).abs()
    assert 0 < levels.max() <= FAST_IDCT_MAX_LEVELS + SAME_DECODER_TOL
    assert levels.mean() < 1.5          # ~1 level on average (measured 1.02): rounding, not another image


def test_layouts_and_dtypes(shard_set):
    for kind in ("dali", "baseline"):
        spec = LoaderSpec(data=str(shard_set), split="val", kind=kind, batch_size=6, workers=1)
        ref, _ = next(iter(make_loader(spec)))
        for dtype in (torch.float16, torch.bfloat16):
            x, y = next(iter(make_loader(dataclasses.replace(spec, dtype=dtype, channels_last=True))))
            assert x.dtype == dtype and y.dtype == torch.int64 and x.shape == ref.shape
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert (x.float() - ref).abs().max() <= 0.02 * ref.abs().max()   # half-precision rounding only


def test_a_batch_with_rows_left_out_keeps_its_layout(shard_set):
    """Rows of left-out samples are dropped from the batch (index_select); the rest stay
    channels-last and bit-identical to the same rows of the full batch."""
    layout = dict(split="val", batch_size=6, workers=1, channels_last=True, dtype=torch.bfloat16)
    full, _, names, _ = next(iter(_dali(shard_set, **layout)))
    loader = _dali(shard_set, **layout)
    loader.exclude([names[1]])
    x, _, kept, _ = next(iter(loader))
    assert kept == [names[0], *names[2:]] and loader.skipped == [names[1]]
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, full[[0, 2, 3, 4, 5]])


def test_borrowed_batches_stay_valid_while_held(shard_set):
    """A borrowed batch is DALI's own output buffer (DLPack, no copy): DALI's dynamic executor must
    not reuse it while it is held, even across later batches and the prefetch queue's turns."""
    layout = dict(split="train", batch_size=8, workers=1, channels_last=True, dtype=torch.float16)
    held = [x for x, *_ in _dali(shard_set, borrow_buffers=True, **layout)]
    copies = [x for x, *_ in _dali(shard_set, **layout)]
    assert len(held) == len(copies) > 2 and len({x.data_ptr() for x in held}) == len(held)
    assert all(torch.equal(a, b) for a, b in zip(held, copies))


def test_every_sample_exactly_once_across_two_ranks(shard_set, samples):
    shards = ShardSet.open(shard_set)
    for split, batch in (("val", 3), ("train", 5)):
        every = {name for name in samples if ":" in name and f"/{split}-" in name}
        seen, lengths = [], []
        for rank in (0, 1):
            loader = _dali(shard_set, split=split, batch_size=batch, rank=rank, world_size=2)
            loader.set_epoch(3)
            images, labels, names, _ = _epoch(loader)
            assert len(names) == loader.num_samples
            # batches: val's last one may be partial (ceil), train keeps full ones only (floor)
            full, rest = divmod(loader.num_samples, batch)
            assert len(loader) == (full + (rest > 0) if split == "val" else full) and (split == "val" or rest == 0)
            assert [samples[n][1] for n in names] == labels.tolist()
            seen += names
            lengths.append(len(loader))
        assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
        if split == "val":      # exact: every sample once, no padding duplicates
            assert set(seen) == every and len(seen) == shards.num_samples("val")
        else:                   # full batches only, the same count on both ranks, nothing outside the split
            assert lengths[0] == lengths[1] == (shards.num_samples("train") // 2) // batch and set(seen) <= every
        base = [make_loader(LoaderSpec(data=str(shard_set), split=split, kind="baseline", batch_size=batch,
                                       rank=r, world_size=2)) for r in (0, 1)]
        base_labels = [[int(y) for _, ys in b for y in ys] for b in base]
        if split == "val":      # the baseline's val: every label once over the two ranks
            assert sorted(base_labels[0] + base_labels[1]) == sorted(samples[n][1] for n in every)
            assert sum(b.num_samples for b in base) == len(every)
        else:                   # its train: the same count of full batches on both ranks
            assert [len(b) for b in base] == lengths and [len(ys) for ys in base_labels] == [lengths[0] * batch] * 2
            assert [b.num_samples for b in base] == [lengths[0] * batch] * 2


def test_fixed_seed_is_deterministic_and_epochs_differ(shard_set):
    def epoch(loader, e):
        loader.set_epoch(e)
        return _epoch(loader)

    first = _dali(shard_set, split="train", seed=7)
    epoch(first, 0)
    again = epoch(first, 1)                         # after a full epoch 0 ...
    fresh = epoch(_dali(shard_set, split="train", seed=7), 1)   # ... or straight to epoch 1 (a resume)
    assert again[2] == fresh[2] and torch.equal(again[0], fresh[0])
    assert epoch(first, 2)[2] != again[2]           # a new epoch, a new order
    assert epoch(_dali(shard_set, split="train", seed=8), 1)[2] != again[2]


def _damage(shard_set, tmp_path, split):
    """A copy of the shard set whose 3rd sample of the 2nd shard of `split` has a destroyed JPEG header."""
    import shutil

    from reliability.faults import damage_jpeg

    copy = tmp_path / "damaged"
    shutil.copytree(shard_set, copy)
    shards = ShardSet.open(copy).shards(split)
    shard = shards[min(1, len(shards) - 1)]
    key = damage_jpeg(shard.tar, shard.index, row=2)
    return copy, f"{shard.tar}:{key}", shard.tar.name, key


@pytest.mark.parametrize("kind", ["dali", "baseline"])
def test_corrupt_sample_is_named_or_skipped_and_counted(shard_set, tmp_path, kind):
    from alexnet_fast.pipeline.loaders import CorruptSampleError

    copy, name, tar, key = _damage(shard_set, tmp_path, "train")
    spec = LoaderSpec(data=str(copy), split="train", kind=kind, batch_size=4, workers=1)
    with pytest.raises(CorruptSampleError) as error:
        list(make_loader(spec))
    assert tar in str(error.value) and f"key {key}" in str(error.value) and "\n" not in str(error.value)

    loader = make_loader(dataclasses.replace(spec, on_corrupt="skip"))
    if kind == "dali":
        loader.with_params = True
        names = [n for batch in loader for n in batch[2]]
        assert name not in names and len(names) == len(loader) * 4 - 1 and len(set(names)) == len(names)
    else:
        assert sum(len(y) for _, y in loader) == len(loader) * 4
    assert loader.num_skipped == 1 and loader.skipped == [name]


def test_corrupt_val_sample_skipped_keeps_the_rest_exactly_once(shard_set, tmp_path, samples):
    copy, name, _, _ = _damage(shard_set, tmp_path, "val")
    loader = _dali(copy, split="val", batch_size=4, on_corrupt="skip")
    names = [n for batch in loader for n in batch[2]]
    expected = {n.replace(str(shard_set), str(copy)) for n in samples if "/val-" in n} - {name}
    assert sorted(names) == sorted(expected) and loader.num_samples == len(expected)


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_gpu_graph_is_well_formed_without_a_gpu(shard_set, split):
    """The GPU branch (mixed decoder, GPU crop/mirror/normalize, ten-crop stack, labels moved to the
    device) cannot run without CUDA, but DALI checks every operator's argument names and the device
    placement of its inputs when the Python graph is defined, which needs no device: a misspelt
    argument or a CPU operator fed GPU data fails here. `_build_graph` is the graph-definition half
    of `build()`, without the backend that needs CUDA (private DALI API, hence only in this test)."""
    from alexnet_fast.pipeline import dali_pipelines as dp

    loader = make_loader(LoaderSpec(data=str(shard_set), split=split, batch_size=8))
    reader = loader._reader_config(loader._plan)
    out = dp.OutputConfig(fp16=True, channels_last=True)
    args = dict(batch_size=8, num_threads=1, device_id=0, seed=1)
    if split == "train":
        pipe = dp.train_pipeline(reader, dp.DecodeConfig(on_gpu=True), out, loader.stats, enable_checkpointing=True,
                                 **args)
    else:
        pipe = dp.val_pipeline(reader, dp.DecodeConfig(on_gpu=True), out, loader.stats, ten_crop=True, **args)
    assert pipe.exec_dynamic      # the GPU path hands DALI torch's stream (DaliLoader._run): needs it
    pipe._build_graph()
    images, labels, sources = pipe._graph_outputs
    assert (images.device, labels.device, sources.device) == ("gpu", "gpu", "cpu")
    decoder = next(op for op in pipe._ops if repr(op.spec).startswith("OpSpec for decoders__Image"))
    assert "device: mixed" in repr(decoder.spec) and "hw_decoder_load: 0.75" in repr(decoder.spec)
    if split == "train":        # ROI decoding on the GPU (off by default there): the mixed image_crop
        pipe = dp.train_pipeline(reader, dp.DecodeConfig(on_gpu=True, roi=True), out, loader.stats, **args)
        pipe._build_graph()
        decoder = next(op for op in pipe._ops if repr(op.spec).startswith("OpSpec for decoders__ImageCrop"))
        assert "device: mixed" in repr(decoder.spec)
    check = dp.decode_check_pipeline(on_gpu=True, **args)      # the corrupt-sample check's GPU twin
    check._build_graph()
    assert [o.device for o in check._graph_outputs] == ["gpu"]


@pytest.mark.parametrize("kind", ["dali", "baseline"])
def test_mean_only_normalization_is_the_std_scaled_input_times_the_std(shard_set, stats, kind):
    """scale_by_std=False (the paper's centred raw RGB) changes only the divisor: the same batch,
    each channel multiplied by its std on the 0..255 scale."""
    def batch(scale_by_std):
        spec = LoaderSpec(data=str(shard_set), split="train", kind=kind, batch_size=8, seed=4, workers=1,
                          scale_by_std=scale_by_std)
        return next(iter(make_loader(spec)))[0]

    scaled, raw = batch(True), batch(False)
    std = torch.tensor(stats.std_255, dtype=torch.float32).view(1, 3, 1, 1)
    assert raw.abs().max() > 50                                  # raw-scale values, not unit variance
    torch.testing.assert_close(raw, scaled * std, rtol=1e-4, atol=1e-3)


def test_make_loader_reads_the_shard_set_it_is_given(shard_set, tmp_path):
    """A process opens manifest.json once and hands the ShardSet on; one of another directory is
    a caller's mistake, refused."""
    opened = ShardSet.open(shard_set)
    spec = LoaderSpec(data=str(shard_set), split="val", batch_size=8, workers=1)
    for kind in LOADER_KINDS:
        assert make_loader(dataclasses.replace(spec, kind=kind), opened).shard_set is opened
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(opened.manifest))
    with pytest.raises(ValueError, match="is not the spec's data"):
        make_loader(spec, ShardSet.open(other))


@pytest.mark.parametrize("field, choices", [("kind", LOADER_KINDS), ("on_corrupt", ON_CORRUPT_MODES)])
def test_a_spec_outside_the_choices_is_refused_naming_them(shard_set, field, choices):
    assert len(choices) == 2
    spec = LoaderSpec(data=str(shard_set), **{field: "other"})
    with pytest.raises(ValueError, match=f"must be '{choices[0]}' or '{choices[1]}', not 'other'"):
        make_loader(spec)


def test_default_loader_workers_share_the_cores_among_the_local_ranks():
    assert default_loader_workers("cpu", 2, cores=16) == 8
    assert default_loader_workers("cpu", 1, cores=64) == 64             # the CPU twin decodes: no cap
    assert default_loader_workers("cuda", 1, cores=64) == GPU_LOADER_WORKERS_CAP == 8
    assert default_loader_workers("cuda", 8, cores=64) == 8
    assert default_loader_workers("cuda", 8, cores=32) == 4
    assert default_loader_workers("cpu", 4, cores=2) == 1               # never below one
    assert 1 <= default_loader_workers("cpu") == usable_cores()
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        default_loader_workers("gpu", 1)
    with pytest.raises(ValueError, match="local_ranks must be at least 1"):
        default_loader_workers("cuda", 0)
