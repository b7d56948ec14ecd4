"""DALI pipeline definitions: read WebDataset shards -> decode -> crop/mirror/lighting/normalize.

The same graph runs in three placements, built by one function (`decode`):
- GPU decode (`DecodeConfig(on_gpu=True)`): the "mixed" decoder (nvJPEG and the hardware JPEG
  decoder), outputs in device memory, augmentation on the GPU;
- CPU decode on a GPU run (`on_gpu=True, cpu_decoder=True`, `--decode cpu`): DALI's CPU decoder on
  the pipeline's threads, `.gpu()`, then the same augmentation on the GPU (DALI's ResNet-50
  example's `--dali_cpu`);
- the CPU twin (`on_gpu=False`, `device_id=None`): all of it on the CPU. It is the twin of both GPU
  placements: the second one's graph with its GPU part on the CPU, the first one's with the
  decoder's backend changed.
Every operator and parameter after the decoder is identical in all three, so what the CPU tests
check is what the GPU runs. One known difference inside the decoder: the mixed backend's default
chroma upsampling (`jpeg_fancy_upsampling=False`) is not libjpeg-turbo's, so GPU-decoded pixels can
differ from the CPU twin's by a few levels (CPU-decoded ones, on either device, cannot); the default
is kept because its effect on the hardware decoder's throughput is unmeasured here (no GPU was lent
to this project).

Train: random crop position, coin-flip mirror and lighting alpha are drawn by DALI's own seeded
random operators, and lighting is folded into a per-sample mean of one `crop_mirror_normalize`
(see `augment.py`): crop + mirror + lighting + normalize + layout + dtype in one kernel.
Val: the centre crop, or ten views (augment.TEN_CROP_VIEWS) stacked as [10, ...] per sample.

Every pipeline returns (images, labels, source_info[, params...]). `source_info` is the reader's
"<tar>:<offset>:<key>.jpg" string per sample; the loader looks at it only to drop a sample that
`on_corrupt="skip"` replaced (see left_out.py), otherwise it never leaves DALI.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from alexnet_fast.pipeline.augment import CROP, TEN_CROP_VIEWS, ColorStats

READER_NAME = "reader"


@dataclass(frozen=True)
class ReaderConfig:
    paths: tuple[str, ...]          # tar files, in the order the reader splits them into rank ranges
    index_paths: tuple[str, ...]    # DALI .idx beside each tar (or a patched copy, see index_patches.py)
    shard_id: int = 0               # this rank
    num_shards: int = 1             # world size
    shuffle: bool = False
    initial_fill: int = 4096        # shuffle buffer (samples); make_shards already shuffled train globally
    seed: int = 0


@dataclass(frozen=True)
class DecodeConfig:
    on_gpu: bool = False            # the augmentation and the outputs on the GPU (device_id set)
    # On a GPU run: decode with the CPU decoder on the pipeline's threads and move the decoded images
    # to the GPU (LoaderSpec.decode="cpu"). No effect on the CPU twin, which always decodes on the CPU.
    cpu_decoder: bool = False
    # Share of images for the A100/H100 hardware JPEG decoder; the rest go to nvJPEG's CUDA path.
    hw_decoder_load: float = 0.75
    # Pre-allocation hints (bytes) so the first iterations do not reallocate: a 256x256 RGB image
    # is 196,608 bytes decoded, and a batch's host staging of encoded JPEGs stays far below 16 MiB.
    device_memory_padding: int = 16 * 1024 * 1024
    host_memory_padding: int = 8 * 1024 * 1024
    # Decode only the crop window (fn.decoders.image_crop) where one window is cut per image (train,
    # val centre crop); the ten-crop views cover the whole image and decode it all. The pixels are
    # the full decode's exactly (tests/test_pipeline.py); see LoaderSpec.roi_decode for the default.
    roi: bool = False
    # libjpeg-turbo's fast integer IDCT (CPU decoder only): pixels within a few levels of the exact
    # decode (bound in tests/test_pipeline.py), off by default (LoaderSpec.fast_idct).
    fast_idct: bool = False

    @property
    def mixed(self) -> bool:
        """Whether the GPU decodes (DALI's "mixed" decoder: encoded bytes in, device memory out)."""
        return self.on_gpu and not self.cpu_decoder


@dataclass(frozen=True)
class OutputConfig:
    crop: int = CROP
    fp16: bool = False              # DALI writes FLOAT16 (bf16 is a cast in torch: DALI has no bfloat16)
    channels_last: bool = False     # HWC per sample -> NHWC memory = torch channels_last

    @property
    def dtype(self):
        return types.FLOAT16 if self.fp16 else types.FLOAT

    @property
    def layout(self) -> str:
        return "HWC" if self.channels_last else "CHW"


def read_shards(reader: ReaderConfig):
    """(encoded jpg bytes, int32 label) per sample, from this rank's part of the shard list."""
    jpg, label = fn.readers.webdataset(
        paths=list(reader.paths), index_paths=list(reader.index_paths),
        ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
        shard_id=reader.shard_id, num_shards=reader.num_shards,
        # pad_last_batch: a rank's last batch repeats its last sample instead of wrapping into the
        # next rank's samples; the loader trims val's last batch, so the padding is never seen.
        pad_last_batch=True,
        random_shuffle=reader.shuffle, initial_fill=reader.initial_fill, seed=reader.seed,
        name=READER_NAME,
    )
    return jpg, label


def decode(jpg, decoder: DecodeConfig, window: tuple | None = None):
    """RGB pixels of each image, on the device the augmentation runs on; with `window` = (crop,
    crop_x, crop_y) and `decoder.roi`, only that crop window (same placement and rounding as
    crop_mirror_normalize's crop). The one place that builds the decode stage of every graph."""
    images = _decoder_op(jpg, decoder, window)
    # CPU decode on a GPU run: one host-to-device copy of the decoded (uint8) pixels, then every
    # later operator is the GPU one
    return images.gpu() if decoder.on_gpu and decoder.cpu_decoder else images


def _decoder_op(jpg, decoder: DecodeConfig, window: tuple | None):
    args = dict(output_type=types.RGB, use_fast_idct=decoder.fast_idct)
    if decoder.mixed:
        args.update(device="mixed", hw_decoder_load=decoder.hw_decoder_load,
                    device_memory_padding=decoder.device_memory_padding,
                    host_memory_padding=decoder.host_memory_padding,
                    preallocate_width_hint=256, preallocate_height_hint=256)
    else:
        args.update(device="cpu")
    if decoder.roi and window is not None:
        crop, crop_x, crop_y = window
        return fn.decoders.image_crop(jpg, crop=(crop, crop), crop_pos_x=crop_x, crop_pos_y=crop_y, **args)
    return fn.decoders.image(jpg, **args)


def _labels(label, decoder: DecodeConfig):
    label = fn.cast(fn.reshape(label, shape=[]), dtype=types.INT64)   # [1] int32 -> scalar int64
    return label.gpu() if decoder.on_gpu else label


def normalize(images, out: OutputConfig, mean, std, crop_x, crop_y, mirror, cropped: bool = False):
    """Crop (unless the decoder already cut the window: `cropped`), mirror, normalize, layout, dtype."""
    crop = {} if cropped else dict(crop=(out.crop, out.crop), crop_pos_x=crop_x, crop_pos_y=crop_y)
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, std=std, dtype=out.dtype,
                                    output_layout=out.layout, **crop)


def random_window():
    """Train's draws per sample: the crop's relative position (x, y) uniform in [0, 1] and a fair-coin
    mirror, by DALI's seeded random operators (augment.py `draw_params` is the NumPy statement)."""
    return (fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0]),
            fn.random.coin_flip(probability=0.5))


def lighting_mean(stats: ColorStats, lighting_std: float):
    """(per-sample mean on the 0..255 scale with PCA lighting folded in, the drawn alpha [3]):
    255 * (mean - eigvec @ (alpha * eigval)), alpha ~ N(0, lighting_std) per sample (augment.py)."""
    mean = types.Constant(np.float32(stats.mean_255))
    if lighting_std <= 0:
        return mean, types.Constant(np.zeros(3, np.float32))
    alpha = fn.random.normal(shape=[3], stddev=lighting_std)
    for j in range(3):      # a sum over the three eigenvectors
        mean = mean - alpha[j] * types.Constant(np.float32(255.0 * stats.eigval[j] * stats.eigvec[:, j]))
    return mean, alpha


@pipeline_def
def train_pipeline(reader: ReaderConfig, decoder: DecodeConfig, out: OutputConfig, stats: ColorStats,
                   lighting_std: float = 0.1, with_params: bool = False):
    """Random crop + mirror + PCA lighting + normalize; with_params also returns what was drawn."""
    jpg, label = read_shards(reader)
    crop_x, crop_y, mirror = random_window()
    images = decode(jpg, decoder, (out.crop, crop_x, crop_y))
    mean, alpha = lighting_mean(stats, lighting_std)
    normalized = normalize(images, out, mean, list(stats.std_255), crop_x, crop_y, mirror, cropped=decoder.roi)
    outputs = (normalized, _labels(label, decoder), fn.get_property(jpg, key="source_info"))
    if with_params:
        outputs += (crop_x, crop_y, mirror, alpha)
    return outputs


@pipeline_def
def val_pipeline(reader: ReaderConfig, decoder: DecodeConfig, out: OutputConfig, stats: ColorStats,
                 ten_crop: bool = False):
    """Centre crop, or the ten views stacked per sample ([10, ...])."""
    jpg, label = read_shards(reader)
    mean, std = list(stats.mean_255), list(stats.std_255)
    if ten_crop:                    # the ten views cover the whole image: decode it all
        images = decode(jpg, decoder)
        views = [normalize(images, out, mean, std, x, y, int(m)) for (x, y, m) in TEN_CROP_VIEWS]
        normalized = fn.stack(*views, axis=0)
    else:
        images = decode(jpg, decoder, (out.crop, 0.5, 0.5))
        normalized = normalize(images, out, mean, std, 0.5, 0.5, 0, cropped=decoder.roi)
    return normalized, _labels(label, decoder), fn.get_property(jpg, key="source_info")


@pipeline_def
def replay_reader_pipeline(reader: ReaderConfig):
    """The reader alone (same config and seed, so the same sample order): encoded bytes and
    source_info, to find which sample of a failed batch is corrupt without decoding everything."""
    jpg, _ = read_shards(reader)
    return jpg, fn.get_property(jpg, key="source_info")


@pipeline_def
def decode_check_pipeline(on_gpu: bool = False):
    """Decodes encoded images fed as "jpg" with the CPU decoder, or the train pipeline's GPU one
    (the corrupt-sample check)."""
    jpg = fn.external_source(name="jpg", dtype=types.UINT8)
    return decode(jpg, DecodeConfig(on_gpu=on_gpu))
