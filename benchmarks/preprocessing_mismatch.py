"""Why the preprocessing record matters: the demo baseline fed as it was trained, and not.

The demo baseline (``prunekit3d.recipes.demo.baseline()``, a small MONAI DynUNet) was trained on the bundled
CT's training slab with a CT window of [-200, 300] HU scaled to [0, 1] (``demo.PREPROCESSING``). Calibration
and distillation in ``compress`` run the network on whatever preprocessing they are given; this measures
what the network itself does with each alternative, before any compression, on the evaluation slab it never
saw: Dice of its segmentation against the labels, and agreement Dice with its segmentation of correctly
preprocessed input (what a compressed student is trained to reproduce).

Usage::

    python benchmarks/preprocessing_mismatch.py [--out preprocessing_mismatch.json]

About 20 s of CPU time on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from prunekit3d.data import Preprocessing
from prunekit3d.evaluate import mean_dice, segmentation, sliding_window_logits
from prunekit3d.recipes.demo import PATCH, PREPROCESSING, baseline
from prunekit3d.sample.split import evaluation, heldout_split

#: The training preprocessing first, then what a user might feed instead.
SCHEMES = {
    PREPROCESSING: "as trained: CT window [-200, 300] HU scaled to [0, 1]",
    "none": "raw Hounsfield units",
    "zscore": "per-image z-score",
    "ct:-1000:1000": "CT window [-1000, 1000] HU scaled to [0, 1]",
    "ct:-160:240": "abdominal window [-160, 240] HU scaled to [0, 1]",
    "percentile:0.5:99.5": "0.5 / 99.5 percentile clip, then z-score",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("preprocessing_mismatch.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, origin = baseline()
    with tempfile.TemporaryDirectory() as tmp:
        split = heldout_split(tmp)
        slabs = {text: evaluation(split, Preprocessing.parse(text)) for text in SCHEMES}
    classes = {text: segmentation(sliding_window_logits(model, ev.scan, PATCH)[..., ev.scored])
               for text, ev in slabs.items()}
    label = slabs[PREPROCESSING].label
    rows = [
        {"preprocessing": text, "what": what, "dice_vs_labels": mean_dice(classes[text], label, 4),
         "agreement_with_trained": mean_dice(classes[text], classes[PREPROCESSING], 4)}
        for text, what in SCHEMES.items()
    ]
    table = Table(title=f"demo DynUNet ({origin}) on the evaluation slab, by input preprocessing")
    for column in ("--preprocessing", "what", "Dice vs labels", "agreement with as-trained"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["preprocessing"], r["what"], f"{r['dice_vs_labels']:.3f}", f"{r['agreement_with_trained']:.3f}")
    Console(width=120).print(table)
    args.out.write_text(json.dumps({"model": origin, "patch": list(PATCH), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
