"""CPU inference through oneDNN: same function, same parameters, plain convs wherever it must."""

from __future__ import annotations

import copy

import pytest
import torch
from networks import NETWORKS, first_output
from torch import nn

import prunekit3d as pk
from prunekit3d.models import psp_seg
from prunekit3d.runtime import OneDNNConv3d

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")


def _slim_psp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = psp_seg("S", 1, 3).eval()
    for i, (_, m) in enumerate(pk.redundant_modules(model)):
        m.mask([k for k in range(len(m.branches)) if k % 2 == i % 2])
    return pk.slim(model).eval(), torch.randn(1, 1, 32, 32, 32)


@pytest.mark.parametrize("name", ["dynunet", "plain_conv_unet", "slim_psp_seg_s"])
def test_outputs_and_state_stay(name: str, monkeypatch) -> None:
    calls = []
    real = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or real(*a))
    model, x = _slim_psp() if name == "slim_psp_seg_s" else NETWORKS[name]()
    model.eval()
    reference = copy.deepcopy(model)
    fast = pk.use_onednn(model)
    assert fast is model
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is OneDNNConv3d for m in convs)
    assert fast.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        diff = (first_output(fast(x)) - first_output(reference(x))).abs().max()
    assert float(diff) <= 1e-4 and calls  # the convolutions ran on oneDNN
    copy.deepcopy(fast)  # still copyable (and so savable)


def test_training_and_tracing_take_the_plain_path() -> None:
    model, x = NETWORKS["dynunet"]()
    reference = copy.deepcopy(model)
    pk.use_onednn(model)
    # With autograd on, the forward is nn.Conv3d's own: outputs and gradients are bit-identical.
    y, r = first_output(model(x)), first_output(reference(x))
    assert torch.equal(y, r)
    y.square().mean().backward()
    r.square().mean().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters()))
    model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    assert "mkldnn_convolution" not in str(traced.inlined_graph)


def test_onnx_export_sees_plain_convolutions(tmp_path) -> None:
    model, x = _slim_psp()
    pk.use_onednn(model)
    path = tmp_path / "model.onnx"
    pk.export_onnx(model, x, path)
    assert pk.check_onnx(path, model, x) <= 1e-4
