"""Dense peak TFLOP/s of the GPUs the profiler knows, per precision: what a measured TFLOP/s is a
fraction of (`alexnet-fast profile`'s model and end_to_end stages).

Vendor datasheet figures, no sparsity. fp32 is the TF32 tensor-core rate, because the trainer
(and so the profiler) allows TF32 (model/runtime.py set_backend_flags). An unknown device has no
peak: the profile says "peak unknown" rather than guess.
"""
from __future__ import annotations

# Matched in order against torch.cuda.get_device_name(): the first key contained in the name wins,
# so the specific variants come before the generic "H100".
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),          # SXM (HBM3)
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of `device_name` at a resolved `precision` (bf16/fp16/fp32); None if unknown."""
    for key, table in PEAK_TFLOPS:
        if key in device_name:
            return table.get(precision)
    return None
