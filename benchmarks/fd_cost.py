"""Extra cost of the FD loss per training step: PSP-Seg S, one patch, with vs without FD.

Both variants run in the same process, step by step in turn (so a busy machine slows both alike):

    without:  forward -- L_seg -- backward -- SGD step
    with:     forward -- L_seg + 0.1 * (L_fd + L_aux) [masked encoder-only pass] -- backward -- SGD step

It also times ``fd(x, label)`` alone (the masked pass and both losses) against a full no-grad
forward, to show what stopping at the bottleneck saves. L_seg is cross-entropy over the
deep-supervision outputs (the cost of Dice on top is the same in both variants). Prints a rich
table and the numbers as JSON (``--out`` writes them).

    python benchmarks/fd_cost.py --size 64 --steps 5 --threads 1   # 1 thread: stable CPU times on a shared machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from prunekit3d.fd import FDLoss, foreground_percentile
from prunekit3d.models.pspseg import psp_seg


def _seg_loss(logits: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    total = logits[0].new_zeros(())
    for i, y in enumerate(logits):
        target = F.interpolate(label[:, None].float(), size=y.shape[2:], mode="nearest-exact")[:, 0].long()
        total = total + F.cross_entropy(y, target) / 2**i
    return total


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time stays fair on a shared, busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="cubic patch size (multiple of 16)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = psp_seg("S", in_channels=1, out_channels=3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    s = args.size
    x = torch.randn(1, 1, s, s, s)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s)] * 3, indexing="ij"))
    label = (grid.square().sum(0) < 0.4).long()[None]  # a ball of foreground, class 1
    label[:, : s // 2][label[:, : s // 2] == 1] = 2
    mask_value = foreground_percentile([(x[0], label[0])])[0]
    fd = FDLoss(model, x, mask_value=mask_value)

    def step(with_fd: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = _seg_loss(logits, label)
        if with_fd:
            l_fd, l_aux = fd(x, label)
            loss = loss + 0.1 * (l_fd + l_aux)
        loss.backward()
        optimizer.step()

    def full_forward() -> None:
        with torch.no_grad():
            model(x)

    names = ("without FD", "with FD", "full forward", "fd(x, label)")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.warmup + args.steps):
        measured = {
            "without FD": _timed(lambda: step(False)),
            "with FD": _timed(lambda: step(True)),
            "full forward": _timed(full_forward),
        }
        with torch.no_grad():
            model(x)  # untimed: the captures fd(x, label) reads
            measured["fd(x, label)"] = _timed(lambda: fd(x, label))
        if i >= args.warmup:
            for k, (w, c) in measured.items():
                wall[k].append(w)
                cpu[k].append(c)
    fd.close()

    wall_median = {k: statistics.median(v) for k, v in wall.items()}
    cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "model": "psp_seg_s",
        "input": [1, 1, s, s, s],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "median_wall_s": wall_median,
        "median_cpu_s": cpu_median,
        "fd_step_overhead_cpu": cpu_median["with FD"] / cpu_median["without FD"] - 1,
        "fd_step_overhead_wall": wall_median["with FD"] / wall_median["without FD"] - 1,
        "fd_call_vs_full_forward_cpu": cpu_median["fd(x, label)"] / cpu_median["full forward"],
        "wall_s": wall,
        "cpu_s": cpu,
    }
    table = Table(title=f"FD loss cost: PSP-Seg S, 1x1x{s}^3, CPU, {result['threads']} threads, {args.steps} steps")
    for col in ("", "median CPU ms", "median wall ms", "wall min-max ms"):
        table.add_column(col, justify="left" if not col else "right")
    for k in names:
        table.add_row(
            k,
            f"{cpu_median[k] * 1e3:.0f}",
            f"{wall_median[k] * 1e3:.0f}",
            f"{min(wall[k]) * 1e3:.0f}-{max(wall[k]) * 1e3:.0f}",
        )
    console = Console(width=max(Console().width, 150))  # the full table, also in a log file
    console.print(table)
    console.print(
        f"FD adds {result['fd_step_overhead_cpu']:.1%} CPU time ({result['fd_step_overhead_wall']:.1%} wall) per "
        f"training step; fd(x, label) costs {result['fd_call_vs_full_forward_cpu']:.0%} of a full no-grad forward."
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
