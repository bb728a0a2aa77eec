"""Channel pruning through torch-pruning's dependency graph on real 3-D U-Nets, plain, wrapped and slim."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet, UNet
from networks import NETWORKS, first_output
from torch import nn

import prunekit3d as pk
from prunekit3d.channels import (
    ChannelPlan,
    ChannelRecord,
    apply_channel_plan,
    apply_channel_record,
    build_graph,
    channel_record,
    count_flops,
    count_params,
    kernel_widths,
    output_layers,
    prune_channels,
)
from prunekit3d.channels.graph import prunable_groups, sync_splits, sync_widths
from prunekit3d.channels.prune import BUDGET_STEP
from prunekit3d.models import psp_seg
from prunekit3d.report import measure
from prunekit3d.slim import slim
from prunekit3d.slim.blocks import SlimParallel

# Patterns cycled over redundant modules (branch indices kept active; 0 is the original block when
# the module has one): a block-pruned model holds masked branches of every kind.
PATTERNS = [[0, 2], [1, 3], [0, 1, 2, 4], None]


pytestmark = pytest.mark.threads(1)


def _dynunet_ds() -> tuple[nn.Module, torch.Tensor]:
    """The issue's DynUNet: plain conv blocks, with deep-supervision heads used in training only."""
    net = DynUNet(3, 1, 3, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 64], deep_supervision=True)
    return net, torch.randn(1, 1, 16, 16, 16)


def _network(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "dynunet_ds":
        return _dynunet_ds()
    if name.startswith("psp_seg_"):
        variant = name[-1].upper()
        shape = (1, 1, 32, 32, 64) if variant == "L" else (1, 1, 32, 32, 16)  # L halves five times
        return psp_seg(variant, 1, 3), torch.randn(shape)
    model, x = NETWORKS[name]()
    if name != "basic_unet":  # its five levels need 32^3; the others run on 16^3 to keep the file fast
        x = x[..., :16, :16, :16].contiguous()
    return model, x


def _block_prune(model: nn.Module) -> None:
    """Random gates (so that every branch matters) and a mix of masked branches, as after block pruning."""
    gen = torch.Generator().manual_seed(1)
    for i, (_, m) in enumerate(pk.redundant_modules(model)):
        with torch.no_grad():
            m.gates.copy_(0.5 * torch.randn(len(m.branches), generator=gen))
        keep = PATTERNS[i % len(PATTERNS)]
        if keep is not None:
            m.mask([k for k in range(len(m.branches)) if k not in keep])


def _form(name: str, form: str) -> tuple[nn.Module, torch.Tensor]:
    """``name`` as a plain network, wrapped and block-pruned, or slimmed after that."""
    model, x = _network(name)
    if form != "plain" or name.startswith("psp_seg_"):
        if not name.startswith("psp_seg_"):
            pk.wrap(model, x, branches=4)
        _block_prune(model)
    if form == "slim":
        model = slim(model)
    return model, x


def _outputs(y: object) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (list, tuple)) else [y]  # type: ignore[list-item]


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(_outputs(a(x)), _outputs(b(x)), strict=True))


def _check_pruned(model: nn.Module, fresh: nn.Module, x: torch.Tensor, shapes: list) -> None:
    """Same output shapes, forward and backward in training mode, and a replay on ``fresh`` equals it."""
    model.eval()
    with torch.no_grad():
        assert [tuple(y.shape) for y in _outputs(model(x))] == shapes
    model.train()
    first_output(model(x)).square().mean().backward()
    grads = [(p.grad, p) for p in model.parameters() if p.grad is not None]
    assert grads and all(g.shape == p.shape for g, p in grads)
    apply_channel_record(fresh, channel_record(model))
    fresh.load_state_dict(model.state_dict())
    assert _max_diff(fresh.eval(), model.eval(), x) <= 1e-6


# ---- the crash and its fix ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["monai_unet", "dynunet_ds", "basic_unet", "plain_conv_unet"])
def test_graph_of_concatenation_unets_holds_every_conv_and_norm(name: str) -> None:
    # torch-pruning alone crashes on these (int + None in update_concat_index_mapping): in-place
    # activations hide the instance norms, and a shared PReLU hides its channel count.
    model, x = _network(name)
    called: list[nn.Module] = []
    kinds = (nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d, nn.GroupNorm, nn.PReLU)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    handles = [m.register_forward_hook(lambda m, a, y: called.append(m)) for m in layers]
    model.train()(x)  # the layers a training forward runs (deep-supervision heads included)
    for h in handles:
        h.remove()
    graph = build_graph(model, x)
    layers = list(dict.fromkeys(called))
    missing = [type(m).__name__ for m in layers if m not in graph.module2node]
    assert not missing
    # Nothing of the tracing is left behind: hooks removed, class forwards back.
    assert all(not (m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "form"), [("plain_conv_unet", "plain"), ("monai_unet", "wrapped"), ("psp_seg_s", "slim")]
)
def test_removing_dead_channels_leaves_outputs_unchanged(name: str, form: str) -> None:
    # Zero a third of every group's channels in all the layers that produce them; if the graph couples
    # the right layers (skips, concatenations, residual paths, light branches, fused slim blocks),
    # removing exactly those channels cannot change the output.
    model, x = _form(name, form)
    model.eval()
    params = count_params(model)
    graph = build_graph(model, x)
    chosen = []
    for root, fn, group in prunable_groups(graph, output_layers(graph)):
        n = len(group[0].idxs)
        chosen.append((root, fn, list(range(0, n, 3))[: n - 1]))
    with torch.no_grad():
        for root, fn, idxs in chosen:
            for dep, positions in graph.get_pruning_group(root, fn, idxs):
                layer = dep.target.module
                if not graph.is_out_channel_pruning_fn(dep.handler) or not isinstance(layer, nn.Module):
                    continue
                if isinstance(layer, nn.modules.conv._ConvNd):
                    if layer.transposed:
                        layer.weight[:, positions] = 0
                    else:
                        layer.weight[positions] = 0
                    if layer.bias is not None:
                        layer.bias[positions] = 0
                elif getattr(layer, "weight", None) is not None and layer.weight.numel() > 1:
                    layer.weight[positions] = 0
                    layer.bias[positions] = 0
        before = [y.clone() for y in _outputs(model(x))]
    for root, fn, idxs in chosen:
        graph.get_pruning_group(root, fn, idxs).prune()
        sync_splits(graph)
    sync_widths(model)
    with torch.no_grad():
        after = _outputs(model(x))
    assert len(chosen) > 10 and count_params(model) < params
    assert max(float((a - b).abs().max()) for a, b in zip(after, before)) <= 1e-4


@pytest.mark.parametrize("how", ["ratio", "budget"])
def test_each_branch_of_a_fused_slim_block_loses_its_own_hidden_channels(how: str) -> None:
    # Every branch of a fused slim block reads its own slice of the shared 1x1 reduction. Dead channels
    # at a different half of each slice must be the ones removed -- in one round, or in the budget
    # search's many rounds on one graph -- or a branch would be paired with another's reduction channels.
    model, x = _form("psp_seg_s", "slim")
    model.eval()
    blocks = [m for m in model.modules() if isinstance(m, SlimParallel) and len(m.convs) > 1]
    assert blocks and all(h % 2 == 0 for m in blocks for h in m.hidden)
    with torch.no_grad():
        for m in blocks:
            start = 0
            for k, (conv, h) in enumerate(zip(m.convs, m.hidden)):
                dead = [j for j in range(h) if (j + k) % 2 == 0]
                rows = [start + j for j in dead]
                for t in (m.reduce.weight, m.reduce.bias, m.norm1.weight, m.norm1.bias):
                    t[rows] = 0
                conv.weight[:, dead] = 0
                start += h
        before = first_output(model(x)).clone()
    hidden_before = [list(m.hidden) for m in blocks]
    branch_convs = {c for m in blocks for c in m.convs}
    others = [n for n, c in model.named_modules() if isinstance(c, nn.modules.conv._ConvNd) and c not in branch_convs]
    if how == "ratio":
        prune_channels(model, x, ratio=0.5, ignored=others)
        assert [list(m.hidden) for m in blocks] == [[h // 2 for h in hs] for hs in hidden_before]
    else:
        half = copy.deepcopy(model)
        prune_channels(half, x, ratio=0.5, ignored=others)
        target = (count_params(model) + count_params(half)) // 2
        plan = prune_channels(model, x, target_params=target, ignored=others)
        assert count_params(model) <= target and plan.ratio >= 2 * 0.025  # several rounds on one graph
        widths = [(h, w) for m, hs in zip(blocks, hidden_before) for h, w in zip(hs, m.hidden)]
        assert all(h // 2 <= w <= h for h, w in widths) and any(w < h for h, w in widths)
    with torch.no_grad():
        assert float((first_output(model(x)) - before).abs().max()) <= 1e-4


# ---- acceptance: ratio 0.5 on the concatenation U-Nets --------------------------------------------------
@pytest.mark.parametrize("name", ["monai_unet", "dynunet_ds", "basic_unet", "plain_conv_unet"])
def test_half_ratio_cuts_params_keeps_shapes_and_replays(name: str) -> None:
    model, x = _network(name)
    fresh = copy.deepcopy(model)
    shapes = [tuple(y.shape) for y in _outputs(model.eval()(x))]
    train_shape = tuple(model.train()(x).shape)
    plan = prune_channels(model, x, ratio=0.5)
    assert plan.reduction() >= 0.4 and plan.params_after == count_params(model)
    assert tuple(model.train()(x).shape) == train_shape  # DynUNet's stacked deep-supervision outputs too
    _check_pruned(model, fresh, x, shapes)


# ---- every network, plain / wrapped and block-pruned / slim ----------------------------------------------
MATRIX = [
    *[(n, "plain") for n in ("segresnet", "residual_encoder_unet")],
    *[(n, f) for n in ("monai_unet", "dynunet", "segresnet", "basic_unet") for f in ("wrapped", "slim")],
    *[(n, f) for n in ("plain_conv_unet", "residual_encoder_unet") for f in ("wrapped", "slim")],
    ("psp_seg_s", "wrapped"),
    ("psp_seg_s", "slim"),
]


@pytest.mark.parametrize(("name", "form"), MATRIX)
def test_every_network_and_form(name: str, form: str) -> None:
    model, x = _form(name, form)
    fresh = copy.deepcopy(model)
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("gates") or n.endswith("gate")}
    shapes = [tuple(y.shape) for y in _outputs(model.eval()(x))]
    plan = prune_channels(model, x, ratio=0.5)
    assert plan.reduction() >= 0.4
    assert plan.stage == ("redundant" if form == "wrapped" else "plain")
    assert all(torch.equal(p, gates[n]) for n, p in model.named_parameters() if n in gates)  # gates never pruned
    _check_pruned(model, fresh, x, shapes)


@pytest.mark.parametrize("variant", ["B", "L"])
def test_psp_seg_b_and_l_after_block_pruning(variant: str) -> None:
    model, x = _form(f"psp_seg_{variant.lower()}", "wrapped")
    shapes = [tuple(y.shape) for y in _outputs(model.eval()(x))]
    plan = prune_channels(model, x, ratio=0.5)
    assert plan.reduction() >= 0.4
    with torch.no_grad():
        assert [tuple(y.shape) for y in _outputs(model(x))] == shapes
    light = [m for _, r in pk.redundant_modules(model) for m in r.branches]
    assert all(b.reduce.out_channels == b.norm1.num_features == b.conv.in_channels for b in light)


def test_sequential_modules_prune_along_their_chain() -> None:
    model, x = psp_seg("S", 1, 3, mode="sequential"), torch.randn(1, 1, 32, 32, 16)
    _block_prune(model)
    fresh = copy.deepcopy(model)
    shapes = [tuple(y.shape) for y in _outputs(model.eval()(x))]
    assert prune_channels(model, x, ratio=0.5).reduction() >= 0.4
    _check_pruned(model, fresh, x, shapes)


# ---- what stays: heads, ignored layers, state -------------------------------------------------------------
def test_heads_ignored_layers_and_model_state_stay() -> None:
    model = UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=1, norm="batch")  # BatchNorm: running statistics
    x = torch.randn(1, 1, 16, 16, 16)
    model(x)  # non-trivial running statistics
    model.eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    plan = prune_channels(model, x, ratio=0.5, ignored=["model.0"])
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    assert model.model[0].conv.unit0.conv.out_channels == 8  # ignored
    assert all(not n.startswith("model.0.") for n in plan.widths)
    assert model(x).shape == (1, 3, 16, 16, 16)  # the head keeps its classes
    graph = build_graph(model, x)
    assert all(graph.get_out_channels(h) in (3, None) for h in output_layers(graph))
    kept = {n: b for n, b in model.named_buffers() if b.shape == buffers[n].shape}
    assert kept and all(torch.equal(b, buffers[n]) for n, b in kept.items())  # tracing left the statistics alone


def test_frozen_layers_are_pruned_and_stay_frozen() -> None:
    # Tracing follows autograd; a frozen encoder must neither vanish from the graph nor come back trainable.
    model, x = _network("monai_unet")
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.0."))
    params = count_params(model)
    plan = prune_channels(model, x, ratio=0.5)
    assert count_params(model) < 0.5 * params and any(n.startswith("model.0.") for n in plan.widths)
    assert all(p.requires_grad == (not n.startswith("model.0.")) for n, p in model.named_parameters())


def test_a_pruned_network_keeping_outputs_as_attributes_can_be_copied() -> None:
    # DynUNet keeps its deep-supervision outputs in a list attribute; tensors of the tracing forward
    # left there would make deepcopy (and so slim and save) refuse the model.
    model, x = _dynunet_ds()
    model.train()
    prune_channels(model, x, ratio=0.5)
    twin = copy.deepcopy(model)
    assert _max_diff(twin.eval(), model.eval(), x) == 0


# ---- importance, global ranking and budgets -----------------------------------------------------------
def test_taylor_uses_gradients_and_differs_from_magnitude() -> None:
    model, x = _network("plain_conv_unet")
    with pytest.raises(ValueError, match="loss.backward"):
        prune_channels(copy.deepcopy(model), x, ratio=0.5, importance="taylor")
    magnitude = prune_channels(copy.deepcopy(model), x, ratio=0.5)
    target = torch.randint(0, 3, (1, 16, 16, 16))
    F.cross_entropy(model(x), target).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    taylor = prune_channels(model, x, ratio=0.5, importance="taylor")
    assert taylor.importance == "taylor" and taylor.params_after == magnitude.params_after
    assert taylor.history != magnitude.history
    assert [n for n, p in model.named_parameters() if p.grad is None] == no_grad
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())


def test_global_ranking_varies_widths_within_the_cap() -> None:
    model, x = _network("dynunet")
    plan = prune_channels(model, x, ratio=0.5, global_pruning=True)
    kept = [after / before for before, after in plan.widths.values()]
    assert 0.4 <= plan.reduction() and len({round(k, 2) for k in kept}) > 2
    assert min(kept) >= 0.1 - 1e-9 and model(x).shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize("budget", ["params", "flops"])
def test_budget_is_met_within_one_step(budget: str) -> None:
    model, x = _network("plain_conv_unet")
    measure = (lambda: count_params(model)) if budget == "params" else (lambda: count_flops(model, x))
    start = measure()
    target = start * 2 // 5
    plan = prune_channels(model, x, **{f"target_{budget}": target})
    assert measure() <= target < start
    assert 0 < plan.ratio < 0.9 and measure() >= target * 0.7  # not pruned far past the budget


@pytest.mark.parametrize("r", [0.5, 0.3])
def test_a_fraction_of_the_reported_flops_is_a_budget_that_lands_at_that_fraction(r: float) -> None:
    # The report's figure and the budget share one unit: prune no further than the step that meets it.
    model, x = _network("dynunet")
    fresh = copy.deepcopy(model)
    reported = measure(model, tuple(x.shape), repeats=1, warmup=0, train_step=False).flops
    plan = prune_channels(model, x, target_flops=int(reported * r))
    assert count_flops(model, x) / reported <= r
    one_step_less = copy.deepcopy(fresh)
    prune_channels(one_step_less, x, ratio=plan.ratio - BUDGET_STEP)
    assert count_flops(one_step_less, x) / reported > r


def test_rounds_relative_to_the_start_end_at_the_widths_of_one_cut() -> None:
    # SegResNet's group norms (8 groups) let a 16-channel layer keep 16 or 8: 0.21 of its own width a round
    # never cuts it, so rounds of their own widths end elsewhere than one cut (compress's budget rounds had to
    # halve everything in the last round and landed at 0.14 of the FLOPs asked to keep 0.5).
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    start = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=16).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    one_cut = copy.deepcopy(start)
    prune_channels(one_cut, x, ratio=0.5)
    rounds, compounding = copy.deepcopy(start), copy.deepcopy(start)
    for r in range(3):
        prune_channels(rounds, x, ratio=1 - 0.5 ** ((r + 1) / 3), relative_to=start)
        prune_channels(compounding, x, ratio=1 - 0.5 ** (1 / 3))
    widths = {n: m.out_channels for n, m in rounds.named_modules() if isinstance(m, nn.Conv3d)}
    assert widths == {n: m.out_channels for n, m in one_cut.named_modules() if isinstance(m, nn.Conv3d)}
    assert count_flops(rounds, x) == count_flops(one_cut, x)
    assert count_flops(compounding, x) != count_flops(one_cut, x)
    assert rounds(x).shape == (1, 2, 32, 32, 16)


def test_kernel_widths_are_multiples_and_power_of_two_fractions_of_round_to() -> None:
    assert kernel_widths(128, 16) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert kernel_widths(30, 16) == [1, 2, 4, 8, 16, 30]  # a layer's own width is always allowed
    assert kernel_widths(20, 12) == [3, 6, 12, 20] and kernel_widths(5, 1) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("global_pruning", [False, True])
def test_round_to_keeps_every_pruned_width_kernel_friendly_and_replays(global_pruning: bool, tmp_path) -> None:
    # A CPU runs a 22-channel convolution as slowly as a 32-channel one (channels in blocks of 16 floats).
    torch.manual_seed(0)
    model = DynUNet(3, 1, 3, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[16, 32, 64, 128], res_block=True)
    x, fresh = torch.randn(1, 1, 16, 16, 16), copy.deepcopy(model)
    free = copy.deepcopy(model)
    plan = prune_channels(model, x, ratio=0.3, round_to=16, global_pruning=global_pruning)
    widths = {after for before, after in plan.widths.values()}
    assert widths and all(w in kernel_widths(before, 16) for before, w in plan.widths.values()), plan.widths
    unrounded = prune_channels(free, x, ratio=0.3, global_pruning=global_pruning)
    assert any(w % 2 for _, w in unrounded.widths.values())  # without rounding, odd widths
    assert plan.round_to == 16 and model(x).shape == (1, 3, 16, 16, 16)
    pk.save(model, tmp_path / "rounded")
    loaded = pk.load(tmp_path / "rounded", model=fresh)
    assert _max_diff(loaded, model.eval(), x) <= 1e-6 and ChannelPlan.from_dict(plan.to_dict()).round_to == 16


def test_round_to_lands_a_group_norm_network_on_the_nearest_allowed_width() -> None:
    # SegResNet: 8 groups, so a 32-channel layer may keep 8, 16 or 32 (whole groups, on the ladder of 16):
    # 0.3 off asks 22.4 of 32 and gets 16, 11.2 of 16 gets 8, 44.8 of 64 gets 48 (5.6 of 8 gets 4).
    from monai.networks.nets import SegResNet

    model, x = SegResNet(3, 8, 1, 2), torch.randn(1, 1, 16, 16, 16)
    plan = prune_channels(model, x, ratio=0.3, round_to=16)
    assert {before: after for before, after in plan.widths.values()} == {8: 4, 16: 8, 32: 16, 64: 48}
    assert model(x).shape == (1, 2, 16, 16, 16)


# ---- the record ---------------------------------------------------------------------------------------------
def test_record_round_trips_json_and_rejects_another_model() -> None:
    model, x = _network("monai_unet")
    prune_channels(model, x, ratio=0.25)
    prune_channels(model, x, ratio=0.25)
    record = channel_record(model)
    again = ChannelRecord.from_json(record.to_json())
    assert again == record and len(again.rounds) == 2 and again.at("plain") == again.rounds
    fresh = _network("monai_unet")[0]
    for plan in again.rounds:
        apply_channel_plan(fresh, plan.to_dict())
    assert count_params(fresh) == count_params(model) and channel_record(fresh).rounds == []
    other = UNet(3, 1, 3, (8, 16, 32, 64), (2, 2, 2), num_res_units=1)
    with pytest.raises(ValueError, match="rebuild"):
        apply_channel_record(other, record)
    with pytest.raises(ValueError, match="stage"):
        ChannelPlan.from_dict({**record.rounds[0].to_dict(), "stage": "later"})


@pytest.mark.parametrize("name", ["monai_unet", "dynunet_ds", "basic_unet", "plain_conv_unet"])
def test_save_load_rebuilds_a_half_pruned_network(name: str, tmp_path) -> None:
    # prunekit3d.io writes each channel round as a step of the artifact and load replays it.
    model, x = _network(name)
    fresh = copy.deepcopy(model)
    prune_channels(model, x, ratio=0.5)
    pk.save(model, tmp_path / name)
    loaded = pk.load(tmp_path / name, model=fresh)
    assert count_params(loaded) == count_params(model) and _max_diff(loaded, model.eval(), x) <= 1e-6


def test_save_load_rebuilds_wrapped_and_reloaded_pruned_models(tmp_path) -> None:
    kw = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [8, 8, 16, 32, 64, 8]}
    spec = {"import_path": "monai.networks.nets.BasicUNet", "kwargs": kw}
    x = torch.randn(1, 1, 32, 32, 32)
    wrapped = pk.from_spec(spec)
    prune_channels(wrapped, x, ratio=0.25)  # before wrapping: a "plain" round, replayed before the wrap spec
    pk.wrap(wrapped, x, branches=4)
    _block_prune(wrapped)
    prune_channels(wrapped, x, ratio=0.5)  # a "redundant" round, replayed between wrap spec and slim
    pk.save(wrapped, tmp_path / "wrapped", spec=spec)
    loaded = pk.load(tmp_path / "wrapped")
    assert _max_diff(loaded, slim(wrapped).eval(), x) <= 1e-5
    prune_channels(loaded, x, ratio=0.3)  # a loaded slim model pruned again: its round follows the saved steps
    pk.save(loaded, tmp_path / "again")
    assert _max_diff(pk.load(tmp_path / "again"), loaded.eval(), x) <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.5}, "between 0 and 1"),
        ({"ratio": 0.5, "target_params": 10}, "exactly one"),
        ({}, "exactly one"),
        ({"target_flops": -1}, "positive"),
        ({"ratio": 0.5, "importance": "magnitud"}, "did you mean 'magnitude'"),
        ({"ratio": 0.5, "ignored": ["model.9"]}, "does not have"),
        ({"ratio": 0.5, "round_to": 0}, "round_to"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs: dict, message: str) -> None:
    model, x = UNet(3, 1, 2, (4, 8), (2,), num_res_units=0), torch.randn(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=message):
        prune_channels(model, x, **kwargs)


@pytest.mark.parametrize(("shape", "message"), [((1, 8, 8, 8), "5-D"), ((2, 1, 8, 8, 8), "batch size 1")])
def test_bad_example_inputs_name_the_problem(shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prune_channels(UNet(3, 1, 2, (4, 8), (2,)), torch.randn(shape), ratio=0.5)


def test_an_unreachable_budget_warns_and_stops_at_the_cap() -> None:
    model, x = UNet(3, 1, 2, (8, 16), (2,), num_res_units=0), torch.randn(1, 1, 8, 8, 8)
    with pytest.warns(UserWarning, match="budget"):
        plan = prune_channels(model, x, target_params=10)
    assert plan.ratio == pytest.approx(0.9) and model(x).shape == (1, 2, 8, 8, 8)
