"""Reassemble the offline GPU bundle (DALI + nvImageCodec + nvJPEG + webdataset + PyYAML, unpacked
wheels) on the GPU node from the pieces benchmarks/gpu_bundle_build.py made, one piece at a time.

    python3 benchmarks/gpu_bundle_assemble.py --manifest M --store S [PIECE ...]
    python3 benchmarks/gpu_bundle_assemble.py --manifest M --store S --check

Standard library only: the node has no network and the project is not installed. Each PIECE's
sha256 is checked against the manifest before it is kept in STORE (a piece that does not match is
refused, exit 1, and not kept), so pieces may arrive across several commands, in any order, and a
piece sent twice is harmless. When every piece is there, they are joined in order through one
sha256 of the whole (checked against the manifest) and a streaming untar into STORE/site, the
folder to pass as `gpu_check.py --extra-site`; the pieces are then deleted. `--check` (also run
after unpacking) imports nvidia.dali and webdataset from STORE/site in a fresh interpreter and
looks for libnvjpeg.so.13 in it: without that library DALI's "mixed" decoder decodes on the CPU.
Prints one JSON line last: {"have": n, "of": N, "missing": [...], "site": path or null, "check": ...}.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CHUNK = 1 << 20
STAMP = ".bundle-sha256"            # in site/: the whole's sha256 it was unpacked from
NVJPEG = "libnvjpeg.so.13"          # the GPU JPEG decoder nvImageCodec loads; torch's CUDA wheels lack it

CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
out = {}
for name in ("nvidia.dali", "webdataset", "yaml", "optree"):
    try:
        module = __import__(name, fromlist=["_"])
        where = module.__file__ or ""
        inside = where.startswith(sys.argv[1].rstrip("/") + "/")
        out[name] = getattr(module, "__version__", "?") if inside else f"FAILED imported from {where}, not the bundle"
    except Exception as e:
        out[name] = f"FAILED {type(e).__name__}: {e}"
print(json.dumps(out))
"""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class Joined(io.RawIOBase):
    """The pieces read back to back as one stream, hashed on the way through."""

    def __init__(self, paths: list[Path]):
        self.paths, self.file, self.digest = list(paths), None, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.file is None:
                if not self.paths:
                    return 0
                self.file = open(self.paths.pop(0), "rb")
            n = self.file.readinto(buffer)
            if n:
                self.digest.update(memoryview(buffer)[:n])
                return n
            self.file.close()
            self.file = None


def keep_piece(manifest: dict, piece: Path, store: Path) -> str:
    """Verify PIECE against the manifest and copy it into STORE; returns a one-line account."""
    entry = next((p for p in manifest["pieces"] if p["name"] == piece.name), None)
    if entry is None:
        raise SystemExit(f"gpu_bundle_assemble: {piece.name} is not a piece of this manifest")
    kept = store / piece.name
    if kept.exists() and sha256_of(kept) == entry["sha256"]:
        return f"{piece.name}: already kept"
    got = sha256_of(piece)
    if got != entry["sha256"]:
        raise SystemExit(f"gpu_bundle_assemble: {piece.name}: sha256 {got[:16]}... is not the manifest's "
                         f"{entry['sha256'][:16]}... (a damaged or stale piece): not kept")
    shutil.copyfile(piece, kept)
    return f"{piece.name}: sha256 ok, kept"


def unpack(manifest: dict, store: Path) -> Path:
    """Join every piece in order into STORE/site, checking the whole's sha256; the pieces are then removed."""
    site, partial = store / "site", store / "site.partial"
    shutil.rmtree(partial, ignore_errors=True)
    stream = Joined([store / p["name"] for p in manifest["pieces"]])
    with tarfile.open(fileobj=io.BufferedReader(stream, CHUNK), mode="r|gz") as tar:
        tar.extractall(partial, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(partial)
    while stream.readinto(bytearray(CHUNK)):     # gzip's trailer may leave bytes unread: hash them too
        pass
    if stream.digest.hexdigest() != manifest["whole"]["sha256"]:
        shutil.rmtree(partial)
        raise SystemExit("gpu_bundle_assemble: every piece matched but the whole's sha256 does not: "
                         "the manifest is not the one these pieces were cut for")
    (partial / STAMP).write_text(manifest["whole"]["sha256"] + "\n")
    shutil.rmtree(site, ignore_errors=True)
    partial.rename(site)
    for p in manifest["pieces"]:
        (store / p["name"]).unlink()
    return site


def site_matches(site: Path, manifest: dict) -> bool:
    """Whether SITE was unpacked from this manifest's pieces (not a stale bundle)."""
    stamp = site / STAMP
    return stamp.is_file() and stamp.read_text().strip() == manifest["whole"]["sha256"]


def check_site(site: Path, python: str = sys.executable) -> dict:
    """Import the bundle's packages from SITE in a fresh interpreter; find libnvjpeg in it."""
    site = site.resolve()
    done = subprocess.run([python, "-c", CHECK, str(site)], capture_output=True, text=True, timeout=300)
    try:
        imports = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        imports = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    nvjpeg = sorted(str(p.relative_to(site)) for p in site.rglob(NVJPEG))
    ok = bool(nvjpeg) and all(not str(v).startswith("FAILED") for v in imports.values()) and "error" not in imports
    return {"ok": ok, "imports": imports, "libnvjpeg": nvjpeg}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.json written with the pieces")
    parser.add_argument("--store", type=Path, required=True, help="where pieces are kept and site/ is unpacked")
    parser.add_argument("--check", action="store_true", help="only check STORE/site")
    parser.add_argument("pieces", type=Path, nargs="*")
    args = parser.parse_args(argv)
    if not args.manifest.is_file():
        print(f"gpu_bundle_assemble: --manifest {args.manifest}: no such file", file=sys.stderr)
        return 2
    manifest = json.loads(args.manifest.read_text())
    args.store.mkdir(parents=True, exist_ok=True)
    site = args.store / "site"
    for piece in [] if site_matches(site, manifest) else args.pieces:     # unpacked already: nothing to keep
        if not piece.is_file():
            print(f"gpu_bundle_assemble: {piece}: no such file", file=sys.stderr)
            return 2
        try:
            print(keep_piece(manifest, piece, args.store), flush=True)
        except SystemExit as refusal:
            print(refusal, file=sys.stderr)
            return 1
    names = [p["name"] for p in manifest["pieces"]]
    unpacked = site_matches(site, manifest)
    missing = [] if unpacked else [n for n in names if not (args.store / n).exists()]
    if not unpacked and not missing and not args.check:
        try:
            site = unpack(manifest, args.store)
        except SystemExit as refusal:
            print(refusal, file=sys.stderr)
            return 1
        print(f"unpacked {len(names)} pieces into {site}", flush=True)
        unpacked = True
    report = {"have": len(names) - len(missing), "of": len(names), "missing": missing,
              "site": str(site) if unpacked else None, "check": None}
    if unpacked:
        report["check"] = check_site(site)
    print(json.dumps(report), flush=True)
    return 1 if report["check"] is not None and not report["check"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
