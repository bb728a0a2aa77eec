import io
import json
import math

import pytest
import torch
import torch.distributed as dist
from networks import NETWORKS
from rich.console import Console

import prunekit3d as pk
from prunekit3d.models.pspseg import PSPSeg, PSPSegConfig
from prunekit3d.prune import active_branches
from prunekit3d.schedule import Decision, ProgressivePruner

QUIET = Console(quiet=True)


def tiny_model(seed=0):
    """A real PSP-Seg network, 3 redundant modules of 4 branches, with gates that make errors differ."""
    torch.manual_seed(seed)
    model = PSPSeg(PSPSegConfig((8, 16, 32), 0.5, 4), in_channels=1, out_channels=2)
    with torch.no_grad():
        for _, m in pk.redundant_modules(model):
            m.gates.uniform_(0.2, 2.0)
    return model


def calibration(size=16):
    """A factory of endless random batches; every call yields the same sequence."""

    def batches():
        g = torch.Generator().manual_seed(7)
        while True:
            yield torch.randn(1, 1, size, size, size, generator=g)

    return batches


def pruner_for(model, **kwargs):
    kwargs = {"total_epochs": 100, "patience": 2, "calibration_batches": 2, "console": QUIET, **kwargs}
    return ProgressivePruner(model, calibration(), **kwargs)


def drive(pruner, totals, start=0):
    """Feed one {"total": v} per epoch; return {epoch: decision} of the epochs that decided something."""
    decisions = {}
    for epoch, value in enumerate(totals, start):
        d = pruner.on_epoch_end(epoch, {"total": value})
        if d is not None:
            decisions[epoch] = d
    return decisions


def counts(model):
    return {name: len(b) for name, b in active_branches(model).items()}


def restorable(model):
    return {name: m.restorable.nonzero().flatten().tolist() for name, m in pk.redundant_modules(model)}


def test_prunes_on_convergence_then_stops_when_nothing_is_left():
    model = tiny_model()
    pruner = pruner_for(model)
    # epochs 0-2 improve, 3-4 do not: converged at 4 (patience 2).
    decisions = drive(pruner, [1.0, 0.9, 0.8, 0.8, 0.8])
    assert list(decisions) == [4]
    d = decisions[4]
    assert d.kind == "prune" and d.structure_changed and d.step == 2
    assert d.plan.batches == 2  # calibration_batches taken from an endless iterable
    assert set(d.branches) == set(counts(model)) and all(len(b) == 2 for b in d.branches.values())
    assert counts(model) == {name: 2 for name in d.branches}
    assert restorable(model) == {name: sorted(b) for name, b in d.branches.items()}
    # Not worse than before (0.78 < 0.8): prune again; no module has more than 2 branches: stop, keep all.
    decisions = drive(pruner, [0.79, 0.78, 0.78, 0.78], start=5)
    assert list(decisions) == [8] and decisions[8].kind == "stop" and not decisions[8].structure_changed
    assert counts(model) == {name: 2 for name in d.branches}
    assert all(not r for r in restorable(model).values())  # the first event's branches are gone for good
    assert pruner.stopped and drive(pruner, [0.1] * 5, start=9) == {}
    assert [h["kind"] for h in pruner.history] == ["prune", "stop"]
    json.dumps(pruner.history)


def test_over_pruning_restores_and_lowers_step_to_zero():
    model = tiny_model()
    start = counts(model)
    pruner = pruner_for(model, tolerance=0.0)
    totals = [1.0, 0.9, 0.9, 0.9]  # prune at 3 (step 2)
    totals += [0.95, 0.95, 0.95]  # never back to 0.9: restore at 6, step 1
    totals += [0.85, 0.85, 0.85]  # after a restore there is nothing to undo: prune at 9 (step 1)
    totals += [0.9, 0.9, 0.9]  # worse than 0.85: restore at 12, step 0: pruning ends
    decisions = drive(pruner, totals + [0.1] * 4)
    assert {e: (d.kind, d.step) for e, d in decisions.items()} == {
        3: ("prune", 2), 6: ("restore", 1), 9: ("prune", 1), 12: ("restore", 0)}
    assert decisions[6].branches == decisions[3].branches and decisions[12].branches == decisions[9].branches
    assert all(len(b) == 1 for b in decisions[9].branches.values())
    assert counts(model) == start and all(not r for r in restorable(model).values())
    assert pruner.stopped and pruner.step == 0


def test_tolerance_and_which_losses_count():
    # 0.95 is within 0.1 of the best 0.9: not over-pruned, so the next event prunes again.
    pruner = pruner_for(tiny_model(), tolerance=0.1)
    decisions = drive(pruner, [1.0, 0.9, 0.9, 0.9, 0.95, 0.95, 0.95])
    assert [d.kind for d in decisions.values()] == ["prune", "stop"]  # step 2 again: nothing left above 2

    # Any monitored loss that stays worse means over-pruned; monitor= chooses the losses.
    fd_worse = [{"total": t, "fd": f} for t, f in [(1.0, 1.0), (0.9, 0.5), (0.9, 0.5), (0.9, 0.5),
                                                      (0.8, 0.7), (0.8, 0.7), (0.8, 0.7)]]
    kinds = {}
    for monitor in (None, ["total"]):
        pruner = pruner_for(tiny_model(), monitor=monitor)
        kinds[str(monitor)] = [d.kind for e, losses in enumerate(fd_worse)
                               if (d := pruner.on_epoch_end(e, losses)) is not None]
    assert kinds == {"None": ["prune", "restore"], "['total']": ["prune", "stop"]}


def test_stop_fraction_restores_the_pending_event():
    model = tiny_model()
    start = counts(model)
    pruner = pruner_for(model, total_epochs=10, patience=1)  # stop at the end of epoch 3 (40% of 10)
    assert pruner.stop_epoch == 3
    decisions = drive(pruner, [1.0, 0.9, 0.9, 0.8, 0.7, 0.7, 0.7])
    assert [(e, d.kind) for e, d in decisions.items()] == [(2, "prune"), (3, "stop")]
    stop = decisions[3]
    assert stop.structure_changed and stop.branches == decisions[2].branches
    assert counts(model) == start
    # Without a pending event the stop changes nothing.
    quiet = pruner_for(tiny_model(), total_epochs=10)
    stop = drive(quiet, [1.0, 0.9, 0.8, 0.7])[3]
    assert stop.kind == "stop" and not stop.structure_changed and stop.branches == {}


def test_non_finite_losses_never_decide():
    model = tiny_model()
    out = io.StringIO()
    pruner = pruner_for(model, console=Console(file=out, width=200))
    # Would converge at 3 with a finite value there; NaN/inf epochs are skipped and do not count.
    decisions = drive(pruner, [1.0, 0.9, 0.9, math.nan, math.inf, 0.9])
    assert list(decisions) == [5] and decisions[5].kind == "prune"
    assert pruner.skipped == [3, 4]
    assert "epoch 3: non-finite" in out.getvalue() and "epoch 5: prune" in out.getvalue()
    # A NaN after the event neither makes the event look bad nor good.
    decisions = drive(pruner, [math.nan, 0.85, 0.85, 0.85], start=6)
    assert [d.kind for d in decisions.values()] == ["stop"]  # not over-pruned: prune again, nothing left


def test_state_dict_round_trip_continues_identically():
    totals = [1.0, 0.9, 0.9, 0.9, 0.95, 0.95, 0.95, 0.85, 0.85, 0.85, 0.9, 0.9, 0.9, 0.8]
    a_model = tiny_model()
    a = pruner_for(a_model, tolerance=0.0)
    drive(a, totals)

    b_model = tiny_model()
    b = pruner_for(b_model, tolerance=0.0)
    drive(b, totals[:5])  # stop after epoch 4: an event is pending, one epoch into its window
    buffer = io.BytesIO()
    torch.save({"model": b_model.state_dict(), "pruner": b.state_dict()}, buffer)
    json.dumps(b.state_dict())  # plain data
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_model = tiny_model(seed=1)  # different gates until the checkpoint is loaded
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = pruner_for(resumed_model, tolerance=0.0)
    resumed.load_state_dict(checkpoint["pruner"])
    drive(resumed, totals[5:], start=5)

    assert [h["kind"] for h in a.history] == ["prune", "restore", "prune", "restore"]
    assert resumed.history == a.history
    assert resumed.state_dict() == a.state_dict()
    assert active_branches(resumed_model) == active_branches(a_model)
    assert [Decision.from_dict(h).to_dict() for h in a.history] == a.history


def test_works_on_a_wrapped_monai_network():
    model, _ = NETWORKS["dynunet"]()
    x = torch.randn(1, 1, 16, 16, 16)
    pk.wrap(model, x, branches=4)
    with torch.no_grad():
        for _, m in pk.redundant_modules(model):
            m.gates[1:].uniform_(0.2, 2.0)
    pruner = pruner_for(model, calibration_batches=1)
    d = drive(pruner, [1.0, 0.9, 0.9, 0.9])[3]
    assert d.kind == "prune" and len(d.branches) == len(pk.redundant_modules(model))
    assert all(len(b) == 3 for b in active_branches(model).values())  # 5 branches (original + 4) - 2


def test_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="patience >= 1.*step >= 1"):
        ProgressivePruner(model, calibration(), 10, patience=0, step=0)
    with pytest.raises(TypeError, match="factory"):
        ProgressivePruner(model, [torch.zeros(1)], 10)
    pruner = pruner_for(model)
    pruner.on_epoch_end(0, {"total": 1.0, "fd": 1.0})
    with pytest.raises(ValueError, match=r"lacks the monitored \['total'\]"):
        pruner.on_epoch_end(1, {"fd": 1.0})
    with pytest.raises(ValueError, match="epochs must increase"):
        pruner.on_epoch_end(0, {"total": 1.0, "fd": 1.0})
    with pytest.raises(ValueError, match="not a ProgressivePruner state"):
        pruner.load_state_dict({"step": 2})


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_distributed_decisions(process_group):
    model = torch.nn.parallel.DistributedDataParallel(tiny_model())
    pruner = pruner_for(model)
    d = drive(pruner, [1.0, 0.9, 0.9, 0.9])[3]  # losses all-reduced, calibration errors all-reduced
    assert d.kind == "prune" and all(len(b) == 2 for b in active_branches(model).values())
