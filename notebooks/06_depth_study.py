# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
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
# shows the committed results of that command (`docs/results/`), then re-runs a tiny
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
# `docs/results/depth/`: `pyeqprop study depth --jobs 2` with its defaults (student weight
# scale 2, teacher weight scale 4, 8 epochs, seeds 0, 1, 2, T2 = 10, λ = 0.1, γ = 1, heads and
# maps starting at zero, Eq. 6.7); `depth-T2-10/`, `depth-T2-4/` and `depth-T2-2/`: EP
# against EP + local errors on the deep net over five seeds, at the default T2 and with a
# nudged phase shorter than the depth; `depth-kd01/`: distillation at γ = 0.1. For each: the mean ± sample std over the seeds of the final training loss and
# test accuracy per setting, plain EP against BPTT per conv layer at initialisation, then the
# training-loss curves (one line per seed) and the mean |gradient| of each conv layer's
# weights over the first epoch. `docs/results/README.md` lists the commands.

# %%
def show(results):
    for r in results["summary"]:
        print(f"{r['depth']:>8} {r['setting']:<34} train loss {r['train_loss']:.3f} ± {r['train_loss_std']:.3f}  "
              f"test {100 * r['test_acc']:5.1f} ± {100 * r['test_acc_std']:4.1f}%  "
              f"({r['seeds']} seeds, {r['seconds']:.0f} s per run)")
    for depth, agree in results["ep_vs_bptt_at_init"].items():
        print(f"{depth:>8} plain EP vs BPTT at init, per conv layer: cosine "
              + " ".join(f"{v:+.2f}" for v in agree["cos"]) + "; norm ratio "
              + " ".join(f"{v:.2f}" for v in agree["ratio"]))
    rows = results["rows"]
    depths = list(results["layer_grads"])
    fig, axes = plt.subplots(2, len(depths), figsize=(5 * len(depths), 6.5), squeeze=False)
    for j, depth in enumerate(depths):
        names = list(dict.fromkeys(r["setting"] for r in rows if r["depth"] == depth and r["curve"]))
        for i, name in enumerate(names):
            for k, r in enumerate(r for r in rows if r["depth"] == depth and r["setting"] == name):
                axes[0][j].plot(range(1, len(r["curve"]) + 1), r["curve"], color=f"C{i}",
                                label=name if k == 0 else None)
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{depth}: training loss per epoch")
        axes[0][j].legend(fontsize=7)
        for name, mags in results["layer_grads"][depth].items():
            axes[1][j].plot(range(1, len(mags) + 1), mags, marker="o", label=name)
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("conv layer")
        axes[1][j].set_ylabel("mean |gradient|, first epoch")
        axes[1][j].legend(fontsize=7)
    fig.tight_layout()
    plt.show()


for path in committed:
    print(f"--- {path.parent.name}")
    show(json.loads(path.read_text()))

# %% [markdown]
# ## A tiny re-run
# One epoch, few steps, three settings, two seeds: enough to exercise the whole command (teacher, EP
# with and without local errors, BPTT, table, figures), not to reproduce the numbers above.
# The full run is `pyeqprop study depth --jobs 2 --out study-depth` (about half an hour on 2 cores).

# %%
from pyeqprop.study.depth import run_depth_study
from pyeqprop.train.config import TrainConfig

out = Path(tempfile.mkdtemp(prefix="pyeqprop-nb06-"))
base = TrainConfig(epochs=1, teacher_epochs=1, T1=6, T2=3, progress="none")
depths = {"shallow": "c4m", "deep": "c4-c4m-c4-c4"} if CI else {"shallow": "c16m-c32m",
                                                                  "deep": "c8-c8-c16m-c16-c16-c32m-c32-c32"}
run_depth_study(base, out=out, depths=depths, settings=("ep", "ep+local", "bptt"), seeds=(0, 1), log=lambda m: None)
show(json.loads((out / "results.json").read_text()))
