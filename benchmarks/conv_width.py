"""Why a network pruned to x0.25 FLOPs runs at about x0.5 latency on a CPU: time against width.

Channel pruning that keeps a fraction ``k`` of every layer's channels keeps ``k^2`` of a convolution's
multiply-adds but ``k`` of the activations that every layer reads and writes (and all of a norm's and an
activation's work is per activation). This times, on the oneDNN path ``prunekit3d predict`` uses, one
3x3x3 convolution and one convolution + instance norm + LeakyReLU unit (a DynUNet / nnU-Net stage) at the
widths a pruned full-resolution stage has, each timed in alternation with the unpruned width
(:func:`prunekit3d.report.paired_latency`), and prints latency ratio beside FLOP and activation ratios.

A second table times the demo's whole DynUNet (16-128 filters) with the stage widths channel pruning leaves,
paired with the unpruned one: uniform cuts at any width, even widths, and the widths of ``round_to=16``
(multiples of 16 and 8, 4 below), which CPU kernels hold in blocks of 16 floats. Its last column times the same
pruned network with channels-last (NDHWC) weights and activations, where oneDNN needs no reorder between layers,
against the usual layout.

    python benchmarks/conv_width.py [--width 16] [--size 64 64 16] [--threads 2] [--out conv_width.json]
"""

from __future__ import annotations

import argparse
import copy

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


class ChannelsLast(nn.Module):
    """``net`` with its weights and its input in the channels-last (NDHWC) memory layout."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last_3d))


class OwnInput(nn.Module):
    """``net`` on its own fixed input, whatever it is called with (``paired_latency`` gives every model one size)."""

    def __init__(self, net: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("x", x)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.net(self.x)


#: Stage widths of the demo DynUNet (16, 32, 64, 128) as pruning leaves them.
PATTERNS = [
    (11, 22, 44, 88),  # --target-flops 0.5, one ratio, any width
    (12, 22, 44, 88),  # the same, even at full resolution
    (12, 24, 48, 96),  # the same, multiples of 4
    (8, 32, 48, 96),  # round_to=16: half the full-resolution channels
    (8, 16, 48, 96),
    (8, 16, 32, 64),  # one ratio, halved (--target-flops 0.3 lands here)
    (4, 32, 64, 128),  # only the full-resolution stage cut
]


def network_rows(size: list[int], repeats: int, table: Table) -> list[dict]:
    """The demo DynUNet at each of :data:`PATTERNS`, each timed in alternation with the unpruned one."""
    from prunekit3d.recipes.demo import BASELINE_SPEC
    from prunekit3d.report import count_flops

    def network(filters: tuple[int, ...]) -> nn.Module:
        return pk.from_spec({**BASELINE_SPEC, "kwargs": {**BASELINE_SPEC["kwargs"], "filters": list(filters)}}).eval()

    x = torch.randn(1, 1, *size)
    full = network((16, 32, 64, 128))
    full_flops = count_flops(full, x)
    rows = []
    for filters in PATTERNS:
        narrow = network(filters)
        flops = count_flops(narrow, x) / full_flops
        trio = [pk.use_onednn(copy.deepcopy(narrow)), pk.use_onednn(copy.deepcopy(full)), ChannelsLast(narrow)]
        narrow_ms, full_ms, last_ms = paired_latency(trio, x.shape, warmup=2, repeats=repeats)
        ratio = narrow_ms / full_ms
        rows.append({"filters": list(filters), "flops_ratio": flops, "latency_ms": narrow_ms,
                     "latency_ms_reference": full_ms, "latency_ratio": ratio, "channels_last_ms": last_ms})
        table.add_row("-".join(map(str, filters)), f"x{flops:.2f}", f"{narrow_ms:.1f}", f"x{ratio:.2f}",
                      f"{ratio / flops:.2f}", f"x{last_ms / narrow_ms:.2f}")
    return rows


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
    nets = Table(title=f"the demo DynUNet at pruned stage widths, oneDNN path, {args.threads} threads, "
                       f"{'x'.join(map(str, args.size))}, each timed in alternation with 16-32-64-128")
    for col in ("filters", "FLOPs", "latency ms", "latency", "latency / FLOPs", "channels-last"):
        nets.add_column(col, justify="left" if col == "filters" else "right")
    network = network_rows(args.size, args.repeats, nets)
    console.print(nets)
    write_json(args.out, {"threads": args.threads, "size": args.size, "width": args.width,
                          "torch": torch.__version__, "rows": rows, "networks": network})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
