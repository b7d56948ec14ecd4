"""`--decode gpu | cpu`: where a GPU run decodes (LoaderSpec.decode), on the shard_set fixture.

On the CPU both values build the CPU twin's graph, so their batches must be equal exactly; the GPU
graph of `--decode cpu` (CPU decoder, then the augmentation on the GPU) is checked for its
operators' placement without a GPU here and run in tests/gpu/test_cpu_decode_gpu.py. The flag is
followed from each command's options (train, eval, profile) to the loader spec it builds.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from alexnet_fast.model.distributed import DistContext
from alexnet_fast.pipeline import dali_pipelines as dp
from alexnet_fast.pipeline.dali_loader import decode_config
from alexnet_fast.pipeline.loader_spec import GPU_LOADER_WORKERS_CAP, default_loader_workers
from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader
from alexnet_fast.tools.profile_config import ProfileConfig
from alexnet_fast.tools.profile_stages import decode_advice, train_loader_spec
from alexnet_fast.tools.profile_timing import StageResult

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _epoch(shard_set, **kw):
    """(images, labels, names, drawn params) of one epoch of a DALI CPU loader."""
    loader = make_loader(LoaderSpec(data=str(shard_set), batch_size=8, workers=1, seed=5, **kw))
    loader.with_params = True
    batches = list(loader)
    return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
            [n for b in batches for n in b[2]], [b[3] for b in batches])


@pytest.mark.parametrize("split, ten_crop", [("train", False), ("val", True)])
def test_decode_cpu_on_a_cpu_run_gives_the_same_batches_exactly(shard_set, split, ten_crop):
    """The CPU twin of `--decode cpu` is the CPU graph the loader always ran: same samples, same
    drawn crops, flips and lighting, bit-identical pixels for the same seed."""
    gpu_flag = _epoch(shard_set, split=split, ten_crop=ten_crop, decode="gpu")
    cpu_flag = _epoch(shard_set, split=split, ten_crop=ten_crop, decode="cpu")
    assert cpu_flag[2] == gpu_flag[2] and len(set(cpu_flag[2])) > 8
    assert torch.equal(cpu_flag[1], gpu_flag[1]) and torch.equal(cpu_flag[0], gpu_flag[0])
    for mine, theirs in zip(cpu_flag[3], gpu_flag[3]):
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs))
    assert decode_config(LoaderSpec(data=str(shard_set), decode="cpu")) == \
        decode_config(LoaderSpec(data=str(shard_set), decode="gpu"))      # one graph, not two equal ones


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_cpu_decode_gpu_graph_decodes_on_the_cpu_and_augments_on_the_gpu(shard_set, split):
    """`--decode cpu` on a GPU run, checked without a GPU: DALI places every operator when the graph
    is defined (`_build_graph`, the half of build() that needs no device; private API, as in
    test_pipeline's GPU-graph test): the decoder is the CPU one, crop_mirror_normalize the GPU one,
    and images and labels leave the pipeline on the GPU."""
    loader = make_loader(LoaderSpec(data=str(shard_set), split=split, batch_size=8))
    spec = dataclasses.replace(loader.spec, device="cuda", decode="cpu")
    decoder = decode_config(spec)
    assert decoder.on_gpu and decoder.cpu_decoder and not decoder.mixed and decoder.roi   # ROI: the CPU decoder's default
    args = dict(batch_size=8, num_threads=1, device_id=0, seed=1)
    out = dp.OutputConfig(fp16=True, channels_last=True)
    reader = loader._reader_config(loader._plan)
    build = dp.train_pipeline if split == "train" else dp.val_pipeline
    pipe = build(reader, decoder, out, loader.stats, **args)
    pipe._build_graph()
    images, labels, sources = pipe._graph_outputs
    assert (images.device, labels.device, sources.device) == ("gpu", "gpu", "cpu")
    specs = [repr(op.spec) for op in pipe._ops]
    decoders = [s for s in specs if s.startswith("OpSpec for decoders__ImageCrop")]
    normalizers = [s for s in specs if s.startswith("OpSpec for CropMirrorNormalize")]
    assert len(decoders) == 1 and "device: cpu" in decoders[0]
    assert len(normalizers) == 1 and "device: gpu" in normalizers[0]


def test_where_it_decodes_sets_the_threads_roi_and_resume_fingerprint(shard_set):
    """Decoding on the CPU cores of a GPU node takes the whole share of cores (no GPU cap), decodes
    only the crop window (the CPU decoder's default), and a DALI checkpoint taken with the other
    decoder is not restored (other pixels); a placement outside the choices is refused."""
    assert default_loader_workers("cuda", 1, cores=64, decode="cpu") == 64
    assert default_loader_workers("cuda", 1, cores=64, decode="gpu") == GPU_LOADER_WORKERS_CAP
    assert default_loader_workers("cpu", 1, cores=64, decode="gpu") == 64
    cuda = LoaderSpec(data=str(shard_set), device="cuda")
    assert dataclasses.replace(cuda, decode="cpu").decode_roi and not cuda.decode_roi
    assert cuda.decodes_on_gpu and not dataclasses.replace(cuda, decode="cpu").decodes_on_gpu
    assert not LoaderSpec(data=str(shard_set), decode="gpu").decodes_on_gpu      # a CPU run
    fingerprints = {decode: make_loader(LoaderSpec(data=str(shard_set), batch_size=8, decode=decode))._fingerprint()
                    for decode in ("gpu", "cpu")}
    assert fingerprints["gpu"] == fingerprints["cpu"]         # the same graph on the CPU: resumable across
    with pytest.raises(ValueError, match="decode must be 'gpu' or 'cpu', not 'other'"):
        make_loader(LoaderSpec(data=str(shard_set), decode="other"))


def _parsed(command, args: list[str]) -> dict:
    """The values click gives `command` for `args` (the real options, no run)."""
    return command.make_context(command.name, [str(a) for a in args]).params


def _commands_specs(shard_set, flags: list, profile_keys: tuple) -> tuple[list, object, object, ProfileConfig]:
    """The loader specs train (train and val), eval and profile build from `flags` (the real
    options, through each command's own config): (train's specs, eval's spec, profile's train
    spec, the resolved ProfileConfig, built from `profile_keys` of profile's options)."""
    from alexnet_fast.model.evaluate import EvalConfig, val_loader_spec
    from alexnet_fast.model.train import load_data
    from alexnet_fast.pipeline.shardset import ShardSet
    from alexnet_fast.tools.cmd_eval import eval_command
    from alexnet_fast.tools.cmd_profile import profile_command
    from alexnet_fast.tools.cmd_train import config_from_flags, train_command

    train = config_from_flags(None, _parsed(train_command, [*flags, "--batch-size", 8]))
    train_specs = [loader.spec for loader in load_data(train, CPU, ShardSet.open(shard_set), 8, "fp32")]
    values = _parsed(eval_command, [*flags, "--checkpoint", "unused.pt"])
    values.pop("as_json")
    eval_spec = val_loader_spec(EvalConfig(**values), CPU, scale_by_std=True)
    values = _parsed(profile_command, flags)
    profile = ProfileConfig(**{k: values[k] for k in ("data", "device", *profile_keys)}).resolved()
    return train_specs, eval_spec, train_loader_spec(profile, "dali"), profile


def test_the_flag_reaches_the_loader_of_train_eval_and_profile(shard_set):
    from alexnet_fast.tools.cmd_eval import eval_command
    from alexnet_fast.tools.cmd_profile import profile_command
    from alexnet_fast.tools.cmd_train import train_command

    train_specs, eval_spec, profile_spec, profile = _commands_specs(
        shard_set, ["--data", shard_set, "--decode", "cpu", "--device", "cpu"], ("decode",))
    assert [spec.decode for spec in train_specs] == ["cpu", "cpu"]
    assert eval_spec.decode == "cpu"
    assert profile_spec.decode == "cpu" and profile.placements == ("cpu",)
    for command in (train_command, eval_command, profile_command):
        assert _parsed(command, ["--data", shard_set, "--checkpoint", "x"] if command is eval_command
                       else ["--data", shard_set])["decode"] in ("gpu", None)     # train: None = the recipe's
        with pytest.raises(Exception, match="'other' is not one of 'gpu', 'cpu'"):
            _parsed(command, ["--decode", "other"])


def test_fast_idct_reaches_the_loader_of_train_eval_and_profile(shard_set):
    """`--fast-idct` (DALI's own fast IDCT option on the CPU decoder) from each command's options to
    the loader spec it builds; off unless asked for."""
    for asked in (True, False):
        flags = ["--data", shard_set, "--device", "cpu", *(["--fast-idct"] if asked else [])]
        train_specs, eval_spec, profile_spec, _ = _commands_specs(shard_set, flags, ("fast_idct",))
        assert [spec.fast_idct for spec in train_specs] == [asked, asked]
        assert decode_config(train_specs[0]).fast_idct is asked
        assert eval_spec.fast_idct is asked and profile_spec.fast_idct is asked


def test_a_dali_state_taken_with_the_other_idct_is_not_restored(shard_set):
    """The fast IDCT gives other pixels, so a mid-epoch DALI checkpoint taken with the exact one is
    not restored into a loader with the fast one (and back): the loader replays the epoch instead."""
    exact = make_loader(LoaderSpec(data=str(shard_set), batch_size=8, workers=1, seed=5))
    exact.set_epoch(0)
    batches = iter(exact)
    next(batches)
    state = exact.state_dict()
    for fast_idct, restored in ((True, False), (False, True)):
        loader = make_loader(LoaderSpec(data=str(shard_set), batch_size=8, workers=1, seed=5, fast_idct=fast_idct))
        assert loader.resume(0, 1, state) is restored


def _stage(img_per_s: float) -> StageResult:
    return StageResult(img_per_s, [img_per_s], 1)


@pytest.mark.parametrize("own, rates, model, needs, keeps_up", [
    ("gpu", {"gpu": 30_000, "cpu": 12_000}, 20_000, "gpu", True),      # the GPU's decoders keep up
    ("gpu", {"gpu": 15_000, "cpu": 25_000}, 20_000, "cpu", True),      # they do not; the cores do
    ("cpu", {"cpu": 25_000, "gpu": 30_000}, 20_000, "cpu", True),      # the run's own keeps up: kept
    ("gpu", {"gpu": 15_000, "cpu": 12_000}, 20_000, "gpu", False),     # neither: decode-bound, least at gpu
    ("cpu", {"cpu": 12_000, "gpu": 15_000}, None, "gpu", None),        # no model stage: the fastest
])
def test_the_profile_says_which_decode_placement_the_run_needs(own, rates, model, needs, keeps_up):
    cfg = ProfileConfig(device="cuda", decode=own)
    stages = {("decode" if p == own else f"decode_{p}"): _stage(r) for p, r in rates.items()}
    if model is not None:
        stages["model"] = _stage(model)
    advice = decode_advice(cfg, stages)
    assert advice["needs"] == needs and advice["img_per_s"] == rates and advice["model_img_per_s"] == model
    assert advice["keeps_up"] is (keeps_up if keeps_up is not None else False)
    assert decode_advice(cfg, {"model": _stage(1.0)}) is None        # no decode stage, no advice
