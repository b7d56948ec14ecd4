"""Images/s of our DALI train loader against its peers on the same shards, cores, batch size,
thread count, output dtype and layout: the baseline loader (webdataset + PIL + DataLoader) and,
with `--peer ffcv`, FFCV 1.0.2 (benchmarks/ffcv_loader.py, run in its own venv).

    python benchmarks/loaders.py --data SHARDS [--peer baseline] [--peer ffcv] [--json FILE]

Every contender runs in a child process of its own (its own heap: the allocator tuning one applies
stays in it), warmed up once (timed, reported, never counted), then the contenders take equal
windows in turn (window_harness.py: >= --seconds AND >= --min-batches each, --rounds rounds, the
order reversed every round); medians, min-max and every round are reported, with the load average.
All children run on the cores this process may use (or --cpus), with the same thread count.

Contenders: ours at each --layout (nchw: [B,3,227,227] contiguous; nhwc: the same shape with
channels_last strides, FFCV's stock output), the baseline (nchw only), FFCV at each layout stock,
and FFCV with our process's glibc tuning (pipeline/host.py keep_batch_buffers_mapped) unless
--no-ffcv-tuned. Every contender does read, decode, a random 227 crop of the 256 image, mirror,
normalize to float (PCA lighting: ours and the baseline only, folded into normalize's mean), batches
on the CPU. Our loader's epochs roll over (set_epoch) inside a window, FFCV's too.

--json writes {"config", "load_avg_1m_before", "load_avg_1m_after", "contenders": {name: {img_per_s
(median), min, max, rounds, cpu_ms_per_img, warmup, ...}}, "dali": ours at nchw, "baseline",
"ratio" (ours / baseline, nchw), "ffcv": {"img_per_s", "layout"} (stock, nhwc when measured),
"ratio_vs_ffcv" (ours / FFCV stock at that layout), "ratios_vs_ffcv" per layout, stock and tuned}.

The GPU loader's figure is benchmarks/gpu_check.py's (steady-state batches, gpu_children.py).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from window_harness import Contender, WindowRule, interleave, output_problem, serve  # noqa: E402  (stdlib only)

LAYOUTS = ("nchw", "nhwc")


# -- the child side: our loaders ------------------------------------------------------------------
def _our_batches(options: dict):
    """Endless batch sizes from our loader (`options`: LoaderSpec fields, dtype by name)."""
    import torch

    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader

    want = options.get("dtype", "float32")
    spec = LoaderSpec(**dict(options, dtype=getattr(torch, want)))
    loader = make_loader(spec)
    epoch, checked = 0, False
    while True:
        loader.set_epoch(epoch)
        for x, _ in loader:
            if not checked:       # the same output as every other contender, or no comparison
                problem = output_problem(x.shape, x.stride(), str(x.dtype), "nhwc" if spec.channels_last else "nchw", want)
                if problem:
                    raise SystemExit(f"ours: {problem}")
                checked = True
            yield x.shape[0]
        epoch += 1


def serve_ours(argv: list[str]) -> None:
    options, warmup = json.loads(argv[0]), int(argv[1])
    serve(lambda: _our_batches(options), warmup)


# -- the parent -----------------------------------------------------------------------------------
def _ours_argv(options: dict, warmup: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(options), str(warmup)]


def _ffcv_argv(venv: Path, beton: Path, data: Path, layout: str, tuned: bool, batch_size: int, workers: int,
               dtype: str, warmup: int, decoder: str = "crop") -> list[str]:
    size = json.loads((data / "manifest.json").read_text())["image"]["size"]
    return [str(venv / "bin" / "python"), str(HERE / "ffcv_loader.py"), "serve", "--beton", str(beton),
            "--stats", str(data / "stats.json"), "--image-size", str(size), "--layout", layout, "--batch-size", str(batch_size), "--workers", str(workers), "--dtype", dtype,
            "--warmup", str(warmup), "--decoder", decoder, *(["--tuned"] if tuned else [])]


def main() -> None:
    import click

    @click.command()
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="shard set directory")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the results here")
    @click.option("--batch-size", type=int, default=64, show_default=True)
    @click.option("--workers", type=int, default=None,
                  help="threads / workers of every contender [default: this process's cores]")
    @click.option("--peer", "peers", type=click.Choice(["baseline", "ffcv"]), multiple=True,
                  help="peers to compare with (repeat) [default: baseline]")
    @click.option("--layout", "layouts", type=click.Choice(LAYOUTS), multiple=True,
                  help="output layouts (repeat) [default: nchw; both with --peer ffcv]")
    @click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
                  help="every contender's output dtype")
    @click.option("--seconds", type=float, default=10.0, show_default=True, help="each window lasts at least this")
    @click.option("--min-batches", type=int, default=200, show_default=True, help="... and at least this many batches")
    @click.option("--rounds", type=int, default=3, show_default=True, help="windows per contender, interleaved")
    @click.option("--warmup", type=int, default=20, show_default=True, help="batches before the first window")
    @click.option("--cpus", default=None, help="cores for every contender, e.g. 0,1 [default: this process's]")
    @click.option("--ours", "ours_json", default="{}",
                  help='LoaderSpec fields for our loader as JSON, e.g. \'{"roi_decode": false}\'')
    @click.option("--compare", "variants", multiple=True,
                  help="another configuration of ours as JSON LoaderSpec fields, run at nchw (unless it sets channels_last) as one more contender "
                       "(repeat), e.g. '{\"roi_decode\": false}': a step's before and after in the same windows")
    @click.option("--ffcv-venv", type=click.Path(file_okay=False), default=str(HERE.parent / ".ffcv-venv"),
                  show_default=True, help="made by benchmarks/ffcv_setup.sh")
    @click.option("--beton", type=click.Path(dir_okay=False), default=None,
                  help="FFCV dataset file, written from --data's train shards if missing [default: DATA.train.beton]")
    @click.option("--ffcv-tuned/--no-ffcv-tuned", default=True, show_default=True,
                  help="also run FFCV with our glibc heap tuning")
    def cli(data, json_path, batch_size, workers, peers, layouts, dtype, seconds, min_batches, rounds, warmup, cpus,
            ours_json, variants, ffcv_venv, beton, ffcv_tuned):
        from alexnet_fast.pipeline.shardset import ShardSet, ShardSetError

        try:
            ShardSet.open(data).stats()
            ours_extra = json.loads(ours_json)
            variants = [json.loads(v) for v in variants]
            cores = {int(c) for c in cpus.split(",")} if cpus else os.sched_getaffinity(0)
        except (ShardSetError, ValueError) as e:
            raise click.UsageError(str(e)) from None
        peers = peers or ("baseline",)
        layouts = layouts or (LAYOUTS if "ffcv" in peers else ("nchw",))
        workers = workers or len(cores)
        venv, beton = Path(ffcv_venv), Path(beton or f"{str(data).rstrip('/')}.train.beton")
        if "ffcv" in peers:
            if not (venv / "READY").exists():
                raise click.UsageError(f"--peer ffcv: no working FFCV venv at {venv}; run benchmarks/ffcv_setup.sh")
            if not beton.exists():
                import subprocess
                print(f"writing {beton} from {data}'s train shards (JPEG bytes unchanged) ...", flush=True)
                subprocess.run([str(venv / "bin" / "python"), str(HERE / "ffcv_loader.py"), "write", "--data",
                                str(data), "--beton", str(beton)], check=True)

        base = {"data": str(data), "split": "train", "batch_size": batch_size, "workers": workers, "dtype": dtype,
                "borrow_buffers": True}      # batches as the trainer takes them (consumed before the next)
        plan: list[tuple[str, list[str]]] = []
        for layout in layouts:
            plan.append((f"ours-{layout}", _ours_argv({**base, **ours_extra, "channels_last": layout == "nhwc"}, warmup)))
        for variant in variants:
            label = ",".join(f"{k}={v}" for k, v in variant.items())
            layout = "nhwc" if variant.get("channels_last", ours_extra.get("channels_last")) else "nchw"
            plan.append((f"ours[{label}]-{layout}", _ours_argv({**base, **ours_extra, **variant}, warmup)))
        if "baseline" in peers:
            plan.append(("baseline-nchw", _ours_argv({**base, "kind": "baseline"}, warmup)))
        if "ffcv" in peers:
            for layout in layouts:
                for tuned in (False, True) if ffcv_tuned else (False,):
                    plan.append((f"ffcv{'-tuned' if tuned else ''}-{layout}",
                                 _ffcv_argv(venv, beton, Path(data), layout, tuned, batch_size, workers, dtype, warmup)))

        results = {"config": {"data": str(data), "batch_size": batch_size, "workers": workers, "dtype": dtype,
                              "cpus": sorted(cores), "rounds": rounds, "window_s": seconds,
                              "window_min_batches": min_batches, "warmup_batches": warmup, "ours": ours_extra, "variants": variants,
                              "machine_cpus": os.cpu_count()},
                   "load_avg_1m_before": os.getloadavg()[0]}
        rule = WindowRule(seconds, min_batches)
        contenders = []
        try:
            for name, argv in plan:      # started one by one: each warm-up runs alone
                contenders.append(Contender(name, argv, cpus=cores))
                w = contenders[-1].warmup
                print(f"{name:>28}: warm-up {w['warmup_batches']} batches in {w['warmup_s']:.1f} s (build included)",
                      flush=True)
            interleave(contenders, rounds, rule, log=lambda line: print(line, flush=True))
        finally:
            for c in contenders:
                c.close()
        results["load_avg_1m_after"] = os.getloadavg()[0]
        results["contenders"] = {c.name: c.summary() for c in contenders}
        results.update(_ratios(results["contenders"], layouts))
        _print_summary(results)
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=2))

    cli()


def _ratios(by_name: dict, layouts) -> dict:
    """Medians divided: ours / each peer at the same layout."""
    rate = {name: s["img_per_s"] for name, s in by_name.items()}
    out = {}
    if "ours-nchw" in rate:
        out["dali"] = by_name["ours-nchw"]
    if "baseline-nchw" in rate:
        out["baseline"] = by_name["baseline-nchw"]
        if "ours-nchw" in rate:
            out["ratio"] = rate["ours-nchw"] / rate["baseline-nchw"]
    ratios = {}
    for layout in layouts:
        for peer in ("ffcv", "ffcv-tuned"):
            if f"{peer}-{layout}" in rate:
                ratios[f"{peer}-{layout}"] = rate[f"ours-{layout}"] / rate[f"{peer}-{layout}"]
    if ratios:
        stock = "nhwc" if "ffcv-nhwc" in rate else layouts[0]      # FFCV's stock output is NHWC
        out["ffcv"] = {"img_per_s": rate[f"ffcv-{stock}"], "layout": stock}
        out["ratio_vs_ffcv"] = ratios[f"ffcv-{stock}"]
        out["ratios_vs_ffcv"] = ratios
        # peer's CPU time per image / ours: what a loaded, shared machine distorts least
        cpu = {name: s["cpu_ms_per_img"] for name, s in by_name.items()}
        out["cpu_ratios_vs_ffcv"] = {peer: cpu[peer] / cpu["ours-" + peer.rsplit("-", 1)[1]] for peer in ratios}
    return out


def _print_summary(results: dict) -> None:
    print(f"\nmedians over {results['config']['rounds']} windows (min-max); load average "
          f"{results['load_avg_1m_before']:.1f} -> {results['load_avg_1m_after']:.1f}")
    for name, s in results["contenders"].items():
        print(f"{name:>28}: {s['img_per_s']:8.1f} img/s  ({s['min']:.0f}-{s['max']:.0f}; "
              f"{s['cpu_ms_per_img']:.2f} CPU-ms/img; warm-up {s['warmup']['warmup_s']:.1f} s)")
    if "ratio" in results:
        print(f"   ours / baseline (nchw): {results['ratio']:.2f}x")
    for peer, r in results.get("ratios_vs_ffcv", {}).items():
        print(f"   ours / {peer}: {r:.2f}x in img/s, {results['cpu_ratios_vs_ffcv'][peer]:.2f}x in CPU time per image")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":      # a contender's child process (see serve_ours)
        serve_ours(sys.argv[2:])
    else:
        main()
