import copy

import pytest
import torch
from networks import NETWORKS, first_output
from torch import nn

import prunekit3d as pk
from prunekit3d.redundant import LightBranch, ParallelRedundantModule, SequentialRedundantModule

NAMES = list(NETWORKS)


def _outputs(y):
    return [t for t in (y if isinstance(y, (list, tuple)) else [y])]


@pytest.fixture(scope="module", params=NAMES)
def wrapped(request):
    torch.manual_seed(0)
    model, x = NETWORKS[request.param]()
    original = copy.deepcopy(model)
    pk.wrap(model, x)
    return request.param, original, model, x


def test_wrap_finds_blocks_and_keeps_outputs_exact(wrapped):
    name, original, model, x = wrapped
    modules = pk.redundant_modules(model)
    assert len(modules) >= 1, name
    original.eval(), model.eval()
    with torch.no_grad():
        for a, b in zip(_outputs(original(x)), _outputs(model(x)), strict=True):
            assert (a - b).abs().max() <= 1e-5


def test_wrap_keeps_original_parameters(wrapped):
    _, original, model, _ = wrapped
    before = dict(original.named_parameters())
    for name, module in pk.redundant_modules(model):
        assert module.has_original and module.gates[0] == 1
        for pname, p in module.branches[0].named_parameters():
            assert torch.equal(p, before[f"{name}.{pname}"])


def test_wrap_train_mode_equal_with_same_seed(wrapped):
    _, original, model, x = wrapped
    a_model, b_model = copy.deepcopy(original).train(), copy.deepcopy(model).train()
    torch.manual_seed(1)
    a = _outputs(a_model(x))
    torch.manual_seed(1)
    b = _outputs(b_model(x))
    for u, v in zip(a, b, strict=True):
        assert (u - v).abs().max() <= 1e-5


def test_every_gate_gets_a_gradient(wrapped):
    _, _, model, x = wrapped
    model = copy.deepcopy(model).train()
    sum(y.square().mean() for y in _outputs(model(x))).backward()
    for name, module in pk.redundant_modules(model):
        assert module.gates.grad is not None, name
        assert torch.isfinite(module.gates.grad).all() and torch.all(module.gates.grad != 0), name


def test_masking_everything_still_runs(wrapped):
    _, original, model, x = wrapped
    model = copy.deepcopy(model).eval()
    for _, module in pk.redundant_modules(model):
        module.mask(range(len(module.branches)))
    with torch.no_grad():
        shapes = [y.shape for y in _outputs(model(x))]
        expected = [y.shape for y in _outputs(original.eval()(x))]
    assert shapes == expected


def test_granularity_monai_unet_descends_into_nested_levels():
    model, x = NETWORKS["monai_unet"]()
    names = [n for n, _ in pk.redundant_modules(pk.wrap(model, x))]
    # The nested SkipConnection levels map features to the same shape through resampling: never wrapped whole.
    assert not any(n.endswith("submodule") or n == "model.1" for n in names)
    assert all(n.split(".")[-1] in {"unit1", "1"} for n in names), names
    # the last up level holds the head: nothing of it is wrapped
    assert not any(n.startswith("model.2") for n in names)


def test_granularity_dynunet_skips_stem_heads_and_resampling():
    model, x = NETWORKS["dynunet"]()
    wrapped = pk.wrap(model, x)
    names = [n for n, _ in pk.redundant_modules(wrapped)]
    assert not any(n.startswith(("output_block", "deep_supervision_heads")) or "transp_conv" in n for n in names)
    assert not any(type(m).__name__ in {"InstanceNorm3d", "LeakyReLU"} for _, m in wrapped.named_children())
    for _, module in pk.redundant_modules(wrapped):
        assert any(isinstance(m, nn.Conv3d) for m in module.branches[0].modules())


def test_wrap_options_branches_exp_ratio_mode():
    model, x = NETWORKS["plain_conv_unet"]()
    pk.wrap(model, x, branches=4, exp_ratio=2.0, mode="sequential")
    for _, module in pk.redundant_modules(model):
        assert isinstance(module, SequentialRedundantModule)
        light = [b for b in module.branches if isinstance(b, LightBranch)]
        assert [b.kernel for b in light] == [(1, 1, 1), (1, 3, 3), (3, 1, 3), (3, 3, 1)]
        assert all(b.reduce.out_channels == 2 * module.channels for b in light)


def test_targets_by_name_type_and_predicate():
    model, x = NETWORKS["plain_conv_unet"]()
    found = pk.find_blocks(model, x)
    first = next(iter(found))
    by_name = pk.wrap(copy.deepcopy(model), x, targets=[first])
    assert [n for n, _ in pk.redundant_modules(by_name)] == [first]

    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

    by_type = pk.wrap(copy.deepcopy(model), x, targets=ConvDropoutNormReLU)
    assert len(pk.redundant_modules(by_type)) == len(found)

    by_pred = pk.wrap(copy.deepcopy(model), x, targets=lambda n, m: n.startswith("decoder") and n in found)
    assert all(n.startswith("decoder") for n, _ in pk.redundant_modules(by_pred))
    assert len(pk.redundant_modules(by_pred)) >= 1


def test_new_branches_follow_device_and_dtype():
    model, x = NETWORKS["basic_unet"]()
    model, x = model.double(), x.double()
    before = model.eval()(x)
    pk.wrap(model, x)
    for _, module in pk.redundant_modules(model):
        assert module.gates.dtype == torch.float64 and module.active.dtype == torch.bool
        assert all(p.dtype == torch.float64 for p in module.parameters())
    assert (model(x) - before).abs().max() <= 1e-10


def test_wrap_spec_rebuilds_on_fresh_base():
    model, x = NETWORKS["dynunet"]()
    fresh = copy.deepcopy(model)
    pk.wrap(model, x, branches=4)
    spec = pk.WrapSpec.from_dict(pk.wrap_spec(model).to_dict())
    from prunekit3d.wrap import apply_wrap_spec

    apply_wrap_spec(fresh, spec)
    assert fresh.state_dict().keys() == model.state_dict().keys()


# ---- bad input -------------------------------------------------------------------------------------


def test_2d_model_is_refused():
    from monai.networks.nets import UNet

    net = UNet(2, 1, 2, (8, 16), (2,), num_res_units=1)
    with pytest.raises(ValueError, match="3-D"):
        pk.wrap(net, torch.randn(1, 1, 16, 16, 16))


def test_non_5d_input_is_refused():
    model, _ = NETWORKS["dynunet"]()
    with pytest.raises(ValueError, match="5-D tensor"):
        pk.wrap(model, torch.randn(1, 32, 32, 32))


def test_model_without_block_is_refused():
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 1))
    with pytest.raises(ValueError, match="no shape-preserving block"):
        pk.wrap(model, torch.randn(1, 1, 8, 8, 8))


def test_missing_target_is_refused_with_hint():
    model, x = NETWORKS["plain_conv_unet"]()
    with pytest.raises(ValueError, match="does not have.*Did you mean"):
        pk.wrap(model, x, targets=["encoder.stages.0.0.convs.7"])


def test_non_shape_preserving_target_is_refused():
    model, x = NETWORKS["plain_conv_unet"]()
    with pytest.raises(ValueError, match="not a shape-preserving block"):
        pk.wrap(model, x, targets=["encoder.stages.1"])


def test_unknown_mode_is_refused():
    model, x = NETWORKS["plain_conv_unet"]()
    with pytest.raises(ValueError, match="mode"):
        pk.wrap(model, x, mode="diagonal")


def test_parallel_is_default():
    model, x = NETWORKS["plain_conv_unet"]()
    assert all(isinstance(m, ParallelRedundantModule) for _, m in pk.redundant_modules(pk.wrap(model, x)))
    assert first_output is not None
