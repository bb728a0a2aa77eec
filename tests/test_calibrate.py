import gc
import itertools
import json
import weakref

import pytest
import torch
from networks import NETWORKS
from rich.console import Console

import prunekit3d as pk
from prunekit3d.calibrate import GateMagnitude, calibrate
from prunekit3d.plan import PrunePlan
from prunekit3d.prune import active_branches, prune, restore
from prunekit3d.redundant import RedundantModule


def _randomise_gates(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in pk.redundant_modules(model):
            m.gates.add_(torch.randn(m.gates.shape, generator=g) * scale)


def _wrapped_dynunet(mode="parallel"):
    model, _ = NETWORKS["dynunet"]()
    x = torch.randn(1, 1, 16, 16, 16)  # small enough for brute-force references, 2^3 at the bottleneck
    pk.wrap(model, x, branches=4, mode=mode)
    _randomise_gates(model)
    return model.eval(), x


def _brute_force_errors(model, batches, step):
    """Reference: mask each candidate set and compare module outputs, inputs taken from the full network."""
    errors = {}
    for name, module in pk.redundant_modules(model):
        active = module.active_indices()
        if len(active) <= step:
            continue
        inputs = []
        handle = module.register_forward_hook(lambda m, a, out: inputs.append((a[0], out)))
        with torch.no_grad():
            for b in batches:
                model(b)
        handle.remove()
        row = []
        for s in itertools.combinations(active, step):
            module.mask(s)
            with torch.no_grad():
                row.append(sum(float(torch.linalg.vector_norm(out - module(x))) for x, out in inputs))
            module.unmask(s)
        errors[name] = row
    return errors


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("step", [1, 2])
def test_one_pass_errors_equal_brute_force(mode, step):
    model, x = _wrapped_dynunet(mode)
    batches = [torch.randn_like(x) for _ in range(2)]
    plan = calibrate(model, batches, step=step)
    reference = _brute_force_errors(model, batches, step)
    assert plan.modules.keys() == reference.keys() and plan.batches == 2
    for name, decision in plan.modules.items():
        torch.testing.assert_close(torch.tensor(decision.errors), torch.tensor(reference[name]), rtol=1e-3, atol=1e-3)
        best = min(range(len(decision.errors)), key=lambda i: decision.errors[i])
        assert decision.chosen == decision.candidates[best]
        assert all(len(c) == step for c in decision.candidates)


@pytest.mark.parametrize("step", [1, 2])
def test_psp_seg_output_activation_is_scored_through_the_activation(step):
    from prunekit3d.models import psp_seg

    model = psp_seg("S", 1, 2).eval()
    _randomise_gates(model, scale=1.0)
    batches = [torch.randn(1, 1, 32, 32, 32)]
    plan = calibrate(model, batches, step=step)
    reference = _brute_force_errors(model, batches, step)
    for name, decision in plan.modules.items():
        torch.testing.assert_close(torch.tensor(decision.errors), torch.tensor(reference[name]), rtol=1e-3, atol=1e-3)


def test_calibration_keeps_no_batch_alive():
    """Peak memory cannot grow with the number of batches: no batch outlives its forward pass."""
    model, x = _wrapped_dynunet()
    refs: list[weakref.ref] = []

    def stream():
        for _ in range(4):
            gc.collect()
            assert all(r() is None for r in refs[:-1]), "an earlier calibration batch is still referenced"
            t = torch.randn_like(x)
            refs.append(weakref.ref(t))
            yield {"image": t}

    plan = calibrate(model, stream(), step=1)
    assert plan.batches == 4


def test_model_state_untouched_by_calibration():
    model, x = _wrapped_dynunet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, [x], step=1)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all("forward" not in vars(m) for _, m in pk.redundant_modules(model))


def test_a_users_own_instance_forward_survives_calibration_and_tracing():
    from prunekit3d.channels import build_graph

    model, x = _wrapped_dynunet()
    reference = calibrate(model, [x], step=1)
    name, module = pk.redundant_modules(model)[0]
    calls = []

    def instrumented(inp):  # a user's instrumentation around the module's own forward
        calls.append(1)
        return type(module).forward(module, inp)

    module.forward = instrumented
    plan = calibrate(model, [x], step=1)
    assert vars(module)["forward"] is instrumented and calls == [1]
    assert plan.modules == reference.modules  # the module still scored: its forward honours the scoring mode
    build_graph(model, x)
    assert vars(module)["forward"] is instrumented and len(calls) == 2
    assert all(m.scoring is None and not m.tracing for _, m in pk.redundant_modules(model))


def test_ties_break_to_first_candidate():
    from prunekit3d.models import psp_seg

    model = psp_seg("S", 1, 2).eval()  # all gates 0: every light branch adds nothing, all errors tie at 0
    plan = calibrate(model, [torch.randn(1, 1, 32, 32, 32)], step=2)
    for decision in plan.modules.values():
        assert set(decision.errors) == {0.0}
        assert decision.chosen == [0, 1]


def test_modules_with_too_few_branches_are_skipped():
    model, x = _wrapped_dynunet()
    first, module = pk.redundant_modules(model)[0]
    module.mask([1, 2, 3])
    plan = calibrate(model, [x], step=2)
    assert first not in plan.modules and len(plan.modules) == len(pk.redundant_modules(model)) - 1


def test_plan_json_round_trip_and_rich_table():
    model, x = _wrapped_dynunet()
    plan = calibrate(model, [x], step=1)
    again = PrunePlan.from_json(json.dumps(json.loads(plan.to_json())))
    assert again == plan
    console = Console(record=True, width=200)
    console.print(plan)
    text = console.export_text()
    assert all(name in text for name in plan.modules)
    with pytest.raises(ValueError, match="not a prune plan"):
        PrunePlan.from_dict({"modules": {}})


def test_pluggable_scorer():
    model, x = _wrapped_dynunet()
    plan = calibrate(model, [x], step=1, scorer=GateMagnitude())
    assert plan.scorer == "gate-magnitude"
    for name, module in pk.redundant_modules(model):
        gates = module.gates.detach().abs()
        assert plan.modules[name].chosen == [int(gates.argmin())]


def test_bad_calibration_input():
    model, x = _wrapped_dynunet()
    with pytest.raises(ValueError, match="step"):
        calibrate(model, [x], step=0)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [], step=1)
    with pytest.raises(TypeError, match="image"):
        calibrate(model, [{"img": x}], step=1)


# ---- prune / restore -------------------------------------------------------------------------------


def test_prune_restore_round_trip_and_psp_semantics():
    model, x = _wrapped_dynunet()
    start = active_branches(model)
    with torch.no_grad():
        y_full = model(x)
    first = calibrate(model, [x], step=1)
    prune(model, first)
    for name, decision in first.modules.items():
        assert set(active_branches(model)[name]) == set(start[name]) - set(decision.chosen)
    restore(model, first)
    assert active_branches(model) == start
    with torch.no_grad():
        assert torch.equal(model(x), y_full)

    prune(model, first)
    second = calibrate(model, [x], step=1)
    prune(model, second)  # the first event's branches are now gone for good
    with pytest.raises(ValueError, match="removed them for good|latest pruning"):
        restore(model, first)
    restore(model, second)
    for name, decision in first.modules.items():
        assert not set(decision.chosen) & set(active_branches(model)[name])


def test_stale_or_foreign_plan_is_refused():
    model, x = _wrapped_dynunet()
    plan = calibrate(model, [x], step=1)
    prune(model, plan)
    with pytest.raises(ValueError, match="stale"):
        prune(model, plan)
    other, _ = NETWORKS["plain_conv_unet"]()
    pk.wrap(other, torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="does not have"):
        prune(other, plan)


def test_restorable_state_lives_in_the_state_dict():
    model, x = _wrapped_dynunet()
    plan = calibrate(model, [x], step=1)
    prune(model, plan)
    copy, _ = _wrapped_dynunet()
    copy.load_state_dict(model.state_dict())
    restore(copy, plan)
    assert all(m.active.all() for _, m in pk.redundant_modules(copy))
    assert all(isinstance(m, RedundantModule) for _, m in pk.redundant_modules(copy))


def test_gram_scores_are_float64_from_the_start():
    # Two candidates whose squared norms differ by 2e-3 over a million voxels: in float32 both round to 2^20.
    from prunekit3d.calibrate import ReconstructionError

    plain = torch.ones(1, 1, 64, 128, 128)
    bumped = plain.clone()
    bumped.view(-1)[12345] = 1.001
    errors = ReconstructionError._from_gram({1: bumped, 2: plain}, [(1,), (2,)])
    assert errors.dtype == torch.float64 and errors[0] > errors[1]
    assert float(errors[0] ** 2 - errors[1] ** 2) == pytest.approx(float(bumped.max()) ** 2 - 1, rel=1e-6)
