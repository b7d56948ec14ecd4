"""The FFCV side of `benchmarks/loaders.py --peer ffcv`; runs in FFCV's own venv
(benchmarks/ffcv_setup.sh), never in ours, and imports nothing from this project but the standard-
library-only window_harness.py and pipeline/host.py.

    .ffcv-venv/bin/python benchmarks/ffcv_loader.py write --data SHARDS --beton OUT.beton
    .ffcv-venv/bin/python benchmarks/ffcv_loader.py serve --beton OUT.beton --layout nhwc [--tuned] ...

write: a .beton of the shard set's train samples in the shards' order, each JPEG's bytes stored
unchanged (FFCV's RGBImageField would re-encode them with OpenCV; `StoredJpegField` writes the
same metadata FFCV's decoders read, mode "jpg", around the original bytes) and the label.

serve: FFCV's closest pipeline to ours, as a window_harness contender. Decoder:
`RandomResizedCropRGBImageDecoder((227, 227), scale=(s, s), ratio=(1, 1))` with s = 227^2 / 256^2:
its crop is then exactly 227x227 at a uniform random position of the 256x256 image, and its resize
227 -> 227 changes no pixel: an unscaled 227 window, like ours. Then RandomHorizontalFlip,
NormalizeImage (before ToTensor: after ToTorchImage it hangs in Loader(), FFCV issue 396), ToTensor,
ToTorchImage (layout nhwc: its stock channels_last view; nchw: its contiguous copy). With --dtype
uint8, the CPU half of FFCV's stock GPU pipeline (its ImageNet example: decoder, flip, ToTensor, then
ToDevice, ToTorchImage and NormalizeImage on the GPU): no NormalizeImage, and ToTorchImage's
channels_last view on the host, so the batch is what ToDevice would copy; with --decoder whole,
FFCV's cheapest feed: SimpleRGBImageDecoder (the whole stored image, decoded, nothing else), the
crop and flip left to the GPU. FFCV's JPEG
decode is libjpeg-turbo with TJFLAG_FASTDCT (its stock). No PCA lighting (FFCV has none; ours
folds it into normalize's mean at no cost). --tuned applies the glibc heap tuning our loader's
process gets (pipeline/host.py keep_batch_buffers_mapped) to this process.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from window_harness import output_problem, serve  # noqa: E402  (stdlib only)

CROP = 227


def _load_host_module():
    """pipeline/host.py by path: standard library only, so it loads in this venv as well."""
    spec = importlib.util.spec_from_file_location("alexnet_fast_host", HERE.parent / "pipeline" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_samples(data: Path) -> list[tuple[bytes, int]]:
    """(jpg bytes, label) of every train sample, shards in name order, samples in tar order."""
    manifest = json.loads((data / "manifest.json").read_text())
    out = []
    for tar_path in sorted(data.glob("train-*.tar")):
        parts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if ext in ("jpg", "lbl"):
                    parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        out += [(p["jpg"], int.from_bytes(p["lbl"], "little", signed=True)) for p in parts.values()]
    if not out:
        raise SystemExit(f"ffcv_loader: no train samples in {data} (manifest format {manifest.get('format')!r})")
    return out


def write(data: Path, beton: Path) -> None:
    import numpy as np
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.writer import DatasetWriter
    from PIL import Image

    class StoredJpegField(RGBImageField):
        """RGBImageField's layout, the JPEG bytes as given (item: (bytes, height, width))."""

        def encode(self, destination, item, malloc):
            jpg, height, width = item
            destination["mode"] = IMAGE_MODES["jpg"]
            destination["height"], destination["width"] = height, width
            destination["data_ptr"], storage = malloc(len(jpg))
            storage[:] = np.frombuffer(jpg, np.uint8)

    samples = train_samples(data)

    class Items:
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            jpg, label = samples[i]
            width, height = Image.open(io.BytesIO(jpg)).size       # header only
            return (jpg, height, width), label

    beton.parent.mkdir(parents=True, exist_ok=True)
    tmp = beton.with_name(beton.name + ".tmp")
    DatasetWriter(str(tmp), {"image": StoredJpegField(write_mode="jpg"), "label": IntField()}, num_workers=1
                  ).from_indexed_dataset(Items())
    tmp.replace(beton)
    print(f"wrote {beton}: {len(samples)} samples, JPEG bytes unchanged", flush=True)


def make_loader(args):
    import numpy as np
    from ffcv.fields import RGBImageField
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    stats = json.loads(Path(args.stats).read_text())
    mean, std = np.array(stats["mean"]) * 255, np.array(stats["std"]) * 255
    side = args.image_size
    scale = (CROP * CROP) / (side * side)
    normalize = [] if args.dtype == "uint8" else [NormalizeImage(mean, std, np.dtype(args.dtype).type)]
    if args.decoder == "whole":         # decode only: the GPU would crop and flip
        image = [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=args.layout == "nhwc")]
    else:
        image = [RandomResizedCropRGBImageDecoder((CROP, CROP), scale=(scale, scale), ratio=(1.0, 1.0)),
                 RandomHorizontalFlip(), *normalize, ToTensor(), ToTorchImage(channels_last=args.layout == "nhwc")]
    return Loader(str(args.beton), batch_size=args.batch_size, num_workers=args.workers, order=OrderOption.RANDOM,
                  os_cache=True, drop_last=True, seed=0, custom_fields={"image": RGBImageField},
                  pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]})


def batches(args):
    loader = make_loader(args)
    checked = False
    while True:
        for x, _ in loader:
            if not checked:       # the same output as every other contender, or no comparison
                side = args.image_size if args.decoder == "whole" else CROP
                problem = output_problem(x.shape, x.stride(), str(x.dtype), args.layout, args.dtype, crop=side)
                if problem:
                    raise SystemExit(f"ffcv: {problem}")
                checked = True
            yield x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--data", type=Path, required=True)
    w.add_argument("--beton", type=Path, required=True)
    s = sub.add_parser("serve")
    s.add_argument("--beton", type=Path, required=True)
    s.add_argument("--stats", required=True, help="the shard set's stats.json (mean, std on [0, 1] pixels)")
    s.add_argument("--image-size", type=int, default=256, help="the stored images' side (make_shards --size)")
    s.add_argument("--layout", choices=["nchw", "nhwc"], default="nhwc")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--dtype", choices=["float32", "float16", "uint8"], default="float32",
                   help="uint8: no NormalizeImage (the CPU half of FFCV's GPU pipeline)")
    s.add_argument("--decoder", choices=["crop", "whole"], default="crop",
                   help="whole: SimpleRGBImageDecoder, the stored image decoded and nothing else (--dtype uint8)")
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--tuned", action="store_true", help="our process's glibc heap tuning (pipeline/host.py)")
    args = parser.parse_args()
    if args.command == "write":
        write(args.data, args.beton)
        return
    if args.tuned:
        _load_host_module().keep_batch_buffers_mapped()
    serve(lambda: batches(args), args.warmup)


if __name__ == "__main__":
    main()
