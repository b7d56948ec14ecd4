"""What `alexnet-fast profile` shows of a report (ProfileResult.as_dict()): the text table and
the PNG bar chart."""
from __future__ import annotations

from pathlib import Path

from alexnet_fast.tools.profile_config import Stage


def _detail(name: str, r: dict) -> str:
    if name == Stage.READ.value:
        return f"{r['mb_per_s']:,.1f} MB/s, page cache {r['page_cache']}"
    if "tflop_per_s" in r:
        peak = (f"{r['fraction_of_peak']:.1%} of {r['peak_tflop_per_s']:g} peak" if r["fraction_of_peak"] is not None
                else "peak unknown")
        compiled = f", compiled (warm-up {r['warmup_s']:.0f} s)" if r.get("compile") else ""
        host = ""
        if r.get("host_bound_below_batch") is not None:
            host = f"; host {r['host_ms_per_step']:.2f} ms/step: host-bound below batch {r['host_bound_below_batch']:.0f}"
        return (f"{r['arch']} {r['precision']}{compiled} batch {r['batch_size']}: {r['step_ms']:.1f} ms/step, "
                f"{r['tflop_per_s']:.3g} TFLOP/s ({peak}){host}")
    decode = f", decode on {r['decode']}" if r.get("decode") else ""
    return f"{r['loader']} loader, batch {r['batch_size']}{decode}"


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}", f"{'stage':<16} {'img/s':>12}  {'runs (img/s)':<28} detail"]
    for name, r in report["stages"].items():
        runs = ", ".join(f"{v:,.1f}" for v in r["runs_img_per_s"])
        lines.append(f"{name:<16} {r['img_per_s']:>12,.1f}  {runs:<28} {_detail(name, r)}")
    efficiency = "n/a (needs decode, model and end_to_end)" if report["efficiency"] is None else f"{report['efficiency']:.1%}"
    lines.append(f"bound by: {report['bound_by'] or 'n/a'}; pipeline efficiency end_to_end / min(decode, model): {efficiency}")
    if report.get("decode_placement"):
        advice = report["decode_placement"]
        lines.append(f"decode placement: the run needs --decode {advice['needs']}: {advice['why']}")
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> None:
    """A PNG bar chart of img/s per stage; the bounding stage in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["stages"])
    values = [report["stages"][n]["img_per_s"] for n in names]
    colors = ["tab:red" if n == report["bound_by"] else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_ylabel("images / s (median)")
    ax.set_yscale("log")
    title = f"{report['device']}: bound by {report['bound_by'] or 'n/a'}"
    if report["efficiency"] is not None:
        title += f", efficiency {report['efficiency']:.0%}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
