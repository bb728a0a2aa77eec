"""Mixed precision and ``torch.compile``: wrapped, slim and channel-pruned networks keep working.

CPU bfloat16 autocast stands in for CUDA float16 here (``benchmarks/gpu.py`` runs the CUDA case): under
autocast a block may return another dtype than it was given, which the original branch's blend must take.
Compiled, a redundant module computes with its mask as data, so the compiled graph follows pruning events.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit3d as pk
from prunekit3d.redundant import ParallelRedundantModule, SequentialRedundantModule

from networks import basic_unet, dynunet, first_output


def _open_gates(model: nn.Module) -> nn.Module:
    """Light-branch gates away from 0, so that every branch changes the output."""
    for _, m in pk.redundant_modules(model):
        with torch.no_grad():
            m.gates[int(m.has_original):].fill_(0.3)
    return model


def _relative_error(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        reference = first_output(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = first_output(model(x))
    assert low.dtype == torch.bfloat16  # autocast really ran the network in bfloat16
    return float((low.float() - reference).abs().max() / reference.abs().max())


# BasicUNet's blocks return float32 from bfloat16 input under CPU autocast: the case that used to raise in lerp.
@pytest.mark.parametrize("factory", [basic_unet, dynunet], ids=["basic_unet", "dynunet"])
def test_wrapped_slim_and_channel_pruned_networks_run_under_bfloat16_autocast(factory):
    torch.manual_seed(0)
    net, x = factory()
    if factory is dynunet:  # bfloat16 3-D convolutions are slow on CPUs without bfloat16 units: a smaller input
        x = x[..., :16, :16, :16]
    wrapped = _open_gates(pk.wrap(net.eval(), x, branches=4))
    assert _relative_error(wrapped, x) < 0.05
    assert _relative_error(pk.slim(wrapped), x) < 0.05
    if factory is dynunet:
        pk.prune_channels(wrapped, x, ratio=0.25)
        assert _relative_error(wrapped, x) < 0.05
        assert _relative_error(pk.slim(wrapped), x) < 0.05


@pytest.mark.parametrize("cls", [ParallelRedundantModule, SequentialRedundantModule])
@pytest.mark.parametrize("out_activation", [False, True])
def test_the_mask_as_data_computes_what_the_mask_as_control_flow_does(cls, out_activation):
    torch.manual_seed(0)
    m = cls(8, branches=4, original=nn.Conv3d(8, 8, 3, padding=1), out_activation=out_activation).eval()
    with torch.no_grad():
        m.gates[1:].uniform_(-1, 1)
    x = torch.randn(1, 8, 6, 6, 6)
    for masked in ([], [0], [2, 4], [0, 1, 3], [0, 1, 2, 3, 4]):
        m.unmask(range(5))
        m.mask(masked)
        with torch.no_grad():
            assert torch.equal(m.compute_masked(x), m.compute(x)), masked


def test_compiled_networks_follow_pruning_events_and_slim_networks_compile():
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16, 16)
    base = DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16]).eval()
    net = _open_gates(pk.wrap(base, x, branches=4))
    compile = lambda model: torch.compile(model, backend="aot_eager")  # noqa: E731 (dynamo + AOTAutograd, no codegen)
    small = pk.slim(net)
    with torch.no_grad():
        before = net(x)
        torch.testing.assert_close(compile(net)(x), before)
        torch.testing.assert_close(compile(small)(x), small(x))
        pk.redundant_modules(net)[0][1].mask([1])  # a pruning event after compiling
        got = compile(net)(x)  # compiled first, before an eager forward has read the new mask
        after = net(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(got, after)  # not a graph of the old mask
