"""Patched copies of DALI index files: how the DALI loader leaves samples out without changing
the number of samples the reader sees.

DALI's webdataset reader takes every part of a sample from the shard's .idx (format and row helpers:
shard_format.py). In a copy of the index where a sample's offsets point at another, intact sample
of the same tar (the donor), the reader returns the donor's bytes under the left-out sample's name;
the loader drops rows with that name from its batches (left_out.py keeps that account). The sample
count and order stay what the manifest says, so rank ranges, shuffles and batch counts do not
change. Used for (with `on_corrupt="skip"`):
- a JPEG that does not decode;
- a tar cut short: the samples with a part past the end of the file;
- a missing .idx: rebuilt from the tar's headers (what DALI's wds2idx does), and if the tar is
  also cut short, the samples it lost get placeholder names `lost<n>`.
"""
from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from alexnet_fast.pipeline.shard_format import Row, index_text, read_index, row_fits, row_key, rows_from_members


def index_from_tar(tar: Path) -> list[Row]:
    """The index rows of the samples whose parts are all present in `tar`, from its member headers
    (no data is read). Stops quietly where a cut-short tar ends."""
    size = tar.stat().st_size
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(tar, mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    members.append(member)
    except (tarfile.TarError, EOFError, OSError):
        pass                          # the cut: what was read so far stands
    return [r for r in rows_from_members(members) if row_fits(r, size)]


class IndexPatches:
    """The patched index copies of one loader, in a temporary directory of its own."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory | None = None
        self._paths: dict[str, Path] = {}              # tar path -> patched index
        self._redirected: dict[str, set[str]] = {}     # tar path -> keys pointing at a donor

    def index_of(self, tar: Path, index: Path) -> Path:
        """The index the reader should use for `tar`: the patched copy if there is one."""
        return self._paths.get(str(tar), index)

    def rows(self, tar: Path, index: Path) -> tuple[str, list[Row]]:
        return read_index(self.index_of(tar, index))

    def redirect(self, tar: Path, header: str, rows: list[Row], keys: set[str]) -> None:
        """Write a patched index of `tar` from `rows`, with the samples in `keys` pointing at the
        first sample not redirected (now or before). Raises LookupError if no such sample is left."""
        redirected = self._redirected.setdefault(str(tar), set()) | keys
        donor = next((r for r in rows if row_key(r) not in redirected), None)
        if donor is None:
            raise LookupError(f"no intact sample left in {tar}")
        parts = {donor[i]: donor[i + 1:i + 3] for i in range(0, len(donor), 4)}   # ext -> [offset, size]
        for row in rows:
            if row_key(row) in keys:
                for i in range(0, len(row), 4):
                    row[i + 1:i + 3] = parts.get(row[i], parts["jpg"])
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="alexnet-fast-idx-")
        path = Path(self._dir.name) / (Path(tar).name + ".idx")
        path.write_text(index_text(header, rows))
        self._paths[str(tar)] = path
        self._redirected[str(tar)] = redirected
