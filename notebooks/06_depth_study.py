# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Depth study: plain EP against intermediate signals
#
# The claim of Lin, Bal & Sengupta (arXiv 2508.15989): plain EP's learning signal fades with
# depth, and local error heads plus distillation (Eq. 6.1) restore it. `pyeqprop study depth`
# trains a shallow and a deep CRNN on the digits under EP, EP + local errors, EP +
# distillation, EP + both, BPTT (Eq. 5.4) and the backprop teacher (Eq. 7.3). This notebook
# shows the committed results of that command (`docs/results/depth/`), then re-runs a tiny
# version so CI checks the command still works.

# %%
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

import pyeqprop

CI = os.environ.get("PYEQPROP_NOTEBOOK_CI") == "1"  # set by tests/test_notebooks.py
results_dir = Path(pyeqprop.__file__).resolve().parents[1] / "docs" / "results"
committed = sorted(results_dir.glob("depth*/results.json")) if results_dir.exists() else []
print("committed results:", [str(p.parent.name) for p in committed] or "none (installed without the repository)")

# %% [markdown]
# ## The committed runs
# `docs/results/depth/`: the default study (student weight scale 1, all settings, 8 epochs);
# `docs/results/depth-ws2/`: the deep net again with student weight scale 2 (5 epochs, λ = 0.5);
# `docs/results/depth-ws2-kd/`: the same with every setting, λ = 0.1 and a teacher that trains
# (teacher weight scale 4) — where the intermediate signals stall the deep net (see README).
# Final training loss and test accuracy per setting, then the training-loss curves and the
# mean |gradient| of each conv layer's weights at initialisation (one batch).

# %%
def show(results):
    rows = results["rows"]
    for r in rows:
        print(f"{r['depth']:>8} {r['setting']:<34} train loss {r['train_loss']:.4f}  "
              f"test {100 * r['test_acc']:6.2f}%  {r['seconds']:6.0f}s")
    depths = list(results["layer_grads"])
    fig, axes = plt.subplots(2, len(depths), figsize=(5 * len(depths), 6.5), squeeze=False)
    for j, depth in enumerate(depths):
        for r in rows:
            if r["depth"] == depth and r["curve"]:
                axes[0][j].plot(range(1, len(r["curve"]) + 1), r["curve"], label=r["setting"])
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{depth}: training loss per epoch")
        axes[0][j].legend(fontsize=7)
        for name, mags in results["layer_grads"][depth].items():
            axes[1][j].plot(range(1, len(mags) + 1), mags, marker="o", label=name)
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("conv layer")
        axes[1][j].set_ylabel("mean |gradient| at init")
        axes[1][j].legend(fontsize=7)
    fig.tight_layout()
    plt.show()


for path in committed:
    print(f"--- {path.parent.name}")
    show(json.loads(path.read_text()))

# %% [markdown]
# ## A tiny re-run
# One epoch, few steps, three settings: enough to exercise the whole command (teacher, EP
# with and without local errors, BPTT, table, figures), not to reproduce the numbers above.
# The full run is `pyeqprop study depth --out study-depth` (about half an hour on 2 cores).

# %%
from pyeqprop.study.depth import run_depth_study
from pyeqprop.train.config import TrainConfig

out = Path(tempfile.mkdtemp(prefix="pyeqprop-nb06-"))
base = TrainConfig(epochs=1, teacher_epochs=1, T1=6, T2=3, progress="none")
depths = {"shallow": "c4m", "deep": "c4-c4m-c4-c4"} if CI else {"shallow": "c16m-c32m",
                                                                  "deep": "c8-c8-c16m-c16-c16-c32m-c32-c32"}
rows = run_depth_study(base, out=out, depths=depths, settings=("ep", "ep+local", "bptt"), log=lambda m: None)
show(json.loads((out / "results.json").read_text()))
