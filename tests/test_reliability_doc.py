"""docs/reliability.md names, for every guarantee, the test that proves it: each named test file and
test function exists (a renamed or deleted test would otherwise leave the page pointing at nothing),
and every row names at least one."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
# `file.py::test_name`, `tests/file.py::test_name`, `file.py`, `::test_name` (in the last file named)
REFERENCE = re.compile(r"`(?P<file>(?:[\w/]+/)?test_\w+\.py)?(?:::(?P<test>test_\w+))?`")
BENCHMARK = re.compile(r"`python (?P<script>benchmarks/\w+\.py)")


def guarantee_rows() -> list[tuple[str, str]]:
    """(guarantee, proved-by cell) of each row of the Guarantees table."""
    table = DOC.read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| **")]
    return [(cells[0].lstrip("| "), cells[-1].rstrip(" |")) for cells in rows]


def named_tests(cell: str) -> list[tuple[Path, str | None]]:
    """(test file, test function or None) for each reference in a proved-by cell."""
    found, current = [], None
    for match in REFERENCE.finditer(cell):
        if match["file"]:
            # "Test paths without a folder are in tests/reliability/"
            current = ROOT / match["file"] if "/" in match["file"] else ROOT / "tests" / "reliability" / match["file"]
        if match["file"] or match["test"]:
            assert current is not None, f"`::{match['test']}` before any file is named: {cell[:120]}"
            found.append((current, match["test"]))
    return found


def _test_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_reliability_page_names_exists():
    rows = guarantee_rows()
    assert len(rows) >= 14, "the Guarantees table was not found where expected"
    missing = []
    for guarantee, cell in rows:
        tests, benchmarks = named_tests(cell), BENCHMARK.findall(cell)
        assert tests or benchmarks, f"{guarantee}: no test or benchmark named"
        missing += [f"{guarantee}: {script}" for script in benchmarks if not (ROOT / script).is_file()]
        for path, name in tests:
            if not path.is_file():
                missing.append(f"{guarantee}: {path.relative_to(ROOT)}")
            elif name is not None and name not in _test_functions(path):
                missing.append(f"{guarantee}: {path.relative_to(ROOT)}::{name}")
    assert not missing, "\n".join(missing)


def test_the_check_itself_sees_a_name_that_does_not_exist():
    cell = "`test_damaged_shards.py::test_verify_names_the_shard_and_sample`, `::test_no_such_test`"
    (path, first), (same, second) = named_tests(cell)
    assert path == same == ROOT / "tests" / "reliability" / "test_damaged_shards.py"
    assert first in _test_functions(path) and second not in _test_functions(path)
