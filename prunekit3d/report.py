"""Measurement: what a network costs -- parameters, FLOPs, latency, peak memory -- as one plain record.

:func:`measure` fills a :class:`ModelReport` for one input size::

    model --count-------------------------------------------------> params
          --fvcore FlopCountAnalysis (multiply-adds)---------------> flops
          --eval, no grad: warm-up runs, then timed runs (median)--> latency_ms
          --one forward, peak of the memory allocated during it----> peak_memory_inference_mb
          --train(): forward + backward + SGD step, timed, peak----> train_step_ms, peak_memory_train_step_mb

How memory is measured (``memory_method`` says which): on CUDA, ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on the CPU, ``torch.profiler`` with ``profile_memory=True``: the CPU allocator
reports every allocation and free made while profiling, and the peak of their running sum is the memory the
step needed on top of what already existed (weights, the input). Both count tensors only -- not the Python
process, libraries or allocator caches -- so the numbers of two models are comparable and repeatable.

FLOPs have ONE unit everywhere in prunekit3d: multiply-adds, as fvcore and the papers count them (a
``Conv3d`` layer costs ``out voxels x C_out x C_in / groups x kernel volume``; norms count too, element-wise
ops do not). :func:`count_flops` is the one counter: reports, budgets (``prune_channels(target_flops=...)``)
and the recipes all call it, so a figure from ``prunekit3d report`` is a valid budget.

The training step's loss is the mean square of every output tensor (deep-supervision heads included): what
a step costs does not depend on which loss is used.

>>> r = measure(net, (1, 1, 64, 64, 64))
>>> ModelReport.from_json(r.to_json()) == r
True
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import nn

from prunekit3d.modes import eval_mode
from prunekit3d.records import JsonRecord
from prunekit3d.wrap import unwrap

__all__ = [
    "FlopCount",
    "ModelReport",
    "comparison_rows",
    "comparison_table",
    "count_flops",
    "count_params",
    "measure",
    "paired_latency",
]


@dataclass
class ModelReport(JsonRecord):
    """The costs of one network at one input size. Round-trips through JSON; prints as a rich table.

    Attributes:
        name: what was measured (a class name or a label).
        input_size: ``[B, C, D, H, W]``.
        device: where it ran ("cpu", "cuda:0").
        threads: CPU threads torch used.
        params: parameters.
        flops: FLOPs of one forward pass in multiply-adds (:func:`count_flops`).
        latency_ms: median warm inference latency (eval mode, no grad).
        train_step_ms: median time of one training step (forward, backward, SGD step); ``None`` if not measured.
        peak_memory_inference_mb: peak memory allocated during one inference forward, MiB.
        peak_memory_train_step_mb: peak memory allocated during one training step, MiB; ``None`` if not measured.
        memory_method: how the peaks were measured.
        unsupported_ops: operators fvcore did not count (element-wise ops, some upsampling), with counts.
        latency_path: the CPU path ``latency_ms`` was timed on, when several were (``"torch"``, ``"torch+onednn"``).
        backends_ms: latency of every backend timed in alternation (``prunekit3d report`` on a CPU), by label.
    """

    record_name = "model report"

    name: str
    input_size: list[int]
    device: str
    threads: int
    params: int
    flops: int
    latency_ms: float
    train_step_ms: float | None = None
    peak_memory_inference_mb: float | None = None
    peak_memory_train_step_mb: float | None = None
    memory_method: str = ""
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    latency_path: str = ""
    backends_ms: dict[str, float] = field(default_factory=dict)

    def quantities(self) -> list[tuple[str, float | None, str]]:
        """``(quantity, value, formatted value)`` in the order the tables print them."""
        values = [
            ("parameters", self.params, f"{self.params:,}"),
            (FLOPS_UNIT, self.flops / 1e9, f"{self.flops / 1e9:.3f}"),
            ("latency (ms)", self.latency_ms, ".1f"),
            ("train step (ms)", self.train_step_ms, ".1f"),
            ("peak memory, inference (MiB)", self.peak_memory_inference_mb, ".1f"),
            ("peak memory, train step (MiB)", self.peak_memory_train_step_mb, ".1f"),
        ]
        return [(name, v, _fmt(v, spec) if spec.startswith(".") else spec) for name, v, spec in values]

    def __rich__(self) -> Table:
        table = Table(title=f"{self.name}: input {'x'.join(map(str, self.input_size))} on {self.device} "
                      f"({self.threads} thread{'s' if self.threads != 1 else ''})")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        for name, _, text in self.quantities():
            path = f", {self.latency_path}" if name == "latency (ms)" and self.latency_path else ""
            table.add_row(name + path, text)
        fastest = min(self.backends_ms, key=self.backends_ms.__getitem__) if self.backends_ms else None
        for label, ms in self.backends_ms.items():
            mark = ", used" if label == self.latency_path else ", fastest" if label == fastest else ""
            table.add_row(f"  latency, {label}{mark} (ms)", f"{ms:.1f}")
        table.caption = f"memory: {self.memory_method}"
        if fastest is not None:
            speed = self.backends_ms.get("torch", self.latency_ms) / self.backends_ms[fastest]
            used = self.latency_path or "the model as is"
            table.caption += (f"\nlatency: backends timed in alternation; used: {used} (the faster PyTorch path); "
                              f"headline CPU path: {fastest}, {speed:.2f}x torch's speed")
        return table


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def comparison_rows(before: ModelReport, after: ModelReport) -> list[tuple[str, str, str, str]]:
    """``(quantity, before, after, after / before)`` as formatted text, one row per quantity."""
    rows = []
    for (name, vb, tb), (_, va, ta) in zip(before.quantities(), after.quantities()):
        ratio = f"{va / vb:.2f}" if vb and va is not None else "-"
        rows.append((name, tb, ta, ratio))
    return rows


def comparison_table(before: ModelReport, after: ModelReport, extra: Sequence[tuple[str, str, str]] = (),
                     title: str = "before / after") -> Table:
    """A rich before / after table of two reports plus ``extra`` rows ``(quantity, before, after)`` (e.g. Dice)."""
    table = Table(title=title)
    for col in ("quantity", "before", "after", "after / before"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    for row in comparison_rows(before, after):
        table.add_row(*row)
    for name, b, a in extra:
        table.add_row(name, b, a, "")
    return table


def count_params(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (a parameter held under two names counts once; DDP unwrapped)."""
    return sum(p.numel() for p in unwrap(model).parameters())


def _first_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in _first_tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _first_tensors(o)]
    return []


#: Row label of the FLOP count in every table: the unit stated.
FLOPS_UNIT = "GFLOPs (multiply-adds)"


class FlopCount(int):
    """Multiply-adds of one forward pass: an ``int``, with where they come from and what was not counted.

    Attributes:
        by_module: multiply-adds per qualified module name (``""`` is the whole model), as fvcore's ``by_module``.
        unsupported: operators fvcore did not count (element-wise ops, some resampling), with counts.

    Code written against the former ``(total, unsupported) = count_flops(...)`` return still works:
    ``count[0]`` is the total and ``count[1]`` the unsupported operators.
    """

    by_module: dict[str, int]
    unsupported: dict[str, int]

    def __new__(cls, total: int, by_module: dict[str, int], unsupported: dict[str, int]) -> FlopCount:
        count = super().__new__(cls, total)
        count.by_module, count.unsupported = by_module, unsupported
        return count

    def __getnewargs__(self) -> tuple[int, dict[str, int], dict[str, int]]:  # copy and pickle keep the breakdown
        return int(self), self.by_module, self.unsupported

    def __getitem__(self, index: int) -> int | dict[str, int]:
        return (int(self), self.unsupported)[index]

    def __iter__(self) -> Iterator[int | dict[str, int]]:
        return iter((int(self), self.unsupported))

    def __repr__(self) -> str:
        return f"FlopCount({int(self):,} multiply-adds)"


@torch.no_grad()
def count_flops(model: nn.Module, example_input: torch.Tensor) -> FlopCount:
    """Multiply-adds of one eval-mode forward on ``example_input`` (fvcore's count), with a per-module breakdown.

    The one FLOP counter of prunekit3d (see the module docstring). ``DataParallel`` / DDP are unwrapped.

    Example::

        >>> conv = nn.Conv3d(2, 4, 3, padding=1)
        >>> int(count_flops(conv, torch.zeros(1, 2, 8, 8, 8))) == 8**3 * 4 * 2 * 27
        True
    """
    from fvcore.nn import FlopCountAnalysis  # imported on use: it is slow to import

    with eval_mode(unwrap(model)) as net, _quiet_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and trace warnings say nothing about the count
        analysis = FlopCountAnalysis(net, example_input)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return FlopCount(
            int(analysis.total()),
            {str(k): int(v) for k, v in analysis.by_module().items()},
            {str(k): int(v) for k, v in analysis.unsupported_ops().items()},
        )


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++ log lines written straight to file descriptor 2 (kineto's profiler start/stop notices,
    the TorchScript tracer's warnings under fvcore) for the duration of a measurement."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (e.g. an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cpu_peak_mib(fn: Any) -> float:
    """Peak of the bytes allocated (minus freed) while ``fn`` runs, from the profiler's CPU memory events."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"),
        key=lambda e: e.start_ns(),
    )
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def _cuda_peak_mib(fn: Any, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _peak_mib(fn: Any, device: torch.device) -> float:
    return _cuda_peak_mib(fn, device) if device.type == "cuda" else _cpu_peak_mib(fn)


def measure(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
    warmup: int = 2,
    repeats: int = 5,
    train_step: bool = True,
) -> ModelReport:
    """Measure ``model`` at ``input_size`` (see the module docstring for what and how).

    The model is measured where its parameters are unless ``device`` is given (then a copy is not
    made: the model is moved). Its train/eval mode and weights are left as they were: the training
    step runs on a copy of the weights' state and restores them afterwards.

    Args:
        model: any network taking one 5-D tensor.
        input_size: ``(B, C, D, H, W)``.
        name: label of the report (default: the model's class name).
        device: run there (moves the model); default: where its parameters are.
        warmup: untimed runs before timing (first runs allocate and pick kernels).
        repeats: timed runs; the median is reported.
        train_step: also measure one training step (time and peak memory).

    Returns:
        a :class:`ModelReport`.
    """
    size = [int(s) for s in input_size]
    if len(size) != 5 or min(size) < 1:
        raise ValueError(f"input size must be 5 positive numbers B C D H W, got {list(input_size)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if device is not None:
        model = model.to(device)
    ref = next((p for p in model.parameters()), None)
    dev = ref.device if ref is not None else torch.device("cpu")
    x = torch.randn(size, device=dev)
    params = count_params(model)
    flops = count_flops(model, x)

    with eval_mode(model), torch.no_grad():
        def infer() -> None:
            model(x)

        latency = _timed(infer, dev, warmup, repeats)
        peak_infer = _peak_mib(infer, dev)

    step_ms = peak_step = None
    if train_step:
        step_ms, peak_step = _measure_train_step(model, x, dev, warmup, repeats)
    method = (
        "torch.cuda.max_memory_allocated above the memory held before the step"
        if dev.type == "cuda"
        else "torch.profiler CPU allocator events: peak of bytes allocated during the step"
    )
    return ModelReport(
        name=name or type(model).__name__,
        input_size=size,
        device=str(dev),
        threads=torch.get_num_threads(),
        params=params,
        flops=int(flops),
        latency_ms=latency,
        train_step_ms=step_ms,
        peak_memory_inference_mb=peak_infer,
        peak_memory_train_step_mb=peak_step,
        memory_method=method,
        unsupported_ops=flops.unsupported,
    )


def paired_latency(
    models: Sequence[nn.Module], input_size: Sequence[int], *, warmup: int = 2, repeats: int = 7
) -> list[float]:
    """Median eval-mode latency (ms) of each model, timed in alternation: one call of each per round.

    On a shared machine the load drifts between two separate :func:`measure` calls; alternating keeps
    the ratio of the medians about the models, not about the moment each was measured. Each model runs
    where its parameters are.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    calls = []
    for model in models:
        ref = next((p for p in model.parameters()), None)
        dev = ref.device if ref is not None else torch.device("cpu")
        calls.append((model, torch.randn([int(s) for s in input_size], device=dev), dev))
    times: list[list[float]] = [[] for _ in calls]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for model, _, _ in calls:
            stack.enter_context(eval_mode(model))
        for round_ in range(warmup + repeats):
            for i, (model, x, dev) in enumerate(calls):
                _sync(dev)
                start = time.perf_counter()
                model(x)
                _sync(dev)
                if round_ >= warmup:
                    times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def _measure_train_step(
    model: nn.Module, x: torch.Tensor, dev: torch.device, warmup: int, repeats: int
) -> tuple[float, float]:
    """Median time and peak memory of forward + backward + SGD step; the weights are restored afterwards."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {p: p.grad for p in model.parameters()}
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}

    def step(optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs = _first_tensors(model(x))
        loss = sum(o.float().square().mean() for o in outputs)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()

    try:
        model.train()
        params = list(model.parameters())  # a frozen model (e.g. a distillation teacher) is trained in full here
        for p in params:
            p.requires_grad_(True)
        # Peak first, on a fresh optimizer, so that its momentum buffers (created at the first step) count.
        peak = _peak_mib(lambda: step(torch.optim.SGD(params, lr=1e-6, momentum=0.9)), dev)
        optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
        ms = _timed(lambda: step(optimizer), dev, warmup, repeats)
    finally:
        with torch.no_grad():
            model.load_state_dict(saved)
            model.eval()(x)  # outputs a network caches as attributes (DynUNet's heads) must not keep the graph
        for p, g in grads.items():
            p.grad = g
            p.requires_grad_(flags[p])
        for m, training in modes.items():
            m.train(training)
    return ms, peak
