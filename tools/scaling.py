"""The analytic data-parallel scaling model behind `alexnet-fast profile --scaling` (see docs/scaling.md).

From one measured number — the per-GPU training step time at a per-GPU batch — and the gradient
size, predict the img/s of N GPUs under DDP with a ring all-reduce:

    comm(N)  = 2 (N-1)/N * grad_bytes / link_bytes_per_s  +  buckets * 2 (N-1) * hop_latency
    hidden   = overlap * compute          # the all-reduce runs under the backward pass
    step(N)  = compute - hidden + max(hidden, comm(N))
    img/s(N) = N * per_gpu_batch / step(N)         (capped per GPU by the loader, when measured)

AlexNet is the worst case for this: its FC layers hold ~58M of ~61M parameters, so each step moves
~244 MB of fp32 gradients for only ~4 GFLOP of compute per image. Two levers: bf16 gradient
compression (DDP comm hook: half the bytes) and a larger per-GPU batch (the same bytes per step,
spread over more images).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

DEFAULT_GPU_COUNTS = (1, 2, 8, 64, 512)
DEFAULT_OVERLAP = 2 / 3   # backward ~ 2x forward FLOPs: the all-reduce can hide under 2/3 of a step
DDP_BUCKET_BYTES = 25 * 1024 * 1024   # DDP's bucket_cap_mb=25 (of fp32 gradients): one all-reduce each


@dataclass(frozen=True)
class ScalingInputs:
    step_seconds: float                    # measured per-GPU step time (forward+backward+update)
    batch: int                             # the per-GPU batch that step time was measured at
    params: int                            # parameters whose gradients are all-reduced
    link_gbps: float                       # per-GPU all-reduce bandwidth, Gbit/s (math.inf: comm is free)
    overlap: float = DEFAULT_OVERLAP       # fraction of compute that can hide communication
    hop_latency_us: float = 0.0            # per ring step; 0 = the bandwidth term alone (optimistic)
    loader_img_per_s: float | None = None  # per-GPU loader ceiling (the decode stage), if measured
    activation_bytes: int = 4              # --parallel schemes' exchanged activations: 2 under bf16/fp16 autocast

    def __post_init__(self) -> None:
        if not (self.step_seconds > 0 and self.batch > 0 and self.params > 0 and self.link_gbps > 0):
            raise ValueError("step time, batch, parameter count and link bandwidth must be positive")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"overlap must be in [0, 1], got {self.overlap}")


@dataclass(frozen=True)
class Strategy:
    """One way to run data parallel: the bytes per gradient element on the wire and the batch."""
    name: str
    grad_bytes_per_param: int     # 4: fp32 all-reduce; 2: bf16 compression hook
    batch_factor: int = 1         # per-GPU batch = measured batch * batch_factor

    @property
    def label(self) -> str:
        wire = {4: "fp32", 2: "bf16"}.get(self.grad_bytes_per_param, f"{self.grad_bytes_per_param}B")
        return f"ddp {wire}" + (f" batch x{self.batch_factor}" if self.batch_factor != 1 else "")


def default_strategies(batch_factor: int = 4) -> tuple[Strategy, ...]:
    return (
        Strategy("ddp_fp32", 4),
        Strategy("ddp_bf16", 2),
        Strategy(f"ddp_fp32_batch_x{batch_factor}", 4, batch_factor),
        Strategy(f"ddp_bf16_batch_x{batch_factor}", 2, batch_factor),
    )


@dataclass(frozen=True)
class Prediction:
    strategy: str
    gpus: int
    per_gpu_batch: int
    compute_ms: float
    comm_ms: float
    step_ms: float
    img_per_s: float              # all GPUs together
    efficiency: float             # img_per_s / (gpus x the measured single-GPU img/s)
    bound: str                    # "compute", "comm" or "loader"

    def as_dict(self) -> dict:
        return asdict(self)


def ring_allreduce_seconds(nbytes: float, gpus: int, link_gbps: float, hop_latency_us: float = 0.0,
                           messages: int = 1) -> float:
    """Time to ring-all-reduce `nbytes` split over `messages` all-reduces: each GPU sends and
    receives 2(N-1)/N of the bytes, and each all-reduce pays 2(N-1) hop latencies."""
    if gpus <= 1:
        return 0.0
    bandwidth = 0.0 if math.isinf(link_gbps) else 2 * (gpus - 1) / gpus * nbytes / (link_gbps * 1e9 / 8)
    return bandwidth + messages * 2 * (gpus - 1) * hop_latency_us * 1e-6


def ddp_buckets(params: int) -> int:
    """All-reduces per step: DDP packs fp32 gradients into ~25 MB buckets (the bf16 hook compresses
    each bucket, so the count is the same)."""
    return max(1, math.ceil(params * 4 / DDP_BUCKET_BYTES))


def predict(inputs: ScalingInputs, strategy: Strategy, gpus: int) -> Prediction:
    batch = inputs.batch * strategy.batch_factor
    # Assumption: compute per image is what was measured (a larger batch is never slower per image
    # on a GPU, so this is conservative for the larger-batch rows).
    compute = inputs.step_seconds * strategy.batch_factor
    comm = ring_allreduce_seconds(inputs.params * strategy.grad_bytes_per_param, gpus,
                                  inputs.link_gbps, inputs.hop_latency_us, ddp_buckets(inputs.params))
    hidden = inputs.overlap * compute
    step = compute - hidden + max(hidden, comm)
    per_gpu = batch / step
    bound = "comm" if comm > hidden else "compute"
    if inputs.loader_img_per_s is not None and per_gpu > inputs.loader_img_per_s:
        per_gpu, bound = inputs.loader_img_per_s, "loader"
        step = batch / per_gpu
    single = inputs.batch / inputs.step_seconds
    return Prediction(strategy.name, gpus, batch, compute * 1e3, comm * 1e3, step * 1e3,
                      gpus * per_gpu, gpus * per_gpu / (gpus * single), bound)


def predict_table(inputs: ScalingInputs, strategies: tuple[Strategy, ...] = default_strategies(),
                  gpu_counts: tuple[int, ...] = DEFAULT_GPU_COUNTS) -> list[Prediction]:
    return [predict(inputs, s, n) for n in gpu_counts for s in strategies]


def scaling_report(inputs: ScalingInputs, strategies: tuple[Strategy, ...] = default_strategies(),
                   gpu_counts: tuple[int, ...] = DEFAULT_GPU_COUNTS, source: str = "") -> dict:
    """The JSON section: where the step time came from, inputs, assumptions, one row per (GPUs, strategy)."""
    return {
        "source": source,
        "inputs": {**asdict(inputs), "grad_mb_fp32": inputs.params * 4 / 1e6, "ddp_buckets": ddp_buckets(inputs.params),
                   "single_gpu_img_per_s": inputs.batch / inputs.step_seconds},
        "assumptions": ASSUMPTIONS,
        "strategies": {s.name: s.label for s in strategies},
        "predictions": [p.as_dict() for p in predict_table(inputs, strategies, gpu_counts)],
    }


ASSUMPTIONS = [
    "ring all-reduce of all gradients every step: 2(N-1)/N x bytes over a per-GPU link of link_gbps",
    "each of DDP's ~25 MB gradient buckets is one ring all-reduce paying 2(N-1) x hop_latency_us "
    "(default 0: the bandwidth term alone, optimistic at 512 GPUs)",
    "the all-reduce overlaps the backward pass: it hides under `overlap` of the step's compute",
    "compute per image stays what was measured on one GPU (no gain from a larger batch: conservative)",
    "bf16 compression halves the bytes; the casts cost nothing (they are tiny elementwise kernels)",
    "the loader ceiling, when given, is the measured per-GPU decode img/s (each GPU decodes its own shards)",
]


def format_scaling(report: dict) -> str:
    """A readable table: GPUs down, strategies across, total img/s and scaling efficiency."""
    inputs = report["inputs"]
    names = list(report["strategies"])
    rows: dict[int, dict[str, dict]] = {}
    for p in report["predictions"]:
        rows.setdefault(p["gpus"], {})[p["strategy"]] = p
    link = "free (inf)" if math.isinf(inputs["link_gbps"]) else f"{inputs['link_gbps']:g} Gbit/s"
    lines = [
        f"scaling prediction (a model, not a measurement) from {report['source'] or 'the given step time'}:",
        f"  per-GPU step {inputs['step_seconds'] * 1e3:.1f} ms at batch {inputs['batch']} "
        f"= {inputs['single_gpu_img_per_s']:,.0f} img/s; "
        f"{inputs['params'] / 1e6:.1f}M params = {inputs['grad_mb_fp32']:.0f} MB fp32 gradients; "
        f"link {link}; overlap {inputs['overlap']:.0%}",
        f"{'gpus':>5}  " + "  ".join(f"{report['strategies'][n]:>26}" for n in names),
    ]
    for gpus, by_name in rows.items():
        cells = []
        for n in names:
            p = by_name[n]
            cells.append(f"{p['img_per_s']:>13,.0f} ({p['efficiency']:>4.0%} {p['bound']:<7})")
        lines.append(f"{gpus:>5}  " + "  ".join(f"{c:>26}" for c in cells))
    lines.append("(img/s of all GPUs; % = of linear scaling; bound = what limits the step)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the three --parallel schemes, from the bytes each really passes (model/parallel/accounting.py)
# --------------------------------------------------------------------------------------------
SCHEME_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)      # 1-8 GPUs on one node, then 2-8 nodes of 8
# gradients: all-reduced as backward produces them (hidden under `overlap` of the compute);
# everything else (activations, logits) sits between two layers: on the critical path
OVERLAPPED_KEYS = ("gradient buckets", "conv gradients", "column gradients")
PIPELINED_KEY = "fc input rows"     # hybrid-pipelined: each rank's rows travel under the FC layers' compute


def activation_bytes(precision: str) -> int:
    """Bytes of an exchanged activation under a resolved precision: autocast's output dtype, or fp32."""
    from alexnet_fast.model.runtime import AUTOCAST_DTYPES

    dtype = AUTOCAST_DTYPES[precision]
    return 4 if dtype is None else dtype.itemsize


@functools.lru_cache(maxsize=None)        # layer_flops builds the network: ~0.8 s a call
def fc_share(arch: str, num_classes: int) -> float:
    """The FC layers' share of a step's FLOPs (model/flops.py): what hybrid-pipelined's row
    transfers can hide under (each rank computes its neurons for all B rows: b images' worth)."""
    from alexnet_fast.model.flops import layer_flops

    layers = layer_flops(arch, num_classes)
    return sum(f for name, f in layers if name.startswith("classifier")) / sum(f for _, f in layers)


def predict_scheme(inputs: ScalingInputs, parallel: str, arch: str, num_classes: int, gpus: int) -> Prediction | None:
    """img/s of `gpus` GPUs running `parallel` (a --parallel choice), each step's bytes counted by
    the scheme's accounting at the per-GPU batch `inputs.batch`, activations at
    `inputs.activation_bytes` (columns: per replica of 2 GPUs, each doing half its kernels, so half
    the measured compute). Gradients hide under `overlap` of the compute; activation exchanges are
    on the critical path, except hybrid-pipelined's row transfers, of which all but one share's
    ((n-1)/n) hide under the FC layers' compute. Left out: what pipelining costs, n passes over
    each rank's FC weights and n weight gradients accumulated per step (on CPU ranks 40-70% slower
    steps than hybrid, benchmarks/RESULTS.md; on a GPU about the size of its predicted gain). None
    where the scheme cannot run (columns on an odd GPU count, or on a network without columns)."""
    predicted = _scheme_prediction(inputs, parallel, arch, num_classes, gpus)
    return None if predicted is None else predicted[0]


def _scheme_prediction(inputs: ScalingInputs, parallel: str, arch: str, num_classes: int,
                       gpus: int) -> tuple[Prediction, float] | None:
    """predict_scheme's prediction and the bytes each GPU sends per step it rests on."""
    from alexnet_fast.model.config import COLUMN_ARCHS
    from alexnet_fast.model.parallel.accounting import step_traffic

    columns = parallel == "columns"
    if columns and (gpus % 2 or arch not in COLUMN_ARCHS):
        return None
    readers = gpus // 2 if columns else gpus
    compute = inputs.step_seconds / 2 if columns else inputs.step_seconds
    traffic = step_traffic(parallel, arch, num_classes, inputs.batch * readers, gpus, inputs.activation_bytes)
    per_byte = 0.0 if math.isinf(inputs.link_gbps) else 8 / (inputs.link_gbps * 1e9)
    where = lambda key: key.split(":", 1)[1]  # noqa: E731
    hidden_bytes = sum(v for k, v in traffic.sent.items() if where(k) in OVERLAPPED_KEYS)
    exposed_bytes = traffic.sent_bytes - hidden_bytes
    under_fc = 0.0                  # seconds of row transfers that hide under the FC layers
    if parallel == "hybrid-pipelined" and gpus > 1:
        rows = sum(v for k, v in traffic.sent.items() if where(k) == PIPELINED_KEY) * per_byte
        under_fc = min((gpus - 1) / gpus * rows, fc_share(arch, num_classes) * compute)
    latency = len(traffic.sent) * 2 * max(gpus - 1, 0) * inputs.hop_latency_us * 1e-6
    hidden = inputs.overlap * compute
    comm = (hidden_bytes + exposed_bytes) * per_byte + latency
    step = (compute + exposed_bytes * per_byte - under_fc + latency
            + max(0.0, hidden_bytes * per_byte - hidden))
    per_gpu_images = inputs.batch * readers / gpus / step
    bound = "comm" if step > compute * 1.05 else "compute"
    if inputs.loader_img_per_s is not None and inputs.batch / step > inputs.loader_img_per_s:
        per_gpu_images, bound = inputs.loader_img_per_s * readers / gpus, "loader"
        step = inputs.batch / inputs.loader_img_per_s
    single = inputs.batch / inputs.step_seconds
    return (Prediction(parallel, gpus, inputs.batch, compute * 1e3, comm * 1e3, step * 1e3,
                       gpus * per_gpu_images, per_gpu_images / single, bound), traffic.sent_bytes)


def scheme_table(inputs: ScalingInputs, arch: str, num_classes: int = 1000,
                 gpu_counts: tuple[int, ...] = SCHEME_GPU_COUNTS) -> list[dict]:
    """One row per (GPUs, scheme) that can run; the bytes each GPU sends per step with it."""
    from alexnet_fast.model.parallel import PARALLEL_NAMES

    rows = []
    for gpus in gpu_counts:
        for parallel in PARALLEL_NAMES:
            predicted = _scheme_prediction(inputs, parallel, arch, num_classes, gpus)
            if predicted is not None:
                p, sent = predicted
                rows.append({**p.as_dict(), "sent_mb_per_gpu": sent / 1e6})
    return rows


def format_scheme_table(rows: list[dict]) -> str:
    lines = ["--parallel schemes (a model: bytes counted from each scheme's collectives, model/parallel/accounting.py):",
             f"{'gpus':>5}  {'scheme':<16} {'MB sent/GPU/step':>17} {'img/s':>12}  of linear  bound"]
    for r in rows:
        lines.append(f"{r['gpus']:>5}  {r['strategy']:<16} {r['sent_mb_per_gpu']:>17.1f} {r['img_per_s']:>12,.0f}  "
                     f"{r['efficiency']:>8.0%}  {r['bound']}")
    return "\n".join(lines)


def batch_hiding_comm(params: int, grad_bytes_per_param: int, gpus: int, link_gbps: float, img_per_s: float,
                      overlap: float = DEFAULT_OVERLAP, hop_latency_us: float = 0.0) -> int:
    """The smallest per-GPU batch whose compute hides the step's all-reduce (overlap x batch /
    img_per_s >= comm(N)): the all-reduce moves the same bytes whatever the batch, so only a larger
    batch (or fewer bytes) makes a comm-bound step compute-bound again."""
    comm = ring_allreduce_seconds(params * grad_bytes_per_param, gpus, link_gbps, hop_latency_us, ddp_buckets(params))
    return max(1, math.ceil(comm * img_per_s / overlap))
