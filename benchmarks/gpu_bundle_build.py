"""Build the offline GPU bundle here (a machine with PyPI) for an offline GPU node's Python: the
unpacked wheels of DALI, nvImageCodec with its [all] extra (nvJPEG's libnvjpeg.so.13, without which
DALI's "mixed" decoder decodes on the CPU), webdataset, PyYAML and every other package that
`import nvidia.dali` and `import webdataset` need and the node lacks; packed as one .tar.gz cut into
pieces of at most --piece-mib, with a manifest of each piece's and the whole's sha256.

    python benchmarks/gpu_bundle_build.py --python-version 3.12 [--out .gpu-bundle] [--piece-mib 55]

OUT/cpXY/ gets wheels/ (the downloads, reused), site/ (the unpacked tree), site.tgz.NNN and
manifest.json; OUT is git-ignored. Take --python-version from the node (`python3 -c 'import sys;
print(sys.version_info[:2])'`): optree, libcst, nvtx and PyYAML are compiled per Python version.
Before packing, every Requires-Dist of every package in the tree (markers evaluated for that
Python) must be in the tree or in NODE_HAS, and libnvjpeg.so.13 must be in it; otherwise exit 1.
benchmarks/gpu_bundle_assemble.py joins the pieces on the node; docs/gpu.md gives the procedure.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bundle_assemble import NVJPEG, sha256_of   # noqa: E402  (the node's script: one definition)

REPO = Path(__file__).resolve().parent.parent
# Pinned to the versions this project's tests ran with (pyproject allows nvidia-dali-cuda130>=2.0).
PACKAGES = ["nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-nvjpeg==13.3.2.43",
            "nvidia-nvjpeg2k-cu13==0.11.0.51", "nvidia-nvtiff-cu13==0.8.0.82", "nvidia-libnvcomp-cu13==5.3.0.16",
            "astunparse==1.6.3", "gast==0.7.0", "optree==0.20.0", "nvtx==0.2.17", "makefun==1.16.0",
            "libcst==1.9.0", "webdataset==1.0.2", "braceexpand==0.1.7", "PyYAML==6.0.4"]
# What the node's image already holds (docs/gpu.md; /work/.library/device/KINDS.md's list): left out,
# so the bundle never shadows the node's numpy or packaging. PyYAML is carried although the image
# lists it: webdataset and libcst import it at module level, and it is small.
NODE_HAS = {"numpy", "six", "packaging", "typing-extensions", "wheel", "setuptools"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def pip_target_flags(python_version: str) -> list[str]:
    flags = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def build_tree(python_version: str, wheels: Path, site: Path) -> None:
    """Download the wheels (kept between runs) and unpack them, without dependencies, into SITE."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["download", "--no-deps", *pip_target_flags(python_version), "-d", str(wheels), *PACKAGES],
                   check=True)
    shutil.rmtree(site, ignore_errors=True)
    names = {canonicalize_name(Requirement(p).name) for p in PACKAGES}
    files = sorted(w for w in wheels.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) in names)
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--no-compile", "--target", str(site),
                          *pip_target_flags(python_version), *map(str, files)], check=True)


def installed(site: Path) -> dict[str, dict]:
    """{canonical name: {"version", "requires"}} of every package unpacked in SITE."""
    found = {}
    for dist in site.glob("*.dist-info"):
        metadata = Parser().parsestr((dist / "METADATA").read_text(errors="replace"))
        found[canonicalize_name(metadata["Name"])] = {"version": metadata["Version"],
                                                      "requires": metadata.get_all("Requires-Dist") or []}
    return found


def unmet_requirements(site: Path, python_version: str) -> list[str]:
    """Requirements of the tree's packages (markers for the node's Python, no extras except the
    nvimgcodec [all] that DALI asks for) that neither the tree nor the node provides."""
    env = {**default_environment(), "python_version": python_version,
           "python_full_version": f"{python_version}.0", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "implementation_name": "cpython"}
    have = installed(site)
    unmet = []
    for name, dist in sorted(have.items()):
        extras = {"all"} if name == "nvidia-nvimgcodec-cu13" else set()
        for line in dist["requires"]:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({**env, "extra": e})
                                              for e in (extras or {""})):
                continue
            wanted = canonicalize_name(requirement.name)
            if wanted in NODE_HAS:
                continue
            version = have[wanted]["version"] if wanted in have else None
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                unmet.append(f"{name} needs {line.split(';')[0].strip()} (tree has {version})")
    return unmet


def write_pieces(site: Path, out: Path, piece_bytes: int, about: dict) -> dict:
    """SITE as one gzip'd tar cut into OUT/site.tgz.NNN pieces of at most PIECE_BYTES, and
    OUT/manifest.json: ABOUT plus each piece's and the whole's size and sha256. Returns the manifest."""
    for old in out.glob("site.tgz.*"):
        old.unlink()
    whole = out / "site.tgz"
    with open(whole, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(site.rglob("*")):
            if "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(site)), recursive=False)
    pieces = []
    with open(whole, "rb") as f:
        while block := f.read(piece_bytes):
            piece = out / f"site.tgz.{len(pieces):03d}"
            piece.write_bytes(block)
            pieces.append(piece)
    manifest = {**about, "unpacked_bytes": sum(p.stat().st_size for p in site.rglob("*") if p.is_file()),
                "whole": {"name": whole.name, "bytes": whole.stat().st_size, "sha256": sha256_of(whole)},
                "pieces": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in pieces]}
    whole.unlink()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", required=True, help="the node's X.Y (python3 --version there)")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-bundle", help="git-ignored output folder")
    parser.add_argument("--piece-mib", type=float, default=55.0, help="largest piece (a device call carries 64 MiB)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        print(f"gpu_bundle_build: --python-version {args.python_version}: expected X.Y, e.g. 3.12", file=sys.stderr)
        return 2
    out = args.out.resolve() / f"cp{args.python_version.replace('.', '')}"
    site = out / "site"
    build_tree(args.python_version, out / "wheels", site)
    unmet = unmet_requirements(site, args.python_version)
    nvjpeg = sorted(str(p.relative_to(site)) for p in site.rglob(NVJPEG))
    if unmet or not nvjpeg:
        for problem in unmet + ([] if nvjpeg else [f"no {NVJPEG} in the tree: DALI would decode on the CPU"]):
            print(f"gpu_bundle_build: {problem}", file=sys.stderr)
        return 1
    manifest = write_pieces(site, out, int(args.piece_mib * 2**20), {
        "python_version": args.python_version, "platforms": PLATFORMS, "libnvjpeg": nvjpeg,
        "packages": {name: dist["version"] for name, dist in sorted(installed(site).items())}})
    print(json.dumps({"out": str(out), "unpacked_mib": round(manifest["unpacked_bytes"] / 2**20, 1),
                      "packed_mib": round(manifest["whole"]["bytes"] / 2**20, 1), "pieces": len(manifest["pieces"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
