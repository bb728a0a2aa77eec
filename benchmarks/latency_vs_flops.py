"""Latency follows FLOPs: CPU speed-up of slim models beside their FLOP reduction.

For PSP-Seg S and B and a wrapped DynUNet, about half the branches of every redundant module are
masked (a fixed-seed random half), the model is slimmed, and three versions are compared on one
input (batch 1, 64^3, 2 threads, no grad, eval mode, warm):

    wrapped  -- the model before pruning (all branches active)
    masked   -- the same model with the masks: what training-time pruning leaves
    slim     -- prunekit3d.slim(masked): the plain network

FLOPs come from fvcore's FlopCountAnalysis (one multiply-add = one FLOP). It counts convolutions,
matmuls, norms and 2-D upsampling; element-wise ops (add, LeakyReLU, lerp) and 3-D upsampling are
not counted -- the script lists what it skipped. Timings are medians of interleaved runs (wrapped,
masked, slim in turn, so a noisy neighbour slows all three alike).

Targets (issue 3): speed-up >= 0.8 x FLOP factor on PSP-Seg S and B; slim faster than masked
everywhere; a module left with one light branch costs no more than that branch plus the residual add.

Usage::

    python benchmarks/latency_vs_flops.py [--size 64] [--threads 2] [--repeats 7] [--out PATH]
    python benchmarks/latency_vs_flops.py --threads 1 --clock cpu   # on a busy shared machine
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from rich.console import Console
from rich.table import Table
from torch import nn

from prunekit3d import redundant_modules, wrap
from prunekit3d.redundant import LightBranch, RedundantModule
from prunekit3d.slim import slim, slim_module

SEED = 0


def psp_seg_s() -> nn.Module:
    from prunekit3d.models import psp_seg  # lazy: the reference networks live in their own subpackage

    return psp_seg("S", 1, 3)


def psp_seg_b() -> nn.Module:
    from prunekit3d.models import psp_seg

    return psp_seg("B", 1, 3)


def dynunet(x: torch.Tensor) -> nn.Module:
    from monai.networks.nets import DynUNet

    net = DynUNet(3, 1, 3, [3] * 5, [1, 2, 2, 2, 2], [2, 2, 2, 2], filters=[16, 32, 64, 128, 256])
    return wrap(net, x)  # 7 light branches beside each original block, exp_ratio 0.5


def mask_half(model: nn.Module, seed: int = SEED) -> None:
    """Mask a random half (rounded down) of every module's branches; give every gate a nonzero value."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _, m in redundant_modules(model):
        n = len(m.branches)
        with torch.no_grad():
            m.gates.add_(0.1 * torch.randn(n, generator=gen))
        m.mask(rng.sample(range(n), n // 2))


def count_flops(model: nn.Module, x: torch.Tensor) -> tuple[float, list[str]]:
    analysis = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = analysis.total()
    if not analysis.by_operator().get("conv", 0):
        raise RuntimeError("fvcore counted no convolution: the FLOP factor would be meaningless")
    return float(total), sorted(analysis.unsupported_ops())


#: Clocks for --clock: wall time (the target), or the process's CPU time -- with --threads 1 that is
#: the compute each model needs, nearly independent of other jobs on a shared machine.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def work(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Operator calls and megabytes allocated by one forward: the work behind a time, free of timing noise."""
    with torch.no_grad():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x)
    events = prof.key_averages()
    allocated = sum(e.self_cpu_memory_usage for e in events if e.self_cpu_memory_usage > 0)
    return {"op_calls": sum(e.count for e in events), "allocated_mb": allocated / 2**20}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, clock: Callable[[], float], warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function after ``warmup`` calls each, measured in turn ``repeats`` times.

    The order rotates every round, so neither a noisy neighbour nor the allocator's state after the
    previous model favours one of them.
    """
    names = list(fns)
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = clock()
                fns[name]()
                times[name].append(clock() - start)
    return times


def one_branch_cost(model: nn.Module, x: torch.Tensor, repeats: int, clock: Callable[[], float]) -> dict[str, Any]:
    """Time a slim module left with one light branch against that branch alone plus the residual add.

    The module is the model's first (highest-resolution) redundant module, its input captured from a
    forward pass; a copy of it keeps one light branch only. The reference is the bare (unfused) branch,
    the add, and the module's output activation if it has one: ``finish(x + branch(x))``. With an
    original block, the module left with the original only (a lerp) is timed against ``f(x)`` plus an add.
    """
    name, module = redundant_modules(model)[0]
    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    inp = captured[0]
    one: RedundantModule = copy.deepcopy(module)
    light = [k for k in range(len(one.branches)) if not one.is_original(k)]
    one.unmask(range(len(one.branches)))
    one.mask([k for k in range(len(one.branches)) if k != light[-1]])
    branch = one.branches[light[-1]]
    assert isinstance(branch, LightBranch)
    block = slim_module(one).eval()
    fns = {"slim_module": lambda: block(inp), "branch_plus_add": lambda: one.finish(inp + branch(inp))}
    if one.has_original:
        one.unmask([0])
        one.mask(light)
        gated, original = slim_module(one).eval(), one.branches[0]
        fns |= {"slim_original_only": lambda: gated(inp), "original_plus_add": lambda: inp + original(inp)}
    med = {k: statistics.median(v) for k, v in time_interleaved(fns, repeats * 3, clock).items()}
    out = {
        "module": name,
        "input_shape": list(inp.shape),
        "kernel": list(branch.kernel),
        "out_activation": one.out_activation,
        **{f"{k}_ms": 1e3 * v for k, v in med.items()},
        "ratio": med["slim_module"] / med["branch_plus_add"],
    }
    if one.has_original:
        out["original_only_ratio"] = med["slim_original_only"] / med["original_plus_add"]
    return out


def measure(
    name: str, build: Callable[[torch.Tensor], nn.Module], x: torch.Tensor, repeats: int, clock: Callable[[], float]
) -> dict[str, Any]:
    torch.manual_seed(SEED)
    wrapped = build(x).eval()
    masked = copy.deepcopy(wrapped)
    mask_half(masked)
    small = slim(masked).eval()
    with torch.no_grad():
        ya, yb = masked(x), small(x)
    outs = (ya, yb) if isinstance(ya, torch.Tensor) else (ya[0], yb[0])
    max_diff = float((outs[0] - outs[1]).abs().max())

    flops_wrapped, skipped = count_flops(wrapped, x)
    flops_masked, _ = count_flops(masked, x)
    flops_slim, _ = count_flops(small, x)
    runs = {"wrapped": lambda: wrapped(x), "masked": lambda: masked(x), "slim": lambda: small(x)}
    times = time_interleaved(runs, repeats, clock)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("wrapped", wrapped), ("slim", small))}
    branches = [(int(m.active.sum()), len(m.branches)) for _, m in redundant_modules(masked)]
    flop_factor = flops_wrapped / flops_slim
    speedup = med["wrapped"] / med["slim"]
    return {
        "network": name,
        "modules": len(branches),
        "branches_active": sum(a for a, _ in branches),
        "branches_total": sum(n for _, n in branches),
        "params_wrapped": params["wrapped"],
        "params_slim": params["slim"],
        "gflops_wrapped": flops_wrapped / 1e9,
        "gflops_masked": flops_masked / 1e9,
        "gflops_slim": flops_slim / 1e9,
        "flop_factor": flop_factor,
        "ms_wrapped": 1e3 * med["wrapped"],
        "ms_masked": 1e3 * med["masked"],
        "ms_slim": 1e3 * med["slim"],
        "ms_min": {k: 1e3 * min(v) for k, v in times.items()},
        "speedup": speedup,
        "speedup_over_flop_factor": speedup / flop_factor,
        "slim_vs_masked": med["masked"] / med["slim"],
        "max_abs_diff_masked_vs_slim": max_diff,
        "fvcore_uncounted_ops": skipped,
        "work": {"masked": work(masked, x), "slim": work(small, x)},
        "one_branch": one_branch_cost(masked, x, repeats, clock),
    }


def write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def report(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="slim latency vs FLOPs (CPU, batch 1; ms = median)")
    columns = ("network", "branches", "GFLOPs wrapped/slim", "FLOP factor", "ms wrapped", "ms masked", "ms slim",
               "speed-up", "speed-up / FLOP f.", "slim vs masked", "ops, MB masked -> slim", "1-branch / (branch+add)")
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        ob, wm, ws = r["one_branch"], r["work"]["masked"], r["work"]["slim"]
        table.add_row(
            r["network"],
            f"{r['branches_active']}/{r['branches_total']}",
            f"{r['gflops_wrapped']:.2f}/{r['gflops_slim']:.2f}",
            f"{r['flop_factor']:.2f}x",
            f"{r['ms_wrapped']:.0f}",
            f"{r['ms_masked']:.0f}",
            f"{r['ms_slim']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['speedup_over_flop_factor']:.2f}",
            f"{r['slim_vs_masked']:.2f}x",
            f"{wm['op_calls']}, {wm['allocated_mb']:.0f} -> {ws['op_calls']}, {ws['allocated_mb']:.0f}",
            f"{ob['ratio']:.2f}",
        )
    console.print(table)
    uncounted = sorted({op for r in rows for op in r["fvcore_uncounted_ops"]})
    console.print(f"fvcore did not count: {', '.join(uncounted) or 'nothing'} (element-wise / resampling ops)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="cubic input size (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model (default 7)")
    parser.add_argument("--networks", nargs="+", default=["psp_seg_s", "psp_seg_b", "dynunet"])
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall (default) or cpu time")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency_vs_flops.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # other jobs on the machine: read the timings with it
    builders: dict[str, Callable[[torch.Tensor], nn.Module]] = {
        "psp_seg_s": lambda x: psp_seg_s(),
        "psp_seg_b": lambda x: psp_seg_b(),
        "dynunet": dynunet,
    }
    x = torch.randn(1, 1, args.size, args.size, args.size, generator=torch.Generator().manual_seed(SEED))
    console = Console(width=200)  # keep every column readable when piped to a file
    rows = []
    for name in args.networks:
        console.print(f"measuring {name} ...")
        rows.append(measure(name, builders[name], x, args.repeats, CLOCKS[args.clock]))
    report(rows, console)
    settings = {
        "size": args.size,
        "threads": args.threads,
        "repeats": args.repeats,
        "clock": args.clock,
        "seed": SEED,
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    write_json({"settings": settings, "results": rows}, args.out)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
