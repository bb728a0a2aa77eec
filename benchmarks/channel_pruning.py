"""Channel pruning: parameters, FLOPs and CPU latency at 25% and 50% of the channels removed.

Every network of the project at benchmark widths (16 channels at full resolution, doubling per level),
pruned by :func:`prunekit3d.prune_channels` (magnitude importance, per group) on a copy at each ratio,
then compared on one input (batch 1, ``--size``^3, ``--threads`` threads, eval mode, no grad, warm):

    original  -- the network as built
    25%, 50%  -- a quarter / half of every group's channels removed (heads and the input stay)

FLOPs are multiply-adds from :func:`prunekit3d.report.count_flops` (fvcore), the one counter that
``prunekit3d report`` and ``prune_channels(target_flops=...)`` use. Latencies come from interleaved runs
(original, 25%, 50% in turn); each is the fastest of ``--repeats`` runs, the estimate least
disturbed by other processes on a shared machine.

Usage::

    python benchmarks/channel_pruning.py [--size 64] [--threads 2] [--repeats 7] [--networks a b ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from prunekit3d.channels import count_flops, count_params, prune_channels

RATIOS = (0.25, 0.5)


def _nnunet(cls_name: str, **kw: object) -> nn.Module:
    from dynamic_network_architectures.architectures import unet

    common = dict(
        input_channels=1, n_stages=5, features_per_stage=(16, 32, 64, 128, 256), conv_op=nn.Conv3d, kernel_sizes=3,
        strides=(1, 2, 2, 2, 2), num_classes=3, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
    )
    return getattr(unet, cls_name)(**common, **kw)


def _psp(variant: str) -> nn.Module:
    from prunekit3d.models import psp_seg

    return psp_seg(variant, 1, 3)


def _monai(cls_name: str, *args: object, **kw: object) -> nn.Module:
    from monai.networks import nets

    return getattr(nets, cls_name)(*args, **kw)


#: name -> builder (1 input channel, 3 classes).
NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "MONAI UNet": lambda: _monai("UNet", 3, 1, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2),
    "DynUNet": lambda: _monai("DynUNet", 3, 1, 3, [3] * 5, [1, 2, 2, 2, 2], [2] * 4, filters=[16, 32, 64, 128, 256]),
    "SegResNet": lambda: _monai("SegResNet", 3, init_filters=16, in_channels=1, out_channels=3),
    "BasicUNet": lambda: _monai("BasicUNet", 3, 1, 3, features=(16, 16, 32, 64, 128, 16)),
    "PlainConvUNet": lambda: _nnunet("PlainConvUNet", n_conv_per_stage=2, n_conv_per_stage_decoder=2),
    "ResidualEncoderUNet": lambda: _nnunet(
        "ResidualEncoderUNet", n_blocks_per_stage=(1, 2, 2, 2, 2), n_conv_per_stage_decoder=(1, 1, 1, 1)
    ),
    "PSP-Seg S": lambda: _psp("S"),
    "PSP-Seg B": lambda: _psp("B"),
    "PSP-Seg L": lambda: _psp("L"),
}


@torch.no_grad()
def _latencies(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Fastest seconds per forward of each model, runs interleaved."""
    for m in models:
        m.eval()(x)  # warm up
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, t in zip(models, times):
            start = time.perf_counter()
            m(x)
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="edge of the cubic input (divisible by 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS), metavar="NAME")
    parser.add_argument("--out", default="channel_pruning.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console(width=150)
    x = torch.randn(1, 1, args.size, args.size, args.size)
    rows = []
    for name in args.networks:
        original = NETWORKS[name]().eval()
        versions, seconds = [original], []
        for ratio in RATIOS:
            pruned = copy.deepcopy(original)
            start = time.perf_counter()
            prune_channels(pruned, x, ratio=ratio)
            seconds.append(time.perf_counter() - start)
            versions.append(pruned.eval())
        latency = _latencies(versions, x, args.repeats)
        labels = ("original", *[f"{r:.0%}" for r in RATIOS])
        for label, model, lat, prune_s in zip(labels, versions, latency, [0.0, *seconds]):
            rows.append({
                "network": name, "removed": label, "params": count_params(model), "flops": int(count_flops(model, x)),
                "latency_s": lat, "prune_s": prune_s,
            })
        console.print(f"{name}: done")

    table = Table(title=f"channel pruning ({args.size}^3 input, batch 1, {args.threads} threads, CPU, eval)")
    columns = ("network", "removed", "params (M)", "params", "GFLOPs (multiply-adds)", "FLOPs", "latency (ms)",
               "speed-up", "prune (s)")
    for col in columns:
        table.add_column(col, justify="left" if col in ("network", "removed") else "right")
    base: dict = {}
    for r in rows:
        b = base.setdefault(r["network"], r)
        table.add_row(
            r["network"], r["removed"], f"{r['params'] / 1e6:.2f}", f"{r['params'] / b['params']:.0%}",
            f"{r['flops'] / 1e9:.2f}", f"{r['flops'] / b['flops']:.0%}", f"{r['latency_s'] * 1e3:.0f}",
            f"{b['latency_s'] / r['latency_s']:.2f}x",
            f"{r['prune_s']:.1f}" if r is not b else "-",
        )
    console.print(table)
    setup = {"size": args.size, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({**setup, "rows": rows}, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
