"""``prunekit3d train`` under ``torchrun`` with 2 CPU processes (gloo): every rank takes the same decisions.

Each rank trains on its own patches; calibration errors and losses are all-reduced, so the prune plans,
the masks and (through DDP, rebuilt after every event) the weights must be identical on both ranks.
The worker script dumps each rank's view for the test; only rank 0 writes the run's own files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_train import synthetic_msd, tiny_config

WORKER = '''
import json, sys
from pathlib import Path
import torch
from rich.console import Console
from prunekit3d.prune import active_branches
from prunekit3d.recipes import Trainer, TrainConfig

class Dump(Trainer):
    def finish(self):
        result = super().finish()
        rank = self.runtime.rank
        view = {
            "world": self.runtime.world,
            "events": self.pruner.history,
            "params": [e["params"] for e in self.history["epochs"]],
            "active": active_branches(self.model),
            "weights": float(sum(p.double().sum() for p in self.model.parameters())),
            "ddp": type(self.net).__name__,
        }
        Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps(view))
        return result

Dump(TrainConfig.from_json(Path(sys.argv[1]).read_text()), console=Console(quiet=True)).run()
'''


def test_two_gloo_processes_take_identical_decisions(tmp_path):
    data = synthetic_msd(tmp_path / "Dataset")
    cfg = tiny_config(data, tmp_path / "run", epochs=8, fd=True, tolerance=1e9)
    (tmp_path / "config.json").write_text(cfg.to_json())
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "worker.py"), str(tmp_path / "config.json"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    views = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(v["world"] == 2 and v["ddp"] == "DistributedDataParallel" for v in views)
    assert views[0]["events"] == views[1]["events"]  # same plans: the errors were summed over both ranks
    assert any(e["kind"] == "prune" for e in views[0]["events"])
    assert views[0]["params"] == views[1]["params"] and views[0]["active"] == views[1]["active"]
    assert views[0]["weights"] == views[1]["weights"]  # DDP kept the replicas equal through every rebuild
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["world_size"] == 2 and history["events"] == views[0]["events"]
    assert (tmp_path / "run" / "model" / "manifest.json").is_file()


CALIBRATION_WORKER = '''
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
import prunekit3d as pk
from monai.networks.nets import DynUNet

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same network on both ranks
net = pk.wrap(DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16]).eval(),
              torch.zeros(1, 1, 16, 16, 16), branches=4)
for _, m in pk.redundant_modules(net):
    with torch.no_grad():
        m.gates[1:].uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
given = int(sys.argv[2].split(",")[rank])  # calibration batches this rank receives
batches = [torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(10 + i)) for i in range(given)]
try:
    view = {"plan": pk.calibrate(net, batches, step=1).to_dict()}
except ValueError as err:
    view = {"error": str(err)}
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(view))
dist.destroy_process_group()
'''


def _calibrate_on_two_ranks(tmp_path, given: str) -> list[dict]:
    (tmp_path / "worker.py").write_text(CALIBRATION_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "worker.py"), str(tmp_path), given]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_rank_without_calibration_batches_contributes_zeros_and_decides_with_the_others(tmp_path):
    views = _calibrate_on_two_ranks(tmp_path, "2,0")  # rank 1 receives none (it used to raise and hang rank 0)
    assert views[0]["plan"] == views[1]["plan"]
    assert views[0]["plan"]["batches"] == 2
    (tmp_path / "none").mkdir()
    views = _calibrate_on_two_ranks(tmp_path / "none", "0,0")  # nobody has data: both fail, in one line
    assert all("no batches" in v["error"] for v in views)
