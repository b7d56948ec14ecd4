"""make_shards on Ray (`--ray`): the same bytes as a local run, a Ray worker killed mid-task, the driver
killed and rerun, and the one line a user without Ray gets.

Everything runs on one local Ray instance of 2 CPUs started once for this module (the CI machine's
cores); the killed-driver test's subprocesses join it by its address, as a driver joins a cluster.
The local reference is the session's `shard_set` (tests/conftest.py: the real make_shards with one
process on `raw_imagenet`, whose odd files are rejected).

The killed worker is a real SIGKILL of a real Ray worker process in the middle of a shard write: a
`worker_process_setup_hook` (this file's, shipped to the workers by Ray, nothing in the product)
wraps os.replace in every worker; once the test arms it, the first worker that is about to rename a
shard tar into place records its pid and kills itself, its .idx already final and its tar a temp
file. Ray runs the task again in another worker (max_retries); the run must still end with the
local run's bytes and no temp file left.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_fast.tools.sharding.driver import ShardOptions, make_shards

REPO = Path(__file__).resolve().parents[1]
MAKE_SHARDS = [sys.executable, str(REPO / "tools" / "make_shards")]
KILLPOINT = [sys.executable, str(REPO / "tests" / "reliability" / "killpoint.py")]
QUIET = dict(progress=False, log=lambda msg: None)

# every test here starts training or sharding processes: outside the fast subset (-m "not slow")
pytestmark = pytest.mark.slow


def options_of(shard_set: Path) -> ShardOptions:
    """The options the session's `shard_set` was made with (its manifest records them)."""
    args = json.loads((shard_set / "manifest.json").read_text())["created_by"]["args"]
    return ShardOptions(**{k: v for k, v in args.items() if k != "raw"})


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too): equal dicts = byte-identical trees."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _kill_first_armed_tar_rename(control: str) -> None:
    """Worker setup hook: once `control`/armed exists, the first worker to rename a shard tar into
    place claims `control`/fired (O_EXCL: exactly one worker, once) and SIGKILLs itself instead."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".tar") and os.path.exists(os.path.join(control, "armed")):
            try:
                fd = os.open(os.path.join(control, "fired"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, f"{os.getpid()} {dst}".encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray instance with 2 CPUs for this module; yields (its address, the kill-hook control dir)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' installs it")
    import logging

    import ray.cloudpickle

    control = tmp_path_factory.mktemp("kill_control")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file

    def setup_hook() -> None:  # Ray wants a named function, not a partial
        _kill_first_armed_tar_rename(str(control))

    # a 256 MB object store, not Ray's default 30% of RAM: these shard sets are a few MB, and the suite
    # runs other multi-process tests beside this one (README: `pytest -n 2`)
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, logging_level=logging.ERROR,
             runtime_env={"worker_process_setup_hook": setup_hook})
    try:
        yield ray.get_runtime_context().gcs_address, control
    finally:
        ray.shutdown()


def _ray_run(raw: Path, out: Path, opts: ShardOptions):
    from alexnet_fast.tools.sharding.ray_executor import RayExecutor

    return make_shards(raw, out, opts, workers=1, executor=RayExecutor(), **QUIET)


def test_ray_output_is_the_local_runs_bytes(ray_cluster, raw_imagenet, shard_set, tmp_path):
    out = tmp_path / "out"
    report = _ray_run(raw_imagenet.root, out, options_of(shard_set))
    assert report.rejected > 0                      # the odd files were rejected on Ray workers...
    assert tree_bytes(out) == tree_bytes(shard_set)  # ...and listed exactly as locally, like every other byte


def test_ray_small_shards_match_a_local_run(ray_cluster, raw_imagenet, tmp_path):
    """Shards smaller than a conversion block and cuts that fall inside blocks, across rejections."""
    opts = ShardOptions(per_shard=5, stats_images=16)
    local, remote = tmp_path / "local", tmp_path / "ray"
    make_shards(raw_imagenet.root, local, opts, workers=2, **QUIET)
    _ray_run(raw_imagenet.root, remote, opts)
    assert tree_bytes(remote) == tree_bytes(local)


def test_a_killed_ray_worker_is_retried_and_the_bytes_are_the_same(ray_cluster, raw_imagenet, shard_set, tmp_path):
    _, control = ray_cluster
    (control / "armed").touch()
    try:
        out = tmp_path / "out"
        _ray_run(raw_imagenet.root, out, options_of(shard_set))
    finally:
        (control / "armed").unlink()
    fired = (control / "fired").read_text()        # a worker really died mid-write...
    assert fired.endswith(".tar") and str(out) in fired
    assert tree_bytes(out) == tree_bytes(shard_set)  # ...its task ran again; no temp file is left


def _cli(raw: Path, out: Path, opts: ShardOptions, address: str) -> list[str]:
    assert opts == ShardOptions(per_shard=opts.per_shard)  # the other options are the CLI's defaults
    return [str(raw), str(out), "--per-shard", str(opts.per_shard), "--workers", "1", "--no-progress", "--ray", address]


def test_a_killed_driver_resumes_from_its_finished_shards(ray_cluster, raw_imagenet, shard_set, tmp_path):
    address, _ = ray_cluster
    out = tmp_path / "out"
    # SIGKILL the driver right after it recorded train shard 2 (killpoint.py: at that rename).
    killed = subprocess.run([*KILLPOINT, str(out), "--kill", ".make_shards/train-000002.json:after", "--",
                             *MAKE_SHARDS[1:], *_cli(raw_imagenet.root, out, options_of(shard_set), address)],
                            capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "manifest.json").exists()

    rerun = subprocess.run([*MAKE_SHARDS, *_cli(raw_imagenet.root, out, options_of(shard_set), address)],
                           capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "3 shard(s) reused from an interrupted run" in rerun.stdout
    assert tree_bytes(out) == tree_bytes(shard_set)


def test_without_ray_the_flag_says_how_to_install_it(raw_imagenet, tmp_path):
    """A Python where `import ray` fails (sys.modules['ray'] = None is how Python spells "absent")."""
    code = ("import sys; sys.modules['ray'] = None; sys.argv = ['make_shards', *sys.argv[1:]]; "
            "from alexnet_fast.tools.cli import run_command; from alexnet_fast.tools.cmd_shards import shards_command; "
            "run_command(shards_command, 'make_shards')")
    done = subprocess.run([sys.executable, "-c", code, str(raw_imagenet.root), str(tmp_path / "out"), "--ray"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'alexnet-fast[ray]'" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()  # refused before touching OUT


def test_an_address_nobody_answers_is_one_line(raw_imagenet, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' installs it")
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([*MAKE_SHARDS, str(raw_imagenet.root), str(tmp_path / "out"), "--no-progress",
                           "--ray", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"make_shards: error: cannot reach Ray at '127.0.0.1:{port}'")
