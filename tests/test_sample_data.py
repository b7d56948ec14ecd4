"""The procedural raw-ImageNet generator: class-distinguishable images, the odd files, the devkit trap."""
from __future__ import annotations

import numpy as np
from PIL import Image

from alexnet_fast.tools.sharding.labels import DEVKIT_DIR, META_MAT, devkit_id_to_wnid


def _mean_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float64).mean(axis=(0, 1))


def test_classes_are_distinguishable_by_nearest_centroid(raw_imagenet):
    root = raw_imagenet.root
    plain = {src: w for src, w in raw_imagenet.train.items() if src.rsplit("_", 1)[-1][:-5].isdigit()}
    centroids = {w: np.mean([_mean_rgb(root / s) for s, ww in plain.items() if ww == w], axis=0)
                 for w in raw_imagenet.classes}
    for src, wnid in raw_imagenet.val.items():
        colour = _mean_rgb(root / src)
        assert min(centroids, key=lambda w: np.linalg.norm(centroids[w] - colour)) == wnid


def test_odd_files_are_what_they_claim(raw_imagenet):
    root = raw_imagenet.root
    odd = {src.rsplit("_", 1)[-1]: root / src for src in list(raw_imagenet.train) + list(raw_imagenet.rejected)}
    assert Image.open(odd["cmyk.JPEG"]).mode == "CMYK"
    assert Image.open(odd["gray.JPEG"]).mode == "L"
    assert Image.open(odd["png.JPEG"]).format == "PNG"
    assert min(Image.open(odd["large.JPEG"]).size) > 1000
    assert odd["empty.JPEG"].stat().st_size == 0
    assert odd["truncated.JPEG"].read_bytes()[:2] == b"\xff\xd8"  # starts like a JPEG, ends early
    assert set(raw_imagenet.rejected.values()) == {"train"}


def test_devkit_ids_are_a_non_identity_permutation(raw_imagenet):
    ids = devkit_id_to_wnid((raw_imagenet.root / DEVKIT_DIR / META_MAT).read_bytes())
    assert ids == {i: w for w, i in raw_imagenet.devkit_ids.items()}  # inner synsets filtered out
    assert sorted(ids) == list(range(1, len(raw_imagenet.classes) + 1))
    assert [ids[i] for i in sorted(ids)] != raw_imagenet.classes


MAT_HEADER_TEXT = 116   # a MAT-file's text header holds its creation time (scipy.io.savemat): not compared


def _tree_bytes(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()[MAT_HEADER_TEXT if p.suffix == ".mat" else 0:]
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_tree_is_byte_identical_whatever_the_worker_count(tmp_path):
    from alexnet_fast.tools.sample_data import SampleSpec, ValFormat, write_raw_imagenet

    spec = SampleSpec(classes=3, train_per_class=3, val_per_class=2, val_layout=ValFormat.FLAT_DEVKIT,
                      min_side=64, max_side=96)
    one = write_raw_imagenet(tmp_path / "one", spec, workers=1)
    two = write_raw_imagenet(tmp_path / "two", spec, workers=2)
    assert (one.train, one.val, one.devkit_ids) == (two.train, two.val, two.devkit_ids)
    files_one, files_two = _tree_bytes(one.root), _tree_bytes(two.root)
    assert len(files_one) > 3 * 3 + 3 * 2 and files_one == files_two
    # each image its own seed: no two plain train images are the same bytes
    plain = [data for name, data in files_one.items() if name.split("_")[-1][:-5].isdigit() and "/train/" in f"/{name}"]
    assert len(plain) == 9 and len(set(plain)) == 9
