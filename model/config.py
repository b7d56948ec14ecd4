"""Training configuration: one typed dataclass, two recipes, a TOML file on top.

Resolution order (later wins):  dataclass defaults < recipe preset < TOML config file < CLI flags.

    cfg = resolve_config(recipe="fast", config_file="run.toml", overrides={"lr": 0.02})

Every field of `TrainConfig` is a flag of `alexnet-fast train` (`batch_size` -> `--batch-size`),
generated in tools/flags.py from the field's type and its `help`/`choices` metadata, so the two
can't drift. Nothing here knows about the command line: a bad value raises `ConfigError` naming
the field, and the command turns it into a usage error naming the flag.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from alexnet_fast.model.alexnet import ARCH_NAMES, INIT_NAMES
from alexnet_fast.model.runtime import DEVICES, PRECISIONS
from alexnet_fast.pipeline.loader_spec import LOADER_KINDS, ON_CORRUPT_MODES

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
    FAST = "fast"


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # --- what to train on / where to write
    data: str = _f("", "shard set directory (has manifest.json)")
    out: str = _f("runs/alexnet", "run directory: checkpoints, config.json, metrics.jsonl")
    arch: str = _f("alexnet2012", "network", choices=ARCH_NAMES)
    num_classes: int = _f(0, "output classes; 0 = as many as the shard set has")
    init: str = _f("default", "weights: the network's own (paper / torchvision) or He-normal with a zero head",
                   choices=INIT_NAMES)
    # --- recipe
    recipe: str = _f("paper", "preset the other values start from", choices=tuple(r.value for r in Recipe))
    epochs: int = _f(90, "epochs to train")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = no limit); for smoke runs")
    batch_size: int = _f(128, "GLOBAL batch size, split evenly over all ranks (must divide by the world size)")
    lr: float = _f(0.01, "learning rate (with --scale-lr: the lr per 128 images, scaled linearly to the batch)")
    scale_lr: bool = _f(False, "scale --lr linearly with the global batch (lr * batch/128)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay")
    no_decay_bias_norm: bool = _f(False, "no weight decay on biases and normalization parameters")
    schedule: str = _f("plateau", "lr schedule", choices=("plateau", "step", "cosine"))
    warmup_epochs: float = _f(0.0, "linear lr warm-up from 0, in epochs (step/cosine schedules)")
    plateau_patience: int = _f(3, "plateau: epochs without val-error improvement before lr /= 10")
    max_lr_drops: int = _f(3, "plateau: at most this many lr drops (the paper: 3)")
    step_epochs: int = _f(30, "step schedule: lr /= 10 every this many epochs")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    dropout: float = _f(0.5, "dropout on the hidden FC layers (0 disables; tests use 0 for exact comparisons)")
    seed: int = _f(0, "random seed (rank r uses seed + r for dropout)")
    # --- data
    loader: str = _f("dali", "data loader", choices=LOADER_KINDS)
    workers: int = _f(0, "loader threads/workers per rank; 0 = the cores per rank (pipeline default)")
    lighting_std: float = _f(0.1, "PCA lighting alpha ~ N(0, std); 0 disables")
    normalize: str = _f("auto", "input: 'mean' subtracts the mean pixel only (the paper's centred raw RGB, "
                                "0..255 scale), 'mean-std' also divides by the per-channel std; auto = mean for "
                                "alexnet2012 with the paper's init (tuned for that scale), else mean-std",
                        choices=("auto", "mean", "mean-std"))
    on_corrupt: str = _f("error", "a corrupt sample: stop with its name, or skip and count it", choices=("error", "skip"))
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
    # --- logging and checkpoints
    log_every: int = _f(50, "log (and sync the host) every this many steps")
    ckpt_every: int = _f(0, "also checkpoint every this many steps inside an epoch (0 = epoch ends only)")
    eval_every: int = _f(1, "evaluate every this many epochs (and at the end)")
    resume: bool = _f(False, "continue from OUT/last.pt (the previous good one if it is damaged)")

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
                        "plateau_patience", "max_lr_drops", "weight_decay", "momentum", "lighting_std"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        for name in FIELD_CHOICES:
            if getattr(self, name) not in FIELD_CHOICES[name]:
                raise ConfigError(name, f"{getattr(self, name)!r} is not one of {', '.join(FIELD_CHOICES[name])}")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES: dict[str, type] = typing.get_type_hints(TrainConfig)
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    name: f.metadata["choices"] for name, f in FIELDS.items() if "choices" in f.metadata
}

# The recipes: values that differ from the dataclass defaults (which are the paper's).
RECIPES: dict[Recipe, dict[str, Any]] = {
    # Krizhevsky et al. 2012: SGD momentum 0.9, wd 5e-4, batch 128, lr 0.01 divided by 10 when the
    # validation error stops improving, three times in all, ~90 epochs.
    Recipe.PAPER: {},
    # A modern fast schedule: 8x the batch with the lr scaled linearly (Goyal et al.), a short
    # warm-up so the large lr does not blow up the first steps, cosine decay, no decay on biases.
    Recipe.FAST: {
        "epochs": 40, "batch_size": 1024, "lr": 0.01, "scale_lr": True, "schedule": "cosine",
        "warmup_epochs": 2.0, "no_decay_bias_norm": True,
    },
}


def input_scaled_by_std(arch: str, init: str, normalize: str) -> bool:
    """Whether the loader divides by the per-channel std, `normalize` resolved. Why "auto" is not
    always mean-std: the paper fed "the (centered) raw RGB values", a pixel std of ~60, and its
    N(0, 0.01) weights with bias 1 were chosen for that scale. On unit-variance input the first
    layer's output is ~60x smaller and the bias-1 layers drown it: at init the differences between
    images reach the penultimate layer at ~1e-4 of the common part, against ~6e-3 on raw-scale
    input (tests/test_model.py measures it). Other inits (torch's, He) expect unit variance."""
    if normalize == "auto":
        return not (arch == "alexnet2012" and init == "default")
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


def resolve_config(recipe: str = "paper", config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < recipe < TOML file < explicit overrides (only the keys the user gave)."""
    file_values = load_toml(config_file) if config_file else {}
    recipe = (overrides or {}).get("recipe") or file_values.get("recipe") or recipe
    try:
        preset = RECIPES[Recipe(recipe)]
    except ValueError:
        raise ConfigError("recipe", f"unknown recipe {recipe!r}") from None
    values = {**preset, **file_values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    values["recipe"] = recipe
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def recipe_values(name: str) -> dict[str, Any]:
    """{recipe: the value it gives field `name`}, for --help to show where the recipes differ."""
    default = FIELDS[name].default
    return {r.value: RECIPES[r].get(name, default) for r in Recipe}


def save_config(cfg: TrainConfig, run_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """RUN/config.json: every resolved value, plus derived ones (effective lr, world size)."""
    path = Path(run_dir) / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), **(extra or {})}, indent=2, sort_keys=True) + "\n")
    return path


def format_config(cfg: TrainConfig, extra: dict[str, Any] | None = None) -> str:
    items = {**cfg.to_dict(), **(extra or {})}
    width = max(len(k) for k in items)
    return "\n".join(f"  {k:<{width}} = {v}" for k, v in items.items())

