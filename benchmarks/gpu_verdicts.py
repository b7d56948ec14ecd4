"""What the device check (benchmarks/gpu_check.py) asserts about each step's figure: the verdict
functions, kept apart from the running so a CPU test can feed them real inputs.

A verdict is (passed, assertion, detail): passed True/False, or None when the assertion cannot be
judged here (a GPU-only assertion on a machine without one: "not on a GPU", never a pass).
"""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

NVJPEG_SONAME = "libnvjpeg.so"
# Host CPU time per decoded image, GPU loader / CPU twin, at most. The GPU path only reads tars,
# parses headers and runs nvJPEG's host half (Huffman decoding of the images the hardware decoder
# does not take); the CPU twin decodes, crops and normalizes every pixel on the host. A silent
# fall-back to CPU decoding costs about the twin's time; half is far above the GPU path's need
# and far below a fall-back. The same bound as tests/gpu/test_dali_gpu.py's GPU_HOST_CPU_SHARE;
# not measured on a GPU yet: the first run's figure is the measurement.
GPU_HOST_CPU_SHARE = 0.5
NOT_ON_A_GPU = "not on a GPU"


def mapped_nvjpeg(maps_text: str) -> list[str]:
    """The libnvjpeg files a process has mapped, from the text of its /proc/<pid>/maps."""
    return sorted({line.split()[-1] for line in maps_text.splitlines()
                   if NVJPEG_SONAME in line.rsplit("/", 1)[-1]})


def decode_verdict(result: dict) -> tuple[bool | None, str, str]:
    """Is the "mixed" decoder really on the GPU? libnvjpeg mapped after the GPU run, the batches on
    CUDA, and the GPU run's host CPU per image at most GPU_HOST_CPU_SHARE of the CPU decoder's.
    The mapping proves the library is there and loads, not that it decoded (a CPU-only DALI
    pipeline mapped it too in the dry run): the CPU-time ratio is what shows use."""
    assertion = (f"libnvjpeg mapped in the process; batches on cuda; host CPU-ms/img <= "
                 f"{GPU_HOST_CPU_SHARE} x the CPU decoder's")
    if "cuda" not in result:
        return None, assertion, f"{NOT_ON_A_GPU}: only the CPU decoder ran " \
                                f"({result['cpu']['cpu_ms_per_img']} CPU-ms/img)"
    problems = []
    if not result.get("libnvjpeg_mapped_after_gpu_run"):
        problems.append(f"no {NVJPEG_SONAME}* mapped after the GPU run: DALI decoded on the CPU "
                        "(nvidia-nvjpeg missing from --extra-site? docs/gpu.md)")
    if not result["cuda"]["out_device"].startswith("cuda"):
        problems.append(f"batches came out on {result['cuda']['out_device']}, not cuda")
    gpu_ms, cpu_ms = result["cuda"]["cpu_ms_per_img"], result["cpu"]["cpu_ms_per_img"]
    if not gpu_ms <= GPU_HOST_CPU_SHARE * cpu_ms:
        problems.append(f"host CPU per image: GPU loader {gpu_ms} ms vs CPU decoder {cpu_ms} ms: "
                        "decoding did not move to the GPU")
    return (not problems), assertion, "; ".join(problems)


def pytest_verdict(outcomes: dict, returncode: int | None) -> tuple[bool | None, str, str]:
    """Every collected test passed: failures fail; skips are listed (not passed); all skipped: not judged."""
    passed, failed, skipped = outcomes["passed"], outcomes["failed"], outcomes["skipped"]
    assertion = "every collected test passes; skipped ones are listed by name and reason"
    if returncode is None:
        return False, assertion, "timed out"
    if failed:
        return False, assertion, "; ".join(f"{name}: {message}" for name, message in failed)[:600]
    if not passed and skipped:
        return None, assertion, f"all {len(skipped)} skipped: {skipped[0][1]}"
    if returncode != 0 or not passed:
        return False, assertion, f"pytest exit {returncode}, {len(passed)} passed"
    return True, assertion, f"{len(skipped)} skipped" if skipped else ""


def compile_missing() -> str | None:
    """Why torch.compile (Inductor: it builds C++ and Triton's launcher with the host compiler
    against Python.h) cannot work here, or None."""
    problems = []
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        problems.append("no C compiler (cc, gcc or clang) on PATH")
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        problems.append(f"no Python headers ({include / 'Python.h'} missing)")
    return "; ".join(problems) or None
