"""prunekit3d beside nnU-Net and MONAI baselines: what each network costs, in one run, on one machine.

Networks (1 input channel, 4 classes; each the library's own code):

    nnU-Net PlainConvUNet   dynamic-network-architectures, nnU-Net's default 3d_fullres plan shape: 6 stages,
                            32..320 features, 2 convs per stage, instance norm, LeakyReLU, deep supervision
    MONAI UNet              channels 16..256, strides 2, 2 residual units (MONAI's tutorial setting)
    MONAI DynUNet           nnU-Net-like: kernels 3, strides 1,2,2,2,2,2, filters 32..320
    PSP-Seg S / B / L       prunekit3d.models.psp_seg at start, and after pruning: progressive events of step 2
                            calibrated on patches of the sample CT until no module has more than 2 branches
                            (architecture only: the cost of a pruned network does not depend on its training)
    demo DynUNet            the small trained baseline of `prunekit3d demo` (shipped weights) and the same
                            network compressed by `prunekit3d compress --target-params 0.5` on the sample CT

For each: parameters, fvcore FLOPs, warm inference latency, training-step time and peak memory for
inference and one training step (prunekit3d.report.measure: the profiler's CPU allocator events, or
torch.cuda.max_memory_allocated on a GPU) at a patch of 64^3 on the CPU (128^3 when a GPU is used).
DSC: only where this run measures one -- the demo baseline and its compressed version, Dice against the
sample's labels on its one (training) case; the other networks are untrained here.

Writes ``compare.json``, ``compare.md`` (the table) and ``compare.png`` (cost panels, and cost against DSC)
into ``--out``.

Usage::

    python benchmarks/compare.py [--device cpu|cuda] [--size N] [--threads T] [--repeats 3] [--out compare-results]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from prunekit3d import calibrate, prune, redundant_modules, slim
from prunekit3d.io.files import atomic_file, write_json
from prunekit3d.report import ModelReport, measure

CLASSES = 4


def nnunet_plain() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        1, 6, (32, 64, 128, 256, 320, 320), nn.Conv3d, 3, (1, 2, 2, 2, 2, 2), 2, CLASSES, 2, conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=True,
    )


def monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(3, 1, CLASSES, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)


def monai_dynunet() -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(3, 1, CLASSES, [3] * 6, [1, 2, 2, 2, 2, 2], [2] * 5, filters=[32, 64, 128, 256, 320, 320])


def psp(variant: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from prunekit3d.models import psp_seg

        return psp_seg(variant, 1, CLASSES)

    return build


def sample_patches(size: int, n: int = 4) -> list[torch.Tensor]:
    """``n`` z-scored patches of the sample CT (padded to ``size`` where the CT is smaller)."""
    from prunekit3d.data import PatchSampler, normalise_volume, read_volumes
    from prunekit3d.sample import sample_dataset

    image = normalise_volume(read_volumes(sample_dataset())[0], "zscore")
    sampler = PatchSampler([image], None, (size,) * 3)
    generator = torch.Generator().manual_seed(0)
    return [sampler.sample(1, generator)[0] for _ in range(n)]


def pruned(build: Callable[[], nn.Module], patches: list[torch.Tensor]) -> Callable[[], nn.Module]:
    """``build()`` after progressive pruning events of step 2 until none applies, then slimmed."""

    def prune_all() -> nn.Module:
        model = build().eval()
        while any(len(m.active_indices()) > 2 for _, m in redundant_modules(model)):
            prune(model, calibrate(model, patches, step=2))
        return slim(model)

    return prune_all


def demo_pair(console: Console) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The demo baseline and its compressed version (compress run here, label-free, on the calibration images),
    Dice measured on the held-out evaluation slab."""
    import safetensors.torch

    from prunekit3d.recipes.compress import CompressConfig, compress
    from prunekit3d.recipes.demo import BASELINE_SPEC, PATCH, PREPROCESSING, baseline, demo_data

    model, _ = baseline(console)
    with tempfile.TemporaryDirectory() as tmp:
        split, _, held_out = demo_data(Path(tmp) / "data")
        checkpoint = Path(tmp) / "baseline.safetensors"
        safetensors.torch.save_model(model, str(checkpoint))
        result = compress(
            CompressConfig(checkpoint=str(checkpoint), out=str(Path(tmp) / "compressed"),
                           calib=str(split.calibration_dir), preprocessing=PREPROCESSING,
                           model=BASELINE_SPEC["import_path"], model_kwargs=BASELINE_SPEC["kwargs"],
                           target_flops=0.5, patch=PATCH, device="cpu"),
            console=Console(quiet=True),
        )
        small = result.model.cpu()
        dsc = {name: held_out.scores(m, None, PATCH)["dice"]
               for name, m in (("baseline", model), ("compressed", small))}
    return model, small, {"dsc": dsc, "agreement_dice": result.report["agreement_dice"]}


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="network costs")
    for col in ("network", "params (M)", "GFLOPs", "latency (ms)", "train step (ms)", "peak inf. (MiB)",
                "peak train (MiB)", "DSC"):
        t.add_column(col, justify="left" if col == "network" else "right")
    for r in rows:
        t.add_row(*_cells(r))
    return t


def _cells(r: dict[str, Any]) -> list[str]:
    m = r["report"]
    return [
        r["network"], f"{m['params'] / 1e6:.2f}", f"{m['flops'] / 1e9:.1f}", f"{m['latency_ms']:.0f}",
        f"{m['train_step_ms']:.0f}", f"{m['peak_memory_inference_mb']:.0f}", f"{m['peak_memory_train_step_mb']:.0f}",
        f"{r['dsc']:.3f}" if r.get("dsc") is not None else "-",
    ]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = ["network", "params (M)", "GFLOPs", "latency (ms)", "train step (ms)", "peak inference (MiB)",
            "peak train step (MiB)", "DSC"]
    threads = f"{meta['threads']} thread{'s' if meta['threads'] != 1 else ''}"
    lines = [f"# prunekit3d compare: input 1x1x{meta['size']}^3 on {meta['device']} ({threads})", "",
             "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += ["", f"Memory: {meta['memory_method']}. FLOPs: fvcore (1 multiply-add = 1). Latency: median of "
              f"{meta['repeats']} warm runs. DSC: Dice against the sample CT's labels on its one (training) case, "
              "measured only for the demo networks; the others are untrained here.", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for r in rows:
        m = r["report"]
        for ax, y in zip(axes[:2], ("latency_ms", "peak_memory_train_step_mb")):
            ax.scatter(m["params"] / 1e6, m[y])
            ax.annotate(r["network"], (m["params"] / 1e6, m[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="parameters (M)", ylabel="inference latency (ms)", xscale="log", yscale="log", title="latency")
    axes[1].set(xlabel="parameters (M)", ylabel="peak memory, train step (MiB)", xscale="log", yscale="log",
                title="training memory")
    known = [r for r in rows if r.get("dsc") is not None]
    for r in known:
        m = r["report"]
        axes[2].scatter(m["flops"] / 1e9, r["dsc"])
        axes[2].annotate(r["network"], (m["flops"] / 1e9, r["dsc"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    axes[2].set(xlabel="GFLOPs", ylabel="DSC (sample CT)", title="cost against DSC (where measured)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="patch side (64 on the CPU, 128 on a GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-train-step", dest="train_step", action="store_false")
    parser.add_argument("--only", nargs="+", help="measure only these networks (names as in the table)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=Path("compare-results"), help="output directory")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.size or (128 if device.type == "cuda" else 64)
    console = Console(width=max(Console().width, 150))  # the full table, also in a log file
    patches = sample_patches(64, 2)  # calibration patches for the pruned PSP-Seg variants (L needs 64^3)
    builders: dict[str, Callable[[], nn.Module]] = {
        "nnU-Net PlainConvUNet": nnunet_plain,
        "MONAI UNet": monai_unet,
        "MONAI DynUNet": monai_dynunet,
        **{f"PSP-Seg-{v} start": psp(v) for v in "SBL"},
        **{f"PSP-Seg-{v} pruned": pruned(psp(v), patches) for v in "SBL"},
    }
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name, build in builders.items():
        if args.only and name not in args.only:
            continue
        console.print(f"measuring {name} ...")
        model = build()
        report = measure(model, (1, 1, size, size, size), name=name, device=device, repeats=args.repeats,
                         train_step=args.train_step)
        rows.append({"network": name, "report": report.to_dict(), "dsc": None})
        del model
    if not args.only or any(n.startswith("demo") for n in args.only):
        console.print("demo DynUNet: compressing the baseline (label-free, --target-params 0.5) ...")
        base, small, info = demo_pair(console)
        for name, model, dsc in (("demo DynUNet", base, info["dsc"]["baseline"]),
                                 ("demo DynUNet compressed", small, info["dsc"]["compressed"])):
            report = measure(copy.deepcopy(model), (1, 1, size, size, size), name=name, device=device,
                             repeats=args.repeats, train_step=args.train_step)
            rows.append({"network": name, "report": report.to_dict(), "dsc": dsc,
                         "agreement_dice": info["agreement_dice"] if "compressed" in name else None})
    first = ModelReport.from_dict(rows[0]["report"])
    meta = {"size": size, "device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats,
            "memory_method": first.memory_method, "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__}
    write_json(args.out / "compare.json", {"meta": meta, "rows": rows})
    with atomic_file(args.out / "compare.md") as tmp:
        tmp.write_text(markdown(rows, meta), encoding="utf-8")
    with atomic_file(args.out / "compare.png", ".png") as tmp:
        plot(rows, tmp)
    console.print(table(rows))
    console.print(f"wrote {args.out}/compare.json, compare.md, compare.png ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
