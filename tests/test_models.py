"""PSP-Seg reference networks and the model registry."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import prunekit3d as pk
from prunekit3d.models import VARIANTS, PSPSeg, PSPSegConfig, create_model, list_models, psp_seg
from prunekit3d.redundant import ParallelRedundantModule, SequentialRedundantModule

#: Parameters at start (1 in, 3 out, deep supervision), from the paper's table of reference networks.
PAPER_PARAMS = {"S": 5.37e6, "B": 13.2e6, "L": 33.1e6}


@pytest.fixture(scope="module")
def built() -> dict[str, PSPSeg]:
    torch.manual_seed(0)
    return {v: psp_seg(v, in_channels=1, out_channels=3, deep_supervision=True) for v in "SBL"}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", ["S", "B", "L"])
def test_parameter_counts_match_the_paper_within_2_percent(built: dict[str, PSPSeg], variant: str) -> None:
    n = _n_params(built[variant])
    assert abs(n - PAPER_PARAMS[variant]) / PAPER_PARAMS[variant] < 0.02, (variant, n)


@pytest.mark.parametrize("variant", ["S", "B", "L"])
def test_variant_structure(built: dict[str, PSPSeg], variant: str) -> None:
    model, config = built[variant], VARIANTS[variant]
    stages = len(config.widths)
    modules = pk.redundant_modules(model)
    # Encoder and decoder levels 1 .. n-2 plus the bottleneck, one module each.
    assert len(modules) == 2 * (stages - 2) + 1
    for _, m in modules:
        assert isinstance(m, ParallelRedundantModule)
        assert m.out_activation and not m.has_original
        assert len(m.branches) == config.branches and m.exp_ratio == config.exp_ratio
        assert torch.all(m.gates == 0)
    assert len(model.encoder_stages) == stages - 1
    assert model.bottleneck[0].channels == config.widths[-1]
    assert model.half_res_decoder_stage[0].channels == config.widths[1]


def test_forward_shapes_with_deep_supervision_full_resolution_first(built: dict[str, PSPSeg]) -> None:
    model = built["S"].train()
    out = model(torch.randn(2, 1, 32, 32, 32))
    assert isinstance(out, list)
    assert [tuple(y.shape) for y in out] == [(2, 3, s, s, s) for s in (32, 16, 8, 4)]
    model.eval()  # nnU-Net's validation step indexes output[0] in eval mode: still a list
    with torch.no_grad():
        assert [tuple(y.shape) for y in model(torch.randn(1, 1, 32, 32, 32))][0] == (1, 3, 32, 32, 32)


def test_forward_without_deep_supervision_returns_one_tensor() -> None:
    model = psp_seg("S", in_channels=2, out_channels=4, deep_supervision=False)
    out = model(torch.randn(1, 2, 32, 32, 48))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 32, 32, 48)
    assert len(model.decoder.heads) == 1
    with pytest.raises(ValueError, match="built without deep-supervision heads"):
        model.decoder.deep_supervision = True


def test_deep_supervision_switch_matches_full_resolution_output() -> None:
    torch.manual_seed(0)
    model = psp_seg("S", in_channels=1, out_channels=3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        full = model(x)[0]
        model.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
        single = model(x)
    assert isinstance(single, torch.Tensor) and torch.equal(full, single)


def test_large_variant_runs_six_stages(built: dict[str, PSPSeg]) -> None:
    model = built["L"].eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 32, 32))
    assert [tuple(y.shape) for y in out] == [(1, 3, 64 // f, 32 // f, 32 // f) for f in (1, 2, 4, 8, 16)]


def test_every_gate_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = psp_seg("S", in_channels=1, out_channels=3).train()
    target = torch.randint(0, 3, (1, 32, 32, 32))
    out = model(torch.randn(1, 1, 32, 32, 32))
    loss = sum(F.cross_entropy(y, F.interpolate(target[:, None].float(), y.shape[2:]).long()[:, 0]) for y in out)
    loss.backward()
    for name, m in pk.redundant_modules(model):
        assert m.gates.grad is not None, name
        assert torch.all(m.gates.grad != 0), (name, m.gates.grad)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_masking_every_branch_still_runs(mode: str) -> None:
    model = psp_seg("S", in_channels=1, out_channels=3, mode=mode)
    modules = pk.redundant_modules(model)
    expected = {"parallel": ParallelRedundantModule, "sequential": SequentialRedundantModule}[mode]
    assert all(type(m) is expected for _, m in modules)
    for _, m in modules:
        m.mask(range(len(m.branches)))
    out = model(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(y.shape) for y in out] == [(1, 3, s, s, s) for s in (32, 16, 8, 4)]
    assert all(torch.isfinite(y).all() for y in out)
    # A masked module is the identity: the encoder features pass through it unchanged.
    x = torch.randn(1, 32, 8, 8, 8)
    assert torch.equal(model.encoder_stages[1](x), x)


def test_encoder_returns_stage_and_bottleneck_features(built: dict[str, PSPSeg]) -> None:
    model = built["S"].eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 1, 32, 32, 32))
    widths = VARIANTS["S"].widths
    assert [tuple(f.shape[1:]) for f in features] == [(w, 32 >> i, 32 >> i, 32 >> i) for i, w in enumerate(widths)]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 1, 32, 32, 30), "divisible by 16"),
        ((1, 1, 16, 16, 16), "single voxel at the bottleneck"),
        ((1, 2, 32, 32, 32), r"expects a tensor \(batch, 1, D, H, W\)"),
        ((1, 32, 32, 32), r"expects a tensor \(batch, 1, D, H, W\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(built: dict[str, PSPSeg], shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        built["S"](torch.zeros(shape))


def test_large_variant_needs_multiples_of_32(built: dict[str, PSPSeg]) -> None:
    with pytest.raises(ValueError, match=r"divisible by 32 .* e\.g\. to \(64, 32, 32\)"):
        built["L"](torch.zeros(1, 1, 48, 32, 32))


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown PSP-Seg variant 'XL'"):
        psp_seg("XL", 1, 3)
    with pytest.raises(ValueError, match="unknown mode 'serial'"):
        psp_seg("S", 1, 3, mode="serial")
    with pytest.raises(ValueError, match="widths must be"):
        PSPSegConfig(widths=(16,), exp_ratio=0.5, branches=4)


def test_registry_builds_every_variant_and_rebuilds_from_spec(built: dict[str, PSPSeg]) -> None:
    assert list_models() == ["nnunet_network", "psp_seg_b", "psp_seg_l", "psp_seg_s"]
    model = create_model("psp_seg_s", in_channels=1, out_channels=3)
    assert _n_params(model) == _n_params(built["S"])
    spec = json.loads(json.dumps(built["L"].spec))
    rebuilt = create_model(**spec)
    assert rebuilt.config == VARIANTS["L"] and _n_params(rebuilt) == _n_params(built["L"])
    assert psp_seg("b", 1, 3).config == VARIANTS["B"]  # variant names are case-insensitive
    with pytest.raises(ValueError, match="did you mean 'psp_seg_s'"):
        create_model("psp_seg_z", in_channels=1, out_channels=3)


def test_config_round_trips_through_json() -> None:
    for config in VARIANTS.values():
        assert PSPSegConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    custom = PSPSegConfig(widths=(8, 16, 32), exp_ratio=1.0, branches=1, blocks=2)
    model = PSPSeg(custom, in_channels=1, out_channels=2, deep_supervision=False)
    assert len(model.encoder_stages[1]) == 2
    assert model(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
