"""Why a network pruned to x0.25 FLOPs runs at about x0.5 latency on a CPU: time against width.

Channel pruning that keeps a fraction ``k`` of every layer's channels keeps ``k^2`` of a convolution's
multiply-adds but ``k`` of the activations that every layer reads and writes (and all of a norm's and an
activation's work is per activation). This times, on the oneDNN path ``prunekit3d predict`` uses, one
3x3x3 convolution and one convolution + instance norm + LeakyReLU unit (a DynUNet / nnU-Net stage) at the
widths a pruned full-resolution stage has, each timed in alternation with the unpruned width
(:func:`prunekit3d.report.paired_latency`), and prints latency ratio beside FLOP and activation ratios.

    python benchmarks/conv_width.py [--width 16] [--size 64 64 16] [--threads 2] [--out conv_width.json]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import prunekit3d as pk
from prunekit3d.io.files import write_json
from prunekit3d.report import paired_latency


def unit(channels: int, with_norm: bool) -> nn.Module:
    conv = nn.Conv3d(channels, channels, 3, padding=1)
    layers = [conv, nn.InstanceNorm3d(channels, affine=True), nn.LeakyReLU(0.01)] if with_norm else [conv]
    return pk.use_onednn(nn.Sequential(*layers).eval())


class OwnInput(nn.Module):
    """``net`` on its own fixed input, whatever it is called with (``paired_latency`` gives every model one size)."""

    def __init__(self, net: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("x", x)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.net(self.x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="the unpruned width (the demo's first stage: 16)")
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 16], help="spatial size (the demo's patch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="conv_width.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 120))
    widths = list(range(args.width, max(1, args.width // 4) - 1, -1))  # every width a pruned stage can have
    table = Table(title=f"oneDNN path, {args.threads} threads, batch 1, {'x'.join(map(str, args.size))}, "
                        f"each width timed in alternation with width {args.width} (median of {args.repeats})")
    for col in ("unit", "width", "FLOPs", "activations", "latency ms", "latency", "latency / FLOPs"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    rows = []
    for with_norm in (False, True):
        name = "conv + instance norm + LeakyReLU" if with_norm else "3x3x3 conv"
        for width in widths:
            full, narrow = unit(args.width, with_norm), unit(width, with_norm)
            pair = [OwnInput(full, torch.randn(1, args.width, *args.size)),
                    OwnInput(narrow, torch.randn(1, width, *args.size))]
            full_ms, narrow_ms = paired_latency(pair, [1], warmup=3, repeats=args.repeats)
            flops, acts, ratio = (width / args.width) ** 2, width / args.width, narrow_ms / full_ms
            rows.append({"unit": name, "width": width, "flops_ratio": flops, "activation_ratio": acts,
                         "latency_ms": narrow_ms, "latency_ms_reference": full_ms, "latency_ratio": ratio})
            table.add_row(name, str(width), f"x{flops:.2f}", f"x{acts:.2f}", f"{narrow_ms:.2f}", f"x{ratio:.2f}",
                          f"{ratio / flops:.2f}")
    console.print(table)
    write_json(args.out, {"threads": args.threads, "size": args.size, "width": args.width,
                          "torch": torch.__version__, "rows": rows})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
