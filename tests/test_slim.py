"""Physical slimming: exact outputs, fewer parameters, plain modules, export, structure from masks."""

from __future__ import annotations

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from networks import NETWORKS
from torch import nn

from prunekit3d import redundant_modules, wrap
from prunekit3d.export import check_onnx, export_onnx, export_torchscript
from prunekit3d.models import psp_seg
from prunekit3d.prune import active_branches
from prunekit3d.redundant import LightBranch, ParallelRedundantModule, RedundantModule
from prunekit3d.slim import GatedBlock, SlimParallel, set_active_branches, slim, slim_module
from prunekit3d.wrap import apply_wrap_spec, wrap_spec

# Patterns cycled over a model's redundant modules (indices into ``branches``; 0 is the original
# when the module has one): fully masked, original only, one light branch, several light branches
# (+ original), everything active.
PATTERNS_WRAPPED = [[], [0], [2], [0, 1, 3], [1, 2, 4], None]
PATTERNS_PSP = [[], [1], [0, 2, 3], None]


pytestmark = pytest.mark.threads(1)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mask_mix(model: nn.Module, patterns: list) -> None:
    """Give every gate a random value (so folding is exercised) and mask a mix of branches."""
    gen = torch.Generator().manual_seed(1)
    for i, (_, m) in enumerate(redundant_modules(model)):
        with torch.no_grad():
            m.gates.copy_(0.5 * torch.randn(len(m.branches), generator=gen))
        keep = patterns[i % len(patterns)]
        if keep is not None:
            m.mask([k for k in range(len(m.branches)) if k not in keep])


def _wrapped(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name == "psp_seg_s":
        model, x = psp_seg("S", 1, 3), torch.randn(1, 1, 32, 32, 16)
        _mask_mix(model, PATTERNS_PSP)
    else:
        model, x = NETWORKS[name]()
        if name != "basic_unet":  # its five levels need 32^3; the others run on 16^3 to keep the file fast
            x = x[..., :16, :16, :16].contiguous()
        wrap(model, x, branches=4)
        _mask_mix(model, PATTERNS_WRAPPED)
    return model.eval(), x


def _max_diff(a: object, b: object) -> float:
    pa = a if isinstance(a, (list, tuple)) else [a]
    pb = b if isinstance(b, (list, tuple)) else [b]
    assert len(pa) == len(pb)
    return max(float((p - q).abs().max()) for p, q in zip(pa, pb))


@pytest.mark.parametrize(
    "name",
    ["dynunet", "monai_unet", "segresnet", "basic_unet", "plain_conv_unet", "residual_encoder_unet", "psp_seg_s"],
)
def test_slim_matches_masked_model(name: str) -> None:
    model, x = _wrapped(name)
    with torch.no_grad():
        expected = model(x)
        small = slim(model)
        got = small(x)
    assert _max_diff(got, expected) <= 1e-5
    assert _params(small) < _params(model)
    assert not any(isinstance(m, RedundantModule) for m in small.modules())
    assert not [k for k in small.state_dict() if k.endswith((".active", ".restorable", ".gates"))]
    assert redundant_modules(model), "slim must leave the input model untouched unless inplace=True"
    # Every pattern occurred, so every kind of slim block was built.
    kinds = {type(m) for m in small.modules()}
    assert {nn.Identity, SlimParallel} <= kinds
    if name != "psp_seg_s":
        assert GatedBlock in kinds
    traced = torch.jit.trace(small, x, check_trace=False)
    with torch.no_grad():
        assert _max_diff(traced(x), got) <= 1e-5


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_slim_in_train_mode(mode: str) -> None:
    model, x = psp_seg("S", 1, 3, mode=mode), torch.randn(1, 1, 32, 32, 16)
    _mask_mix(model, PATTERNS_PSP)
    small = slim(model.train())
    assert small.training
    # A sequential step multiplies its gate after the norm, slim folds it into the norm: equal up to
    # float rounding, so the tolerance scales with the outputs.
    for got, expected in zip(small(x), model(x)):
        assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
    grads = []
    for net in (model, small):  # in-place accumulation must leave autograd intact
        x.grad = None
        sum(y.square().mean() for y in net(x.requires_grad_())).backward()
        grads.append(x.grad.clone())
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-5 * float(grads[0].abs().max())
    assert all(p.grad is not None for p in small.parameters())


def test_one_branch_costs_no_more_than_the_branch() -> None:
    x = torch.randn(1, 16, 8, 8, 8)
    m = ParallelRedundantModule(16, branches=4, exp_ratio=0.5, out_activation=False).eval()
    m.mask([0, 1, 3])
    block = slim_module(m)
    branch = m.branches[2]
    assert isinstance(branch, LightBranch) and isinstance(block, SlimParallel)
    flops = FlopCountAnalysis(block, x).unsupported_ops_warnings(False).total()
    assert flops == FlopCountAnalysis(branch, x).unsupported_ops_warnings(False).total() > 0
    assert _params(block) <= _params(branch)
    with torch.no_grad():
        assert torch.allclose(block(x), m(x), atol=1e-5)


def test_several_branches_share_one_reduction() -> None:
    m = ParallelRedundantModule(8, branches=7, exp_ratio=2.0, out_activation=True).eval()
    m.mask([0, 3, 5])
    block = slim_module(m)
    assert isinstance(block, SlimParallel)
    assert block.reduce.out_channels == 4 * 16 and len(block.convs) == 4
    assert [c.kernel_size for c in block.convs] == [(1, 1, 3), (1, 3, 1), (1, 3, 3), (3, 3, 1)]


def test_original_only_keeps_lerp_whatever_the_gate() -> None:
    original = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.InstanceNorm3d(4))
    m = ParallelRedundantModule(4, branches=1, original=original).eval()
    m.mask([1])
    x = torch.randn(1, 4, 6, 6, 6)
    for gate in (1.0, 0.3):
        with torch.no_grad():
            m.gates[0] = gate
        block = slim_module(m)
        assert isinstance(block, GatedBlock) and block.block is original  # structure ignores the gate
        with torch.no_grad():
            assert torch.equal(block(x), m(x))


@pytest.mark.parametrize("name", ["dynunet", "psp_seg_s"])
def test_structure_depends_on_masks_only(name: str) -> None:
    model, x = _wrapped(name)
    small = slim(model)
    active = active_branches(model)
    torch.manual_seed(123)  # different weights, same architecture
    if name == "psp_seg_s":
        fresh = psp_seg("S", 1, 3)
    else:
        fresh = apply_wrap_spec(NETWORKS[name]()[0], wrap_spec(model))
    rebuilt = slim(set_active_branches(fresh, active))
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert _max_diff(rebuilt.eval()(x), small(x)) == 0.0


def test_set_active_branches_rejects_other_models() -> None:
    model, _ = _wrapped("psp_seg_s")
    active = active_branches(model)
    active["no.such.module"] = [0]
    with pytest.raises(ValueError, match="unknown"):
        set_active_branches(model, active)


def test_slim_refuses_a_plain_model() -> None:
    with pytest.raises(ValueError, match="no redundant module"):
        slim(nn.Sequential(nn.Conv3d(1, 1, 1)))


def test_slim_keeps_hooks_and_their_owners_remove_them() -> None:
    from prunekit3d.fd import FDLoss

    model, x = _wrapped("psp_seg_s")
    calls: list[str] = []

    def user_hook(module: nn.Module, args: tuple, out: object) -> None:
        calls.append("user")

    def kit_hook(module: nn.Module, args: tuple, out: object) -> None:
        calls.append("kit")

    kit_hook.__module__ = "prunekit3d.fd"  # slim does not judge a hook by the name of its function's module
    model.encoder.stem.register_forward_hook(user_hook)
    model.encoder.stem.register_forward_hook(kit_hook)
    fd = FDLoss(model, x, mask_value=0.0)
    hooked = {m for m in model.modules() if m._forward_hooks}
    fd.close()  # the owner removes its own hooks
    assert {m for m in model.modules() if m._forward_hooks} == {model.encoder.stem} < hooked
    small = slim(model, inplace=True)
    assert small is model and not redundant_modules(model)
    calls.clear()  # FDLoss's feature search ran a forward too
    with torch.no_grad():
        small(x)
    assert calls == ["user", "kit"]


def test_export_onnx_and_torchscript(tmp_path) -> None:
    model, x = _wrapped("dynunet")  # holds every kind of slim block, lerp included
    small = slim(model)
    path = export_onnx(small, x, tmp_path / "model.onnx")
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp or side files
    assert check_onnx(path, small, x) <= 1e-4
    ts = export_torchscript(small, x, tmp_path / "model.pt")
    loaded = torch.jit.load(str(ts))
    with torch.no_grad():
        assert _max_diff(loaded(x), small(x)) <= 1e-5
