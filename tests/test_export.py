"""Deployable export: one output, deep supervision off on a copy, dynamic axes, ONNX Runtime parity, the
preprocessing record beside the model."""

from __future__ import annotations

import json

import pytest
import torch
from networks import _nnunet_kwargs, dynunet

from prunekit3d.export import (
    ATOL,
    RTOL,
    deployable,
    export_onnx,
    export_torchscript,
    onnx_parity,
    preprocessing_path,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.threads(2)


def _nnunet_with_deep_supervision() -> torch.nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 4, (8, 16, 32, 64), n_conv_per_stage=2, n_conv_per_stage_decoder=2,
                         deep_supervision=True, **_nnunet_kwargs())


def _full_resolution(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0]


def test_onnx_has_one_output_dynamic_axes_and_parity(tmp_path) -> None:
    net = _nnunet_with_deep_supervision().train()
    x = torch.randn(1, 1, 32, 32, 32)
    record = {"normalisation": "zscore", "spacing": [1.5, 1.5, 3.0]}
    path = export_onnx(net, x, tmp_path / "model.onnx", preprocessing=record)
    assert net.decoder.deep_supervision and net.training  # the caller's network is left alone
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["logits"] and [i.name for i in graph.input] == ["input"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 1 and all(isinstance(d, str) for i, d in enumerate(dims) if i != 1)  # all but channels
    assert json.loads(preprocessing_path(path).read_text()) == record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.preprocessing.json"]

    # Another batch and other spatial sizes (multiples of the network's stride 8) than the example's.
    reference = _nnunet_with_deep_supervision()
    reference.load_state_dict(net.state_dict())
    reference.decoder.deep_supervision = False
    inputs = [x, torch.randn(2, 1, 48, 32, 64)]
    assert onnx_parity(path, reference, inputs) <= 1e-3
    assert _full_resolution(net, inputs[1]).shape == (2, 3, 48, 32, 64)

    # The check can fail: a bias off by 0.01 is beyond ATOL + RTOL * |logit| for logits below 99.
    with torch.no_grad():
        reference.decoder.seg_layers[-1].bias.add_(0.01)
    with pytest.raises(RuntimeError, match="ONNX Runtime differs from the model"):
        onnx_parity(path, reference, inputs[:1])


def test_torchscript_one_output_at_other_sizes(tmp_path) -> None:
    from prunekit3d.models import psp_seg

    net = psp_seg("S", 1, 3, deep_supervision=True).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert isinstance(net(x), list)  # PSP-Seg returns every level while its flag is on
    loaded = torch.jit.load(str(export_torchscript(net, x, tmp_path / "model.pt")))
    assert net.decoder.deep_supervision
    other = torch.randn(2, 1, 48, 32, 64)
    with torch.no_grad():
        y = loaded(other)
        net.decoder.deep_supervision = False
        assert isinstance(y, torch.Tensor) and torch.allclose(y, net(other), rtol=RTOL, atol=ATOL)


def test_deployable_picks_the_full_resolution_head() -> None:
    from monai.networks.nets import DynUNet

    net = DynUNet(3, 1, 3, [3, 3, 3], [1, 2, 2], [2, 2], filters=[8, 16, 32], deep_supervision=True, deep_supr_num=1)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert net.train()(x).dim() == 6  # training mode stacks the heads
        single = deployable(net, x)
        assert single(x).shape == (1, 3, 16, 16, 16) and net.training and net.deep_supervision
        assert torch.equal(single(x), net.eval()(x))


def test_bad_preprocessing_record_writes_nothing(tmp_path) -> None:
    net, x = dynunet()
    with pytest.raises(ValueError, match="preprocessing record is not plain JSON"):
        export_onnx(net, x, tmp_path / "model.onnx", preprocessing={"classes": {1, 2}})
    with pytest.raises(TypeError, match="preprocessing must be a dict"):
        export_torchscript(net, x, tmp_path / "model.pt", preprocessing=["zscore"])
    assert not list(tmp_path.iterdir())
