import copy
import pickle

import pytest
import torch
from torch import nn

from prunekit3d.redundant import (
    KERNEL_FAMILIES,
    LightBranch,
    ParallelRedundantModule,
    SequentialRedundantModule,
    kernel_family,
)


def test_kernel_families_match_the_method():
    assert len(KERNEL_FAMILIES[7]) == 7 and len(KERNEL_FAMILIES[4]) == 4 and KERNEL_FAMILIES[1] == ((1, 1, 1),)
    assert set(KERNEL_FAMILIES[4]) <= set(KERNEL_FAMILIES[7]) | {(1, 3, 3), (3, 1, 3), (3, 3, 1)}
    with pytest.raises(ValueError, match="kernel family"):
        kernel_family(5)
    with pytest.raises(ValueError, match="odd"):
        kernel_family([(2, 1, 1)])


def test_light_branch_layout_and_shape():
    b = LightBranch(16, 8, (1, 3, 3))
    assert b.reduce.kernel_size == (1, 1, 1) and b.reduce.out_channels == 8
    assert b.conv.kernel_size == (1, 3, 3) and b.conv.out_channels == 16
    assert b(torch.randn(2, 16, 4, 5, 6)).shape == (2, 16, 4, 5, 6)


@pytest.mark.parametrize("cls", [ParallelRedundantModule, SequentialRedundantModule])
def test_gates_start_at_zero_and_module_is_residual_identity(cls):
    m = cls(8, branches=4, exp_ratio=0.5).eval()
    assert m.gates.shape == (4,) and torch.all(m.gates == 0)
    assert m.active.dtype == torch.bool and m.active.all()
    x = torch.randn(1, 8, 6, 6, 6)
    assert torch.equal(m(x), x)  # zero gates: only the residual path


@pytest.mark.parametrize("cls", [ParallelRedundantModule, SequentialRedundantModule])
def test_original_branch_is_exact_at_start(cls):
    block = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.InstanceNorm3d(8), nn.ReLU())
    m = cls(8, branches=7, original=block).eval()
    assert m.gates[0] == 1 and torch.all(m.gates[1:] == 0)
    x = torch.randn(1, 8, 6, 6, 6)
    assert torch.equal(m(x), block(x))


def test_parallel_forward_matches_branch_by_branch_definition():
    m = ParallelRedundantModule(8, branches=7, exp_ratio=2.0, out_activation=True).eval()
    with torch.no_grad():
        m.gates.copy_(torch.randn(7))
    m.mask([2, 5])
    x = torch.randn(2, 8, 5, 6, 7)
    expected = x + sum(m.gates[k] * m.branches[k](x) for k in m.active_indices())
    torch.testing.assert_close(m(x), nn.functional.leaky_relu(expected, 0.01), atol=1e-5, rtol=1e-5)
    z = x + sum(m.contributions(x).values())
    torch.testing.assert_close(m.finish(z), m(x), atol=1e-5, rtol=1e-5)


def test_sequential_forward_chains_branches():
    m = SequentialRedundantModule(4, branches=4, exp_ratio=1.0).eval()
    with torch.no_grad():
        m.gates.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1]))
    x = torch.randn(1, 4, 5, 5, 5)
    z = x
    for k in range(4):
        z = z + m.gates[k] * m.branches[k](z)
    torch.testing.assert_close(m(x), z)
    torch.testing.assert_close(x + sum(m.contributions(x).values()), z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [ParallelRedundantModule, SequentialRedundantModule])
def test_mask_unmask_and_identity_when_all_masked(cls):
    m = cls(4, branches=4, out_activation=True).eval()
    with torch.no_grad():
        m.gates.fill_(1.0)
    x = torch.randn(1, 4, 4, 4, 4)
    full = m(x)
    m.mask([0, 1, 2, 3])
    assert m.active_indices() == [] and torch.equal(m(x), x)
    m.unmask([0, 1, 2, 3])
    assert torch.equal(m(x), full)
    with pytest.raises(IndexError, match="out of range"):
        m.mask([4])


def test_masked_branch_gets_no_gradient_active_ones_do():
    m = ParallelRedundantModule(4, branches=4)
    m.mask([1])
    m(torch.randn(1, 4, 4, 4, 4)).square().sum().backward()
    g = m.gates.grad
    assert g[1] == 0 and torch.all(g[[0, 2, 3]] != 0)
    assert m.branches[1].reduce.weight.grad is None


# ---- the mask is read without a host sync per forward ------------------------------------------------------
class _Reads(torch.overrides.TorchFunctionMode):
    """Counts ``tolist`` calls: each is a device-to-host copy (a sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.Tensor.tolist
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", [ParallelRedundantModule, SequentialRedundantModule])
def test_the_mask_is_read_once_until_it_changes(cls):
    m = cls(8, branches=4, original=nn.Conv3d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        m(x)
        with _Reads() as counter:
            for _ in range(3):
                m(x)
        assert counter.reads == 0
        m.mask([1])
        with _Reads() as counter:
            m(x)
            m(x)
        assert counter.reads == 1


def test_a_copy_reads_its_own_mask():
    """A deep copy restarts the buffer's version counter: a copied cache must not pass for the copy's mask."""
    m = ParallelRedundantModule(8, branches=4, original=nn.Conv3d(8, 8, 3, padding=1))
    m.mask([4])
    assert m.active_indices() == [0, 1, 2, 3]  # cached at the buffer's version after one write
    m.mask([3])  # a second write; the cache is now stale until read again
    assert copy.deepcopy(m).active_indices() == [0, 1, 2]
    assert pickle.loads(pickle.dumps(m)).active_indices() == [0, 1, 2]
    assert m.active_indices() == [0, 1, 2]


def test_every_way_of_changing_the_mask_is_seen():
    m = ParallelRedundantModule(8, branches=4, original=nn.Conv3d(8, 8, 3, padding=1)).eval()
    assert m.active_indices() == [0, 1, 2, 3, 4]
    m.active[0] = False  # an in-place write into the buffer
    assert m.active_indices() == [1, 2, 3, 4]
    m.active.copy_(torch.tensor([True, False, True, False, True]))
    assert m.active_indices() == [0, 2, 4]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.unmask([1, 3])
    assert m.active_indices() == [0, 1, 2, 3, 4]
    m.load_state_dict(state)
    assert m.active_indices() == [0, 2, 4]
    m.active = torch.ones(5, dtype=torch.bool)  # a new buffer object
    assert m.active_indices() == [0, 1, 2, 3, 4]
    m.to(torch.float64)
    m.active[4] = False
    assert m.active_indices() == [0, 1, 2, 3]
    x = torch.randn(1, 8, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        m.gates.fill_(0.5)  # every branch changes the output
        reference = m.compute(x)
        m.active[3] = False
        assert not torch.equal(m(x), reference)  # the forward follows the write too
    with torch.inference_mode():
        fresh = ParallelRedundantModule(8, branches=4)  # inference tensors keep no version counter
        fresh.active[0] = False
        assert fresh.active_indices() == [1, 2, 3]
