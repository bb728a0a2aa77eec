"""Calibration cost: prunekit3d's one-pass scoring against the naive algorithm of the published code.

The naive algorithm caches every redundant module's input and output for all calibration batches,
then re-runs each module once per candidate set on every cached input. The one-pass algorithm
(:func:`prunekit3d.calibrate.calibrate`) computes each branch once per batch and scores every
candidate from those terms, caching nothing. Beside both: the floor, one plain forward pass over the
same batches, which any algorithm pays to get every module's input.

Each measurement runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its
own; memory is reported as the peak above the process's footprint once the model is built. The machine
may be shared, so the one-pass run also times a plain forward of an identical model on every batch,
right beside it: the one-pass/floor ratio comes from those paired timings.

    python benchmarks/calibration_cost.py                       # PSP-Seg B and a wrapped DynUNet, 8/32/100 batches
    python benchmarks/calibration_cost.py --batches 8 32 --out calibration_cost.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import prunekit3d as pk
from prunekit3d.calibrate import calibrate

ALGORITHMS = ("floor", "one-pass", "naive")


def build(network: str, size: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if network == "psp_seg_b":
        from prunekit3d.models import psp_seg

        model = psp_seg("B", 1, 3)
    elif network == "dynunet":
        from monai.networks.nets import DynUNet

        model = DynUNet(3, 1, 3, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[16, 32, 64, 128], res_block=True)
        pk.wrap(model, torch.randn(1, 1, size, size, size), branches=7)
    else:
        raise ValueError(f"unknown network {network!r}")
    # A trained model's gates are not zero; random gates make every candidate's error distinct.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in pk.redundant_modules(model):
            m.gates.add_(torch.randn(m.gates.shape, generator=g) * 0.3)
    return model.eval(), (1, 1, size, size, size)


def batches(shape: tuple[int, ...], n: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield torch.randn(shape, generator=g)


@torch.no_grad()
def naive_calibrate(model: torch.nn.Module, data, step: int) -> dict[str, list[int]]:
    """The published code's way: cache all inputs/outputs, re-run each module per candidate set."""
    modules = [(n, m) for n, m in pk.redundant_modules(model) if len(m.active_indices()) > step]
    cache: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n, _ in modules}
    handles = [
        m.register_forward_hook(lambda mod, a, out, n=n: cache[n].append((a[0].clone(), out.clone())))
        for n, m in modules
    ]
    for x in data:
        model(x)
    for h in handles:
        h.remove()
    chosen = {}
    for name, m in modules:
        errors = []
        candidates = list(itertools.combinations(m.active_indices(), step))
        for s in candidates:
            m.mask(s)
            errors.append(sum(float(torch.linalg.vector_norm(y - m(x))) for x, y in cache[name]))
            m.unmask(s)
        chosen[name] = list(candidates[min(range(len(errors)), key=lambda i: (errors[i], i))])
    return chosen


def measure(network: str, algorithm: str, step: int, n: int, size: int, threads: int) -> dict:
    """One measurement, run inside a fresh subprocess."""
    torch.set_num_threads(threads)
    model, shape = build(network, size)
    twin = copy.deepcopy(model) if algorithm == "one-pass" else None
    with torch.no_grad():
        for m in (model, twin):
            if m is not None:
                m(torch.randn(shape))  # warm-up
    paired_floor = 0.0

    def paired(data):
        # Beside each calibration batch, one plain forward of an identical model on it: the machine is
        # shared, and timing both side by side keeps the one-pass/floor ratio free of its drift.
        nonlocal paired_floor
        for x in data:
            start = time.perf_counter()
            with torch.no_grad():
                twin(x)
            paired_floor += time.perf_counter() - start
            yield x

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    chosen = None
    if algorithm == "floor":
        with torch.no_grad():
            for x in batches(shape, n):
                model(x)
    elif algorithm == "one-pass":
        chosen = calibrate(model, paired(batches(shape, n)), step=step).chosen()
    else:
        chosen = naive_calibrate(model, batches(shape, n), step)
    seconds = time.perf_counter() - start - paired_floor
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "paired_floor_seconds": paired_floor, "peak_mib_above_model": (peak - base) / 1024,
            "chosen": chosen}


def run_in_subprocess(network: str, algorithm: str, step: int, n: int, size: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", network, algorithm, str(step), str(n), str(size),
               str(threads), str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 100])
    parser.add_argument("--size", type=int, default=32, help="cubic input size of each calibration batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="calibration_cost.json")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        network, algorithm, step, n, size, threads, out = args.child
        result = measure(network, algorithm, int(step), int(n), int(size), int(threads))
        Path(out).write_text(json.dumps(result))
        return

    configs = [("psp_seg_b", 1), ("psp_seg_b", 2), ("dynunet", 1), ("dynunet", 2)]
    rows = []
    console = Console(width=max(Console().width, 150))  # the full table, also in a log file
    for (network, step), n in itertools.product(configs, args.batches):
        r = {a: run_in_subprocess(network, a, step, n, args.size, args.threads) for a in ALGORITHMS}
        row = {
            "network": network,
            "step": step,
            "batches": n,
            "identical_decisions": r["one-pass"]["chosen"] == r["naive"]["chosen"],
            **{f"{a}_s": r[a]["seconds"] for a in ALGORITHMS},
            **{f"{a}_peak_mib": r[a]["peak_mib_above_model"] for a in ALGORITHMS},
        }
        row["paired_floor_s"] = r["one-pass"]["paired_floor_seconds"]
        row["naive_over_one_pass"] = row["naive_s"] / row["one-pass_s"]
        row["one_pass_over_floor"] = row["one-pass_s"] / row["paired_floor_s"]
        rows.append(row)
        write_json(args, rows)  # after every row: a run cut short keeps what it measured
        console.print(f"{network} step {step} batches {n}: done")

    table = Table(title=f"calibration cost ({args.size}^3 batches, {args.threads} threads, CPU)",
                  caption="one-pass/floor: against plain forwards timed batch by batch beside the one-pass run; "
                          "MiB: peak resident memory above the built model")
    cols = ["network", "step", "batches", "same", "floor s", "one-pass s", "naive s", "naive/one-pass",
            "one-pass/floor", "floor MiB", "one-pass MiB", "naive MiB"]
    for c in cols:
        table.add_column(c, justify="left" if c == "network" else "right")
    for r in rows:
        table.add_row(r["network"], str(r["step"]), str(r["batches"]), "yes" if r["identical_decisions"] else "NO",
                      f"{r['floor_s']:.2f}", f"{r['one-pass_s']:.2f}", f"{r['naive_s']:.2f}",
                      f"{r['naive_over_one_pass']:.1f}x", f"{r['one_pass_over_floor']:.2f}x",
                      f"{r['floor_peak_mib']:.0f}", f"{r['one-pass_peak_mib']:.0f}", f"{r['naive_peak_mib']:.0f}")
    console.print(table)
    console.print(f"wrote {args.out}")


def write_json(args: argparse.Namespace, rows: list[dict]) -> None:
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump({"size": args.size, "threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
