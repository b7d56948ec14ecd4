"""Evaluation: ten-crop averaging, whole-split counting, and `alexnet-fast eval` on a checkpoint,
in one process and over two (self-launched, and under an outer torchrun)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from alexnet_fast.model import checkpoint as ckpt
from alexnet_fast.model.alexnet import build_model
from alexnet_fast.model.evaluate import EvalResult, class_scores, evaluate
from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader
from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.tools.cli import main, run_command


EVAL = [sys.executable, "-m", "alexnet_fast.tools.cli", "eval"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "alexnet_fast.tools.cli", "eval"]


@pytest.fixture(scope="module")
def model(shard_set):
    """A random alexnet-owt whose output layer is centred on the val images' features. A plain
    random network calls every image the same class (its top-1 is one class's share, whichever
    images it sees); centred, its top-1 depends on which images it scores, so a count that drops
    one image or scores another twice shows. Of the seeds from 3 up, the first whose network scores
    the two halves of the val split differently (centre crop and ten-crop): then two ranks reading
    the same half could not pass for one process. Which seed that is depends on the sample's pixels."""
    for seed in range(3, 40):
        net = _centred_network(shard_set, seed)
        if all(len({h.top1 for h in _halves(net, shard_set, ten_crop)}) == 2 for ten_crop in (False, True)):
            return net
    pytest.fail("no seed in 3..39 gives a network that scores the two val halves differently")


def _halves(net, shard_set, ten_crop: bool) -> list:
    """EvalResult of each half of the val split (rank 0 and 1 of 2)."""
    return [evaluate(net, make_loader(LoaderSpec(data=str(shard_set), split="val", batch_size=8, workers=1,
                                                 ten_crop=ten_crop, rank=rank, world_size=2)))
            for rank in (0, 1)]


def _centred_network(shard_set, seed: int):
    torch.manual_seed(seed)
    net = build_model("alexnet-owt", 4).eval()
    head = net.classifier[6]
    features = []
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    with torch.no_grad():
        for images, _ in make_loader(LoaderSpec(data=str(shard_set), split="val", batch_size=16, workers=1)):
            net(images)
        hook.remove()
        head.bias.copy_(-head.weight @ torch.cat(features).mean(dim=0))
    return net


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    """`model` saved as a run directory's checkpoint (written once: ~220 MB)."""
    run = tmp_path_factory.mktemp("eval_run")
    ckpt.save_checkpoint({"model": model.state_dict(), "epoch": 1, "step": 10, "arch": "alexnet-owt",
                          "num_classes": 4}, run)
    return run / ckpt.LAST


def _eval_in_process(args: list[str], capsys) -> dict:
    """`alexnet-fast eval ... --json` in this process (one rank): the printed JSON."""
    with pytest.raises(SystemExit) as done:
        run_command(main, "alexnet-fast", ["eval", *map(str, args), "--json"])
    captured = capsys.readouterr()
    assert done.value.code == 0, captured.err
    return json.loads(captured.out)


def _eval_in_processes(command: list[str], args: list) -> subprocess.CompletedProcess:
    # one thread per rank: the two ranks share the 2-core CI machine
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_ten_crop_scores_average_the_softmax_of_the_ten_views(model):
    crops = torch.randn(2, 10, 3, 227, 227, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = class_scores(model, crops)
        by_hand = torch.stack([model(crops[i]).softmax(dim=1).mean(dim=0) for i in range(2)])
    assert scores.shape == (2, 4)
    assert torch.allclose(scores, by_hand, atol=1e-6)
    assert torch.allclose(scores.sum(dim=1), torch.ones(2))


def test_ten_crop_evaluation_covers_the_val_split_once(model, shard_set):
    total = ShardSet.open(shard_set).num_samples("val")
    ten = make_loader(LoaderSpec(data=str(shard_set), split="val", batch_size=6, ten_crop=True, workers=1))
    first = next(iter(ten))[0]
    assert first.shape == (6, 10, 3, 227, 227)
    result = evaluate(model, ten)
    assert result.images == total
    assert 0.0 <= result.top1 <= result.top5 <= 1.0
    # with 4 classes every label is in the top 5
    assert result.top5 == 1.0


def test_eval_command_reports_the_checkpoint_accuracy_as_json(model, shard_set, checkpoint, capsys):
    """The CLI loads the checkpoint's weights and scores the whole val split: its numbers must be
    those of evaluate() on the same weights, and a model that is wrong on purpose scores 0."""
    shards = ShardSet.open(shard_set)
    printed = _eval_in_process(["--data", shard_set, "--checkpoint", checkpoint.parent, "--device", "cpu",
                                "--workers", "1"], capsys)
    val = make_loader(LoaderSpec(data=str(shard_set), split="val", batch_size=7, workers=1))
    assert printed == evaluate(model, val).as_dict()
    assert printed["images"] == shards.num_samples("val")
    # --loader baseline (PIL decode, the NumPy crop) on the CPU: the same images, so the same counts
    assert _eval_in_process(["--data", shard_set, "--checkpoint", checkpoint.parent, "--device", "cpu",
                             "--workers", "1", "--loader", "baseline"], capsys) == printed

    # A model whose output ignores the image and always says "class 0": top-1 = share of class 0.
    fixed = build_model("alexnet-owt", 4)
    with torch.no_grad():
        head = fixed.classifier[6]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    labels = [int(label) for _, batch in val for label in batch]
    assert evaluate(fixed, val).top1 == pytest.approx(labels.count(0) / len(labels))


@pytest.mark.slow
@pytest.mark.parametrize("ten_crop, launcher", [(False, EVAL), (True, TORCHRUN)], ids=["centre-self-launched",
                                                                                    "ten-crop-under-torchrun"])
def test_two_processes_score_exactly_what_one_process_scores(ten_crop, launcher, model, shard_set, checkpoint,
                                                             capsys):
    """Two CPU ranks (gloo) each read half of the val split and sum their counts: the same top-1,
    top-5 and image count as one process, to the last bit. Started both ways a run starts: `--nproc
    2` (the command launches its own workers) and an outer torchrun (the command joins its ranks);
    either way one JSON line is printed, by rank 0 alone. Global batch 6 (3 per rank) gives each rank a ragged last
    batch (8 images: 3 + 3 + 2), whose trimmed padding must not be counted."""
    args = ["--data", shard_set, "--checkpoint", checkpoint, "--device", "cpu", "--workers", "1",
            "--batch-size", 6, *(["--ten-crop"] if ten_crop else [])]
    one = _eval_in_process(args, capsys)
    assert one["images"] == ShardSet.open(shard_set).num_samples("val") == 16
    # The halves score differently, so two ranks reading the same half could not pass for one process.
    halves = _halves(model, shard_set, ten_crop)
    assert [h.images for h in halves] == [8, 8] and halves[0].top1 != halves[1].top1
    two = _eval_in_processes(launcher, [*args, "--json", *(["--nproc", 2] if launcher is EVAL else [])])
    assert two.returncode == 0, two.stderr[-3000:]
    assert [json.loads(line) for line in two.stdout.splitlines()] == [one]


@pytest.mark.parametrize("flag, value, message", [("--nproc", "0", "0 is not in the range x>=1"),
                                                  ("--nproc", "two", "'two' is not a valid integer"),
                                                  ("--gpus", "-1", "-1 is not in the range x>=0")])
def test_bad_process_counts_are_one_line_exit_2(flag, value, message, shard_set, checkpoint, capsys):
    with pytest.raises(SystemExit) as done:
        run_command(main, "alexnet-fast", ["eval", "--data", str(shard_set), "--checkpoint", str(checkpoint),
                                           "--device", "cpu", flag, value])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and flag in err, err


@pytest.mark.slow
def test_a_corrupt_sample_on_one_rank_stops_both_with_its_name_or_is_skipped(shard_set, checkpoint, tmp_path):
    """Rank 1 hits a JPEG that does not decode while rank 0's half is fine: rank 0 must not wait for
    rank 1's counts forever. Both stop; rank 0 prints rank 1's error, naming the sample: one line,
    exit 1. With --on-corrupt skip the other 15 images are scored and the skip is said."""
    from reliability.faults import damage_jpeg

    damaged = tmp_path / "shards"
    shutil.copytree(shard_set, damaged)
    val = ShardSet.open(damaged).shards("val")[0]
    key = damage_jpeg(val.tar, val.index, row=12)           # in rank 1's half: samples 8..15
    args = ["--data", damaged, "--checkpoint", checkpoint, "--device", "cpu", "--workers", "1", "--nproc", 2,
            "--batch-size", 4]
    stopped = _eval_in_processes(EVAL, args)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert stopped.stdout == ""
    error = [line for line in stopped.stderr.splitlines() if line.startswith("alexnet-fast: error:")]
    assert len(error) == 1 and key in error[0] and "rank 1" in error[0], stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr

    skipped = _eval_in_processes(EVAL, [*args, "--on-corrupt", "skip", "--json"])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert json.loads(skipped.stdout)["images"] == 15
    assert "skipped 1 corrupt val image(s)" in skipped.stderr and "Traceback" not in skipped.stderr


# -- top-1 / top-5 with a known answer: more classes than 5, the ranks of the labels set by hand ------
CLASSES, SAMPLES = 10, 20


def _ranking_network(rankings: torch.Tensor) -> torch.nn.Module:
    """A network whose output layer holds, for sample i (its input is the one-hot image of i: i-th
    of SAMPLES channels, 1x1 pixels), the logits 10, 9, ..., 1 on the classes rankings[i, 0],
    rankings[i, 1], ...: it ranks the classes of every sample in a known order."""
    head = torch.nn.Linear(SAMPLES, CLASSES, bias=False)
    with torch.no_grad():
        for i, order in enumerate(rankings):
            head.weight[order, i] = torch.arange(CLASSES, 0, -1, dtype=torch.float32)
    return torch.nn.Sequential(torch.nn.Flatten(), head)


def test_top1_and_top5_count_the_labels_ranked_first_and_in_the_first_five():
    rankings = torch.stack([torch.randperm(CLASSES, generator=torch.Generator().manual_seed(i))
                            for i in range(SAMPLES)])
    label_rank = torch.arange(SAMPLES) % CLASSES             # ranks 0..9, each twice
    labels = rankings[torch.arange(SAMPLES), label_rank]
    # by hand: the label is ranked first for ranks 0 (2 samples), in the first five for ranks 0..4 (10)
    expected_top1, expected_top5 = 2 / SAMPLES, 10 / SAMPLES
    net = _ranking_network(rankings)
    one_hot = torch.eye(SAMPLES).view(SAMPLES, SAMPLES, 1, 1)                           # [B, C, H, W] images
    batches = [(one_hot[i:i + 8], labels[i:i + 8]) for i in range(0, SAMPLES, 8)]      # 8 + 8 + 4
    assert evaluate(net, batches) == EvalResult(expected_top1, expected_top5, SAMPLES)

    # Ten crops per sample: 7 views of the same order at different confidences, 3 with it reversed.
    # The average of the ten softmax distributions (float64 here, by hand) then ranks the classes
    # first, last, second, second-to-last, ...: the reversed views lift the sample's last classes.
    scales = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.8, 3.0, 1.2, -1.0, -0.6, -0.3])
    crops = one_hot[:, None] * scales.view(1, 10, 1, 1, 1)                              # [B, 10, C, H, W]
    with torch.no_grad():
        probs = net(crops.flatten(0, 1)).double().softmax(dim=1).view(SAMPLES, 10, CLASSES).mean(dim=1)
    interleaved = [0, 9, 1, 8, 2, 7, 3, 6, 5, 4]
    assert torch.equal(probs.argsort(dim=1, descending=True), rankings[:, interleaved])
    top = probs.sort(dim=1, descending=True).values
    assert (top[:, :-1] - top[:, 1:]).min() > 1e-5           # no tie that float32 rounding (~1e-8 here) could flip
    # labels at the (single-view) ranks 9, 8, 0 and 5: averaged, ranks 1, 3, 0 and 8
    label_rank = torch.tensor([9] * 4 + [8] * 4 + [0] * 2 + [5] * 10)
    labels = rankings[torch.arange(SAMPLES), label_rank]
    ten = [(crops[i:i + 8], labels[i:i + 8]) for i in range(0, SAMPLES, 8)]
    # top-1: the 2 at rank 0; top-5: also the 8 at ranks 9 and 8. Averaging logits, or scoring one
    # view, would find 2 in the top 5, not 10.
    assert evaluate(net, ten) == EvalResult(2 / SAMPLES, 10 / SAMPLES, SAMPLES)
