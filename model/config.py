"""Training configuration: one typed dataclass, four recipes, a TOML file on top.

Resolution order (later wins):  dataclass defaults < recipe preset < TOML config file < CLI flags.

    cfg = resolve_config(recipe="fast", config_file="run.toml", overrides={"lr": 0.02})

A recipe sets every field in RECIPE_FIELDS (architecture, init, input scaling, augmentation, batch,
optimizer, lr schedule, length, evaluation) to its source's value, and says where each value comes
from: `paper` (Krizhevsky et al. 2012), `bvlc` (BVLC Caffe models/bvlc_alexnet), `torchvision`
(pytorch/vision references/classification), `fast` (this project's). `alexnet-fast recipes` prints
them; docs/recipes.md explains them.

Every field of `TrainConfig` is a flag of `alexnet-fast train` (`batch_size` -> `--batch-size`),
generated in tools/flags.py from the field's type and its `help`/`choices` metadata, so the two
can't drift. Nothing here knows about the command line: a bad value raises `ConfigError` naming
the field, and the command turns it into a usage error naming the flag.
"""
from __future__ import annotations

import dataclasses
import json
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from alexnet_fast.model.alexnet import ARCH_NAMES, INIT_NAMES, RAW_SCALE_INITS, resolve_init
from alexnet_fast.model.parallel import PARALLEL_NAMES, Parallel
from alexnet_fast.model.runtime import DECODE_HELP, DEVICES, FAST_IDCT_HELP, PRECISIONS
from alexnet_fast.pipeline.loader_spec import DECODE_PLACEMENTS, LOADER_KINDS, ON_CORRUPT_MODES

# The paper's reference batch: lr values in the `fast` recipe are "per 128 images" and scale linearly
# (Goyal et al. 2017) with the global batch.
REFERENCE_BATCH = 128


class ConfigError(ValueError):
    """A config value no run can use. `field` names it (a TrainConfig field, or "config" for the
    TOML file itself); the message says what is wrong with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Recipe(str, Enum):
    PAPER = "paper"
    BVLC = "bvlc"
    TORCHVISION = "torchvision"
    FAST = "fast"


# What `alexnet-fast train` starts from without --recipe: one that learns on the demo sample within
# its first epoch (measured: docs/recipes.md), unlike `paper`, whose init sits at loss log(C).
DEFAULT_RECIPE = Recipe.FAST


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # --- what to train on / where to write
    data: str = _f("", "shard set directory (has manifest.json)")
    out: str = _f("runs/alexnet", "run directory: checkpoints, config.json, metrics.jsonl")
    arch: str = _f("alexnet2012", "network", choices=ARCH_NAMES)
    num_classes: int = _f(0, "output classes; 0 = as many as the shard set has")
    init: str = _f("default", "weights: paper (N(0,0.01), bias 1), bvlc (N(0,0.01), fc6/fc7 N(0,0.005), bias "
                              "0.1), torch (torch's layer defaults), kaiming (He-normal, zero head); default = "
                              "the network's own (alexnet2012: paper, alexnet-bvlc: bvlc, alexnet-owt: torch)",
                   choices=INIT_NAMES)
    # --- recipe
    recipe: str = _f("paper", "preset every other value starts from (`alexnet-fast recipes` shows them with their "
                              "sources): paper = Krizhevsky et al. 2012 exactly (its init sits at loss log(C): on "
                              "the demo sample it jumps to 33, is back at log(C) by step 12 and at chance "
                              "through step 40, docs/recipes.md), bvlc = BVLC "
                              "Caffe bvlc_alexnet, torchvision = torchvision's alexnet reference, fast = this "
                              "project's large-batch schedule", choices=tuple(r.value for r in Recipe))
    epochs: int = _f(90, "epochs to train")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = no limit; bvlc: Caffe's "
                           "max_iter); small values make smoke runs")
    batch_size: int = _f(128, "GLOBAL batch size, split evenly over all ranks (must divide by the world size)")
    lr: float = _f(0.01, "learning rate (with --scale-lr: the lr per 128 images, scaled linearly to the batch)")
    scale_lr: bool = _f(False, "scale --lr linearly with the global batch (lr * batch/128)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay")
    no_decay_bias_norm: bool = _f(False, "no weight decay on biases and normalization parameters")
    bias_lr_mult: float = _f(1.0, "biases (and normalization parameters) learn at this multiple of the lr "
                                  "(Caffe's lr_mult: 2)")
    schedule: str = _f("plateau", "lr schedule", choices=("plateau", "step", "cosine"))
    warmup_epochs: float = _f(0.0, "linear lr warm-up from 0, in epochs (step/cosine schedules)")
    plateau_patience: int = _f(3, "plateau: evaluations (every --eval-every epochs) without val-error improvement "
                                  "before lr /= 10; epochs when there is no val split")
    max_lr_drops: int = _f(3, "plateau: at most this many lr drops (the paper: 3)")
    step_epochs: int = _f(30, "step schedule: lr /= 10 every this many epochs")
    step_iters: int = _f(0, "step schedule: lr /= 10 every this many optimizer steps instead of --step-epochs "
                            "(Caffe's stepsize); 0 = use --step-epochs")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    dropout: float = _f(0.5, "dropout on the hidden FC layers (0 disables; tests use 0 for exact comparisons)")
    seed: int = _f(0, "random seed (rank r uses seed + r for dropout)")
    # --- data
    loader: str = _f("dali", "data loader", choices=LOADER_KINDS)
    workers: int = _f(0, "loader threads/workers per rank; 0 = the cores per rank (pipeline default)")
    decode: str = _f("gpu", DECODE_HELP, choices=DECODE_PLACEMENTS)
    fast_idct: bool = _f(False, FAST_IDCT_HELP)
    lighting_std: float = _f(0.1, "PCA lighting alpha ~ N(0, std); 0 disables")
    normalize: str = _f("auto", "input: 'mean' subtracts the mean pixel only (the paper's centred raw RGB, "
                                "0..255 scale), 'mean-std' also divides by the per-channel std; auto = mean for "
                                "alexnet2012 with the paper's init (tuned for that scale), else mean-std",
                        choices=("auto", "mean", "mean-std"))
    ten_crop: bool = _f(False, "validate on 10 crops per image (4 corners + centre and their flips, softmax "
                               "averaged: the paper's test) instead of the centre crop")
    on_corrupt: str = _f("error", "a corrupt sample: stop with its name, or skip and count it", choices=ON_CORRUPT_MODES)
    verify_shards: bool = _f(False, "first hash every shard against the manifest (reads the set once) to catch "
                                    "images that changed but still decode; --on-corrupt applies to them")
    # --- devices and speed
    device: str = _f("auto", "auto = cuda when available", choices=DEVICES)
    gpus: int = _f(0, "GPUs (one process each); 0 = every visible GPU")
    nproc: int = _f(1, "CPU mode: processes (gloo)")
    precision: str = _f("auto", "auto = bf16 autocast on GPU, fp32 on CPU", choices=PRECISIONS)
    channels_last: bool = _f(True, "channels-last memory format (faster convolutions)")
    compile: bool = _f(False, "torch.compile the model")
    grad_compression: str = _f("none", "DDP gradient all-reduce compression", choices=("none", "bf16"))
    parallel: str = _f("ddp", "how the ranks split the network (docs/parallelism.md): ddp = a whole replica per rank, "
                              "gradients all-reduced; columns = the 2012 paper's two columns, 2 ranks per replica "
                              "(alexnet2012/alexnet-bvlc, an even number of ranks); hybrid = 2014's one weird trick: "
                              "convolutions data-parallel, FC layers split by neuron across all ranks, fed every rank's rows at "
                              "once (its scheme (a)); hybrid-pipelined = the same, fed one rank's rows at a time while the "
                              "next rank's travel (its scheme (b))",
                       choices=PARALLEL_NAMES)
    # --- logging and checkpoints
    log_every: int = _f(50, "log (and sync the host) every this many steps")
    ckpt_every: int = _f(0, "also checkpoint every this many steps inside an epoch (0 = epoch ends only)")
    stop_check_every: int = _f(0, "a multi-rank run checks for SIGTERM/SIGINT every this many steps (one tiny "
                                  "all-reduce, read a check later) and at every epoch's end; 0 = 10 on GPUs, 1 on "
                                  "CPU; one process checks every step")
    eval_every: int = _f(1, "evaluate every this many epochs (and always the final one); recipes keep evaluation "
                            "<= 5% of the training FLOPs at ImageNet scale (paper, 10 crops: 3)")
    resume: bool = _f(False, "continue from OUT/last.pt (the previous good one if it is damaged)")
    allow_other_data: bool = _f(False, "with --resume: continue on a shard set other than the one the run was "
                                       "trained on (same classes; an epoch in progress goes on in the new set's order)")
    init_from: str = _f("", "start from the weights of this checkpoint file (e.g. RUN/best.pt: what to do when "
                            "every last*.pt of a run is damaged); optimizer, lr schedule and step count start afresh")

    # derived ------------------------------------------------------------------------------------
    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch_size / REFERENCE_BATCH if self.scale_lr else self.lr

    @property
    def scale_by_std(self) -> bool:
        return input_scaled_by_std(self.arch, self.init, self.normalize)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ConfigError naming the field for values no run can use."""
        positive = ["epochs", "batch_size", "log_every", "eval_every", "nproc", "step_epochs"]
        non_negative = ["max_steps", "num_classes", "ckpt_every", "gpus", "warmup_epochs", "workers",
                        "plateau_patience", "max_lr_drops", "weight_decay", "momentum", "lighting_std",
                        "step_iters", "stop_check_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not self.bias_lr_mult > 0:
            raise ConfigError("bias_lr_mult", f"must be > 0, got {self.bias_lr_mult}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        for name in FIELD_CHOICES:
            if getattr(self, name) not in FIELD_CHOICES[name]:
                raise ConfigError(name, f"{getattr(self, name)!r} is not one of {', '.join(FIELD_CHOICES[name])}")
        self._validate_parallel()

    def _validate_parallel(self) -> None:
        """The split schemes run their own collectives: no DDP comm hook, no torch.compile of them."""
        if self.parallel == Parallel.DDP.value:
            return
        if self.parallel == Parallel.COLUMNS.value and self.arch not in COLUMN_ARCHS:
            raise ConfigError("parallel", f"columns splits the 2012 network's two columns: --arch "
                                          f"{' or '.join(COLUMN_ARCHS)}, not {self.arch}")
        if self.grad_compression != "none":
            raise ConfigError("grad_compression", "compresses DDP's all-reduce: only with --parallel ddp")
        if self.compile:
            raise ConfigError("compile", "compiles the DDP network: only with --parallel ddp")


# the networks with the 2012 paper's two columns (grouped conv2/4/5)
COLUMN_ARCHS: tuple[str, ...] = ("alexnet2012", "alexnet-bvlc")
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES: dict[str, type] = typing.get_type_hints(TrainConfig)
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    name: f.metadata["choices"] for name, f in FIELDS.items() if "choices" in f.metadata
}



@dataclass(frozen=True)
class Sourced:
    """One recipe value and where it comes from (a paper section, a file and line, or a reason)."""
    value: Any
    source: str


# The values every recipe sets (the rest — data, devices, logging — are the run's, not the recipe's).
RECIPE_FIELDS: tuple[str, ...] = (
    "arch", "init", "normalize", "lighting_std", "batch_size", "lr", "scale_lr", "momentum", "weight_decay",
    "no_decay_bias_norm", "bias_lr_mult", "schedule", "warmup_epochs", "plateau_patience", "max_lr_drops",
    "step_epochs", "step_iters", "epochs", "max_steps", "dropout", "label_smoothing", "ten_crop", "eval_every",
)

# What evaluation costs at full-ImageNet scale, as a share of the training it interrupts: the 50,000
# ILSVRC-2012 val images, each a forward pass per crop, against 1,281,167 train images per epoch,
# each a training step of ~3 forward passes (forward + backward at twice its FLOPs). A recipe's
# eval_every is the smallest that keeps this at or under EVAL_COST_BUDGET (issue 15): 1.3% per
# epoch for a centre crop, 13.0% for ten crops, so ten-crop validation evaluates every 3rd epoch.
IMAGENET_VAL_IMAGES = 50_000
IMAGENET_TRAIN_IMAGES = 1_281_167
FORWARD_SHARE_OF_STEP = 1 / 3
EVAL_COST_BUDGET = 0.05


def eval_cost_fraction(crops: int, eval_every: int) -> float:
    """Evaluation FLOPs over training FLOPs of a full-ImageNet run that evaluates every
    `eval_every` epochs on `crops` crops per val image (the always-evaluated final epoch aside)."""
    return IMAGENET_VAL_IMAGES * crops * FORWARD_SHARE_OF_STEP / (IMAGENET_TRAIN_IMAGES * eval_every)


_PAPER = "Krizhevsky, Sutskever, Hinton, NIPS 2012"
_PAPER_SEC5 = f"{_PAPER}, sec. 5 (details of learning)"
_BVLC = "BVLC/caffe models/bvlc_alexnet"
_BVLC_NET = f"{_BVLC}/train_val.prototxt"
_BVLC_SOLVER = f"{_BVLC}/solver.prototxt"
_TV = "pytorch/vision references/classification"
_TV_TRAIN = f"{_TV}/train.py"
_TV_README = f"{_TV}/README.md"
_UNUSED = "unused by this recipe's schedule"

RECIPES: dict[Recipe, dict[str, Sourced]] = {
    Recipe.PAPER: {
        "arch": Sourced("alexnet2012", f"{_PAPER}, sec. 3 and fig. 2 (two columns: conv2/4/5 see their own GPU)"),
        "init": Sourced("paper", _PAPER_SEC5 + ": N(0, 0.01), bias 1 in conv2/4/5 and the hidden FC layers"),
        "normalize": Sourced("mean", f"{_PAPER}, sec. 2: \"the (centered) raw RGB values\""),
        "lighting_std": Sourced(0.1, f"{_PAPER}, sec. 4.1: PCA lighting, alpha ~ N(0, 0.1)"),
        "batch_size": Sourced(128, _PAPER_SEC5 + ": batch size of 128 examples"),
        "lr": Sourced(0.01, _PAPER_SEC5 + ": learning rate initialized at 0.01"),
        "scale_lr": Sourced(False, _PAPER_SEC5 + ": one lr for the paper's batch"),
        "momentum": Sourced(0.9, _PAPER_SEC5 + ": momentum of 0.9"),
        "weight_decay": Sourced(5e-4, _PAPER_SEC5 + ": weight decay of 0.0005"),
        "no_decay_bias_norm": Sourced(False, _PAPER_SEC5 + ": the update rule decays every weight w"),
        "bias_lr_mult": Sourced(1.0, _PAPER_SEC5 + ": an equal learning rate for all layers"),
        "schedule": Sourced("plateau", _PAPER_SEC5 + ": divide by 10 when the validation error stopped improving"),
        "warmup_epochs": Sourced(0.0, _PAPER_SEC5 + ": no warm-up"),
        "plateau_patience": Sourced(3, "not in the paper (it says \"stopped improving\"): this project's reading; "
                                       "counted in evaluations (every 3rd epoch here: lr drops after 4 evaluations "
                                       "= 12 epochs without improvement)"),
        "max_lr_drops": Sourced(3, _PAPER_SEC5 + ": reduced three times prior to termination"),
        "step_epochs": Sourced(30, _UNUSED + " (plateau)"),
        "step_iters": Sourced(0, _UNUSED + " (plateau)"),
        "epochs": Sourced(90, _PAPER_SEC5 + ": roughly 90 cycles through the training set"),
        "max_steps": Sourced(0, _PAPER_SEC5 + ": length in epochs, no step limit"),
        "dropout": Sourced(0.5, f"{_PAPER}, sec. 4.2: dropout 0.5 in the first two FC layers"),
        "label_smoothing": Sourced(0.0, f"{_PAPER}: plain multinomial logistic regression (sec. 5)"),
        "ten_crop": Sourced(True, f"{_PAPER}, sec. 4.1: test on ten 224x224 patches, softmax averaged"),
        "eval_every": Sourced(3, "not in the paper: 10 crops cost 13.0% of an epoch's training FLOPs per "
                                 "evaluation; every 3rd epoch keeps it at 4.3% (every 2nd: 6.5%)"),
    },
    Recipe.BVLC: {
        "arch": Sourced("alexnet-bvlc", f"{_BVLC_NET}: paper's layers and order (norm before pool), group 2 "
                                        f"(l.112, 201, 235), Caffe LRN (l.79-81, 135-137: alpha/n, k=1)"),
        "init": Sourced("bvlc", f"{_BVLC_NET}: gaussian 0.01 (fc6/fc7 0.005, l.280, 320), bias 0.1 "
                                f"(l.119, 208, 242, 284, 324) else 0"),
        "normalize": Sourced("mean", f"{_BVLC_NET} l.13: mean_file subtracted, 0..255 scale (mean pixel here, "
                                     f"not the mean image)"),
        "lighting_std": Sourced(0.0, f"{_BVLC}/readme.md l.13: \"not training with the relighting\""),
        "batch_size": Sourced(256, f"{_BVLC_NET} l.17: batch_size 256"),
        "lr": Sourced(0.01, f"{_BVLC_SOLVER} l.4: base_lr 0.01"),
        "scale_lr": Sourced(False, f"{_BVLC_SOLVER}: base_lr is for batch 256 as is"),
        "momentum": Sourced(0.9, f"{_BVLC_SOLVER} l.10: momentum 0.9"),
        "weight_decay": Sourced(5e-4, f"{_BVLC_SOLVER} l.11: weight_decay 0.0005"),
        "no_decay_bias_norm": Sourced(True, f"{_BVLC_NET} l.51 (every layer): bias decay_mult 0"),
        "bias_lr_mult": Sourced(2.0, f"{_BVLC_NET} l.50 (every layer): bias lr_mult 2"),
        "schedule": Sourced("step", f"{_BVLC_SOLVER} l.5-6: lr_policy step, gamma 0.1"),
        "warmup_epochs": Sourced(0.0, f"{_BVLC_SOLVER}: no warm-up"),
        "plateau_patience": Sourced(3, _UNUSED + " (step)"),
        "max_lr_drops": Sourced(3, _UNUSED + " (step)"),
        "step_epochs": Sourced(30, _UNUSED + " (step_iters is set)"),
        "step_iters": Sourced(100_000, f"{_BVLC_SOLVER} l.7: stepsize 100000"),
        "epochs": Sourced(90, f"{_BVLC_SOLVER} l.9: 450,000 x 256 images = 89.9 ImageNet epochs (max_steps ends it)"),
        "max_steps": Sourced(450_000, f"{_BVLC_SOLVER} l.9: max_iter 450000"),
        "dropout": Sourced(0.5, f"{_BVLC_NET} l.300, 340: dropout_ratio 0.5"),
        "label_smoothing": Sourced(0.0, f"{_BVLC_NET}: SoftmaxWithLoss"),
        "ten_crop": Sourced(False, f"{_BVLC}/readme.md l.18: 57.1% \"using just the center crop\""),
        "eval_every": Sourced(1, f"{_BVLC_SOLVER} l.2-3 and {_BVLC_NET} TEST batch_size 50: 1000 x 50 "
                                 f"val images every 1000 iterations (0.2 epochs, 6.5% of the training FLOPs); this trainer evaluates at epoch ends: "
                                 f"every epoch, centre crop, 1.3%"),
    },
    Recipe.TORCHVISION: {
        "arch": Sourced("alexnet-owt", "torchvision/models/alexnet.py (one weird trick, 61,100,840 parameters)"),
        "init": Sourced("torch", "torchvision/models/alexnet.py sets no init: torch's layer defaults"),
        "normalize": Sourced("mean-std", f"{_TV}/presets.py: Normalize(mean, std) on 0..1 pixels"),
        "lighting_std": Sourced(0.0, f"{_TV}/presets.py: no PCA lighting (random-resized crop + flip)"),
        "batch_size": Sourced(256, f"{_TV_README}: 8 GPUs x --batch-size 32 ({_TV_TRAIN} default)"),
        "lr": Sourced(0.01, f"{_TV_README}, \"AlexNet and VGG\": --lr 1e-2"),
        "scale_lr": Sourced(False, f"{_TV_TRAIN}: --lr is used as given"),
        "momentum": Sourced(0.9, f"{_TV_TRAIN}: --momentum 0.9"),
        "weight_decay": Sourced(1e-4, f"{_TV_TRAIN}: --wd 1e-4"),
        "no_decay_bias_norm": Sourced(False, f"{_TV_TRAIN}: --norm-weight-decay None, biases decayed too"),
        "bias_lr_mult": Sourced(1.0, f"{_TV_TRAIN}: one parameter group"),
        "schedule": Sourced("step", f"{_TV_TRAIN}: --lr-scheduler steplr, --lr-gamma 0.1"),
        "warmup_epochs": Sourced(0.0, f"{_TV_TRAIN}: --lr-warmup-epochs 0"),
        "plateau_patience": Sourced(3, _UNUSED + " (step)"),
        "max_lr_drops": Sourced(3, _UNUSED + " (step)"),
        "step_epochs": Sourced(30, f"{_TV_TRAIN}: --lr-step-size 30"),
        "step_iters": Sourced(0, f"{_TV_TRAIN}: steps counted in epochs"),
        "epochs": Sourced(90, f"{_TV_TRAIN}: --epochs 90"),
        "max_steps": Sourced(0, f"{_TV_TRAIN}: length in epochs"),
        "dropout": Sourced(0.5, "torchvision/models/alexnet.py: dropout 0.5"),
        "label_smoothing": Sourced(0.0, f"{_TV_TRAIN}: --label-smoothing 0.0"),
        "ten_crop": Sourced(False, f"{_TV}/presets.py ClassificationPresetEval: resize 256, centre crop 224"),
        "eval_every": Sourced(1, f"{_TV_TRAIN}: evaluate() after every epoch (centre crop: 1.3% of the training FLOPs)"),
    },
    # This project's: torchvision's network with He init at 8x the batch, lr scaled linearly with a
    # short warm-up (Goyal et al. 2017) so the large lr does not blow up the first steps, cosine
    # decay, no decay on biases; the paper's lighting (it costs nothing: folded into the normalize).
    Recipe.FAST: {
        "arch": Sourced("alexnet-owt", "this project: torchvision's network, fewer FLOPs than alexnet2012, no LRN"),
        "init": Sourced("kaiming", "this project: He et al. 2015 normal, zero head (val top-1 55% after 15 "
                                   "steps, 86% after 40 on the demo sample: docs/recipes.md)"),
        "normalize": Sourced("mean-std", "this project: unit-variance input for He init"),
        "lighting_std": Sourced(0.1, f"{_PAPER}, sec. 4.1"),
        "batch_size": Sourced(1024, "this project: 8x the paper's batch"),
        "lr": Sourced(0.01, "this project: the paper's lr per 128 images, scaled (Goyal et al. 2017)"),
        "scale_lr": Sourced(True, "Goyal et al. 2017: linear scaling rule"),
        "momentum": Sourced(0.9, _PAPER_SEC5),
        "weight_decay": Sourced(5e-4, _PAPER_SEC5),
        "no_decay_bias_norm": Sourced(True, "this project: decay shrinks biases without regularizing"),
        "bias_lr_mult": Sourced(1.0, "this project: one lr"),
        "schedule": Sourced("cosine", "Loshchilov & Hutter 2017 (SGDR), without restarts"),
        "warmup_epochs": Sourced(2.0, "Goyal et al. 2017: gradual warm-up for the large-batch lr"),
        "plateau_patience": Sourced(3, _UNUSED + " (cosine)"),
        "max_lr_drops": Sourced(3, _UNUSED + " (cosine)"),
        "step_epochs": Sourced(30, _UNUSED + " (cosine)"),
        "step_iters": Sourced(0, _UNUSED + " (cosine)"),
        "epochs": Sourced(40, "this project: not yet measured on ImageNet"),
        "max_steps": Sourced(0, "this project: length in epochs"),
        "dropout": Sourced(0.5, f"{_PAPER}, sec. 4.2"),
        "label_smoothing": Sourced(0.0, "this project: plain cross-entropy"),
        "ten_crop": Sourced(False, "this project: centre crop (a cheap per-epoch check)"),
        "eval_every": Sourced(1, "this project: every epoch, centre crop: 1.3% of the training FLOPs"),
    },
}


@dataclass(frozen=True)
class Published:
    """The accuracy a recipe's source reports on ILSVRC-2012 val, and how it was measured."""
    top1: float | None          # accuracy, 0..1
    top5: float | None
    crops: int                  # 1 = centre crop, 10 = 4 corners + centre and their flips
    source: str


PUBLISHED: dict[Recipe, Published] = {
    Recipe.PAPER: Published(1 - 0.407, 1 - 0.182, 10, f"{_PAPER}, sec. 6, table 1: one CNN, 40.7% / 18.2% "
                                                      f"top-1/top-5 error on val (10 patches, sec. 4.1)"),
    Recipe.BVLC: Published(0.571, 0.802, 1, f"{_BVLC}/readme.md l.18: 57.1% / 80.2%, \"just the center crop\" "
                                            f"(iteration 360,000 snapshot)"),
    Recipe.TORCHVISION: Published(0.56522, 0.79066, 1, "torchvision/models/alexnet.py AlexNet_Weights.IMAGENET1K_V1: "
                                                       "acc@1 56.522, acc@5 79.066 (resize 256, centre crop 224)"),
    Recipe.FAST: Published(None, None, 1, "not yet measured on ImageNet (no GPU run so far)"),
}


def recipe_preset(recipe: str) -> dict[str, Any]:
    """{field: value} of a recipe; ConfigError naming `recipe` for an unknown name."""
    try:
        return {name: sourced.value for name, sourced in RECIPES[Recipe(recipe)].items()}
    except ValueError:
        raise ConfigError("recipe", f"unknown recipe {recipe!r}; choose one of "
                                    f"{', '.join(r.value for r in Recipe)}") from None


def input_scaled_by_std(arch: str, init: str, normalize: str) -> bool:
    """Whether the loader divides by the per-channel std, `normalize` resolved. Why "auto" is not
    always mean-std: the paper fed "the (centered) raw RGB values", a pixel std of ~60, and its
    N(0, 0.01) weights with bias 1 were chosen for that scale. On unit-variance input the first
    layer's output is ~60x smaller and the bias-1 layers drown it: at init the differences between
    images reach the penultimate layer at ~1e-4 of the common part, against ~6e-3 on raw-scale
    input (tests/test_model.py measures it). BVLC's init (bias 0.1) was made for the same raw scale;
    other inits (torch's, He) expect unit variance. `init` may be "default" (checkpoints' saved
    config): the network's own."""
    if normalize == "auto":
        return resolve_init(arch, init) not in RAW_SCALE_INITS
    return normalize == "mean-std"


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file: top-level keys are TrainConfig fields (either `batch_size` or
    `batch-size`); a `[train]` table is accepted too."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
    if isinstance(data.get("train"), dict):
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError("config", f"{path}: unknown key {key!r}")
        values[name] = _coerce(name, value, source=str(path))
    return values


def _coerce(name: str, value: Any, source: str) -> Any:
    want = FIELD_TYPES[name]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError("config", f"{source}: {name} must be {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def resolve_config(recipe: str = DEFAULT_RECIPE.value, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < recipe < TOML file < explicit overrides (only the keys the user gave)."""
    file_values = load_toml(config_file) if config_file else {}
    recipe = (overrides or {}).get("recipe") or file_values.get("recipe") or recipe
    preset = recipe_preset(recipe)
    values = {**preset, **file_values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    values["recipe"] = recipe
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def recipe_values(name: str) -> dict[str, Any]:
    """{recipe: the value it gives field `name`}, for --help to show where the recipes differ."""
    default = FIELDS[name].default
    return {r.value: RECIPES[r][name].value if name in RECIPES[r] else default for r in Recipe}


def save_config(cfg: TrainConfig, run_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """RUN/config.json: every resolved value, plus derived ones (effective lr, world size)."""
    path = Path(run_dir) / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), **(extra or {})}, indent=2, sort_keys=True) + "\n")
    return path


def format_config(cfg: TrainConfig, resolved: dict[str, Any] | None = None) -> str:
    """The config as the run uses it, compactly: `key=value` pairs wrapped to a few lines, each field
    once. `resolved` replaces a field's placeholder by what it resolved to (num_classes 0 -> the
    shard set's classes, workers 0 -> the cores, normalize/precision auto -> what was picked) and
    adds derived values; config.json keeps both the asked and the resolved values."""
    items = {**cfg.to_dict(), **(resolved or {})}
    return textwrap.fill("  ".join(f"{k}={v}" for k, v in items.items()), width=110, initial_indent="  ",
                         subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
