"""Measurement (prunekit3d.report) and the `prunekit3d report` command, on small real networks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from monai.networks.nets import DynUNet
from rich.console import Console

import prunekit3d as pk
from prunekit3d.cli import main
from prunekit3d.report import FLOPS_UNIT, ModelReport, comparison_table, count_flops, measure, paired_latency

KWARGS = dict(spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2],
              upsample_kernel_size=[2, 2], filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1)


pytestmark = pytest.mark.threads(2)


def _net() -> DynUNet:
    return DynUNet(**KWARGS)


def test_measure_counts_and_times_a_network() -> None:
    net = _net()
    x = torch.zeros(1, 1, 16, 16, 16)
    report = measure(net, (1, 1, 16, 16, 16), repeats=2, warmup=1)
    assert report.params == sum(p.numel() for p in net.parameters())
    fv = FlopCountAnalysis(net.eval(), x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert report.flops == int(fv.total()) > 0
    assert report.latency_ms > 0 and report.train_step_ms > 0
    assert report.input_size == [1, 1, 16, 16, 16] and report.device == "cpu"
    # Inference allocates at least its output; a training step at least the gradients and SGD's momentum.
    out_mib = 3 * 16**3 * 4 / 2**20
    params_mib = report.params * 4 / 2**20
    assert report.peak_memory_inference_mb >= out_mib
    assert report.peak_memory_train_step_mb >= 2 * params_mib
    assert report.peak_memory_train_step_mb > report.peak_memory_inference_mb
    assert "profiler" in report.memory_method


@pytest.mark.parametrize(
    ("conv", "shape", "macs"),
    [
        # out voxels x C_out x C_in / groups x kernel volume, counted by hand
        (torch.nn.Conv3d(2, 4, 3, padding=1), (1, 2, 8, 8, 8), 8**3 * 4 * 2 * 27),
        (torch.nn.Conv3d(3, 5, (3, 1, 3), stride=2), (2, 3, 9, 8, 7), 2 * (4 * 4 * 3) * 5 * 3 * 9),
        (torch.nn.Conv3d(4, 4, 3, padding=1, groups=4, bias=False), (1, 4, 6, 6, 6), 6**3 * 4 * 1 * 27),
        (torch.nn.ConvTranspose3d(4, 2, 2, stride=2), (1, 4, 4, 4, 4), 4**3 * 4 * 2 * 8),
    ],
)
def test_flops_are_multiply_adds_counted_by_hand(conv, shape, macs) -> None:
    count = count_flops(conv, torch.zeros(shape))
    assert count == macs and isinstance(count, int)
    assert count.by_module[""] == macs
    report = measure(conv, shape, repeats=1, warmup=0, train_step=False)
    assert report.flops == macs
    text = Console(record=True, width=120)
    text.print(report)
    assert FLOPS_UNIT in text.export_text() and "multiply-adds" in FLOPS_UNIT


def test_one_flop_counter_everywhere() -> None:
    from prunekit3d import channels
    from prunekit3d.channels import count_flops as torch_flops  # the name the recipes import

    assert torch_flops is channels.count_flops is count_flops
    net, x = _net(), torch.zeros(1, 1, 16, 16, 16)
    count = count_flops(net, x)
    total, unsupported = count  # the former (total, unsupported) return still unpacks
    assert total == count[0] == int(count) and unsupported == count[1] == count.unsupported
    assert count.by_module[""] == int(count) > count.by_module["input_block"] > 0
    assert copy.deepcopy(count).by_module == count.by_module


def test_peak_memory_grows_with_the_input() -> None:
    net = _net()
    small = measure(net, (1, 1, 16, 16, 16), repeats=1, warmup=0, train_step=False)
    large = measure(net, (1, 1, 32, 32, 32), repeats=1, warmup=0, train_step=False)
    # 8x the voxels: activations dominate, so the peak grows by far more than 3x.
    assert large.peak_memory_inference_mb > 3 * small.peak_memory_inference_mb
    assert large.flops > 6 * small.flops
    assert small.train_step_ms is None and small.peak_memory_train_step_mb is None


def test_measure_leaves_the_model_as_it_was() -> None:
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    measure(net, (1, 1, 16, 16, 16), repeats=1, warmup=0)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    copy.deepcopy(net)  # DynUNet keeps its deep-supervision outputs as attributes: none may hold a graph


def test_report_round_trips_and_prints() -> None:
    report = measure(_net(), (1, 1, 16, 16, 16), repeats=1, warmup=0)
    again = ModelReport.from_json(report.to_json())
    assert again == report
    with pytest.raises(ValueError, match="unknown model report keys"):
        ModelReport.from_dict({**report.to_dict(), "speed": 1})
    console = Console(record=True, width=150)
    console.print(report)
    console.print(comparison_table(report, report))
    text = console.export_text()
    assert "parameters" in text and f"{report.params:,}" in text and "1.00" in text


def test_measure_refuses_a_bad_size() -> None:
    with pytest.raises(ValueError, match="5 positive numbers"):
        measure(_net(), (1, 16, 16, 16))


def test_paired_latency_times_each_model_in_alternation() -> None:
    small = torch.nn.Conv3d(1, 2, 1)
    large = torch.nn.Sequential(*[torch.nn.Conv3d(1, 1, 3, padding=1) for _ in range(8)])
    large.train()
    calls: list[str] = []
    small.register_forward_hook(lambda *_: calls.append("small"))
    large.register_forward_hook(lambda *_: calls.append("large"))
    fast, slow = paired_latency([small, large], (1, 1, 24, 24, 24), warmup=1, repeats=3)
    assert calls == ["small", "large"] * 4  # one call of each per round, warm-up included
    assert 0 < fast < slow and large.training  # the mode is restored
    with pytest.raises(ValueError, match="repeats"):
        paired_latency([small], (1, 1, 8, 8, 8), repeats=0)


def test_report_command_on_an_artifact_and_a_state_dict(tmp_path, capsys) -> None:
    net = _net()
    x = torch.randn(1, 1, 16, 16, 16)
    wrapped = pk.wrap(net, x, branches=1)
    spec = {"import_path": "monai.networks.nets.DynUNet", "kwargs": KWARGS}
    pk.save(wrapped, tmp_path / "artifact", spec=spec)
    out = tmp_path / "r.json"
    assert main(["report", str(tmp_path / "artifact"), "--input-size", "1", "1", "16", "16", "16",
                 "--json", str(out), "--repeats", "1"]) == 0
    saved = ModelReport.from_json(out.read_text())
    assert saved.params == sum(p.numel() for p in pk.load(tmp_path / "artifact").parameters())
    assert "peak memory" in capsys.readouterr().out

    plain = _net()
    torch.save(plain.state_dict(), tmp_path / "w.pt")
    out2 = tmp_path / "r2.json"
    assert main(["report", str(tmp_path / "w.pt"), "--model", "monai.networks.nets.DynUNet",
                 "--model-kwargs", json.dumps(KWARGS), "--input-size", "1", "1", "16", "16", "16",
                 "--json", str(out2), "--repeats", "1", "--no-train-step"]) == 0
    data = json.loads(out2.read_text())
    assert data["params"] == sum(p.numel() for p in plain.parameters()) and data["train_step_ms"] is None


def test_report_command_names_a_missing_target(tmp_path, capsys) -> None:
    code = main(["report", str(tmp_path / "nope.pt"), "--input-size", "1", "1", "16", "16", "16"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "does not exist" in err and len(err.splitlines()) == 1
