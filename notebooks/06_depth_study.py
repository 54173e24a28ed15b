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
# # 06 · Depth study: plain EP against intermediate signals and the exact gradient
#
# The claim of Lin, Bal & Sengupta (arXiv 2508.15989): plain EP's learning signal fades with
# depth, and local error heads plus distillation (Eq. 6.1) restore it. `pyeqprop study depth`
# trains a shallow and a deep CRNN on the digits under EP, EP + local errors, EP +
# distillation, EP + both, the exact equilibrium gradient of the same network (Eq. 5.7) and
# the backprop teacher (Eq. 7.3), each setting at the learning rate its validation accuracy
# chose. The deep net (8 conv layers) trains because of the feedback gain ω = 0.1 (Eq. 3.18):
# its forward pass keeps its gain while the settling still contracts. This notebook shows the
# committed results of that command (`docs/results/`), then re-runs a tiny version so CI checks
# the command still works.

# %%
import json
import math
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
# `docs/results/depth/`: `pyeqprop study depth --arch c8-c8-c16m-c16-c16-c32m-c32-c32 --unconverged apply
# --asymmetry-limit 0 --jobs 2`,
# the deep net with the study's defaults (feedback gain 0.1, student and teacher weight scale 4,
# 10 epochs, seeds 0-4, Gauss–Seidel phases settled to 1e-5, the nudged ones in difference variables
# (SPEC Eq. 4.8; `depth-state/`: the same study with them in the state), λ = 0.1, kd weight 1, heads and maps
# starting at zero, Eq. 6.7; each setting's rates chosen on seed 0's validation split from 0.02
# or 0.05, with conv1-2 at that rate or a tenth of it); `depth-one-rate/`: the shallow and the
# deep net with one rate for all layers, chosen from 0.02, 0.05, 0.1; `depth-b005/`: β = 0.05, every
# setting at rate 0.05, batches with an unconverged phase skipped (`--unconverged skip`, SPEC Eq. 3.14;
# README "Depth study", finding 5); `depth-b005-asym/`: the same with batches whose nudged phase settled
# at another fixed point skipped (`--asymmetry-limit 0.5`, SPEC Eq. 4.9; finding 6); `depth-b005-exact/`: the
# same command after the equilibrium gradient's solve was corrected (SPEC Eq. 5.7; the README's headline table:
# its EP and teacher runs are `depth-b005-asym/`'s bit for bit, its exact-gradient runs differ; every other
# folder's exact-gradient rows were made with the old stop); `depth-12conv/`: a 12-conv net (EP, EP + both and
# the exact gradient, seeds 0-4); `depth-mnist5k/`: the
# confirmation on mnist5k (28×28; `c8-c8m-c16-c16m-c32-c32-c32-c32`, EP, EP + both and the exact gradient,
# seeds 0-2, 3 epochs, otherwise as `depth-b005-asym/`; `depth-mnist5k-signals/`: EP + local, EP +
# distillation and that study's own exact gradient); `depth-kd-variants/`: three distillation designs
# beside distillation on every conv layer (the lower half only, a cosine-decayed γ, standardised targets;
# SPEC Eqs. 6.1, 6.8, 6.9), seeds 0-2, chosen by validation loss. For each: the mean ±
# sample std over the seeds per setting, the paired differences to the exact gradient, the
# chosen rates, plain EP against the equilibrium gradient per conv layer at initialisation,
# then the training-loss curves (one line per seed) and the mean |gradient| of each conv layer's
# weights, over the first epoch and against the epoch. `docs/results/README.md` lists the commands.

# %%
def show(results):
    for r in results["summary"]:
        val = "" if math.isnan(r.get("val_acc", math.nan)) else f"val {100 * r['val_acc']:5.1f}%  "
        if not math.isnan(r.get("val_loss", math.nan)):
            val = f"val loss {r['val_loss']:.3f}  " + val
        print(f"{r['depth']:>8} {r['setting']:<34} train loss {r['train_loss']:.3f} ± {r['train_loss_std']:.3f}  "
              f"{val}test {100 * r['test_acc']:5.1f} ± {100 * r['test_acc_std']:4.1f}%  "
              f"({r['seeds']} seeds, {r['seconds']:.0f} s per run)")
    for p in results.get("paired", []):
        print(f"{p['depth']:>8} {p['setting']:<34} minus {p['reference']}: test "
              f"{100 * p['test_acc_diff']:+.1f} ± {100 * p['test_acc_diff_std']:.1f} points, train loss "
              f"{p['train_loss_diff']:+.3f} ± {p['train_loss_diff_std']:.3f} ({p['seeds']} seeds)")
    for c in results.get("chosen_lr", []):
        bottom = c.get("lr_bottom", 1.0)
        print(f"{c['depth']:>8} {c['setting']:<34} learning rate {c['lr']:g}"
              + ("" if bottom == 1.0 else f", ×{bottom:g} on conv1-{c['bottom_layers']}") + " (chosen on validation)")
    for depth, agree in results["ep_vs_bptt_at_init"].items():
        print(f"{depth:>8} plain EP vs the equilibrium gradient at init, per conv layer: cosine "
              + " ".join(f"{v:+.2f}" for v in agree["cos_exact"]) + "; norm ratio "
              + " ".join(f"{v:.2f}" for v in agree["ratio_exact"]))
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
    deep = [r for r in rows if r["depth"] == depths[-1] and r.get("layer_grads")]
    names = list(dict.fromkeys(r["setting"] for r in deep))
    if names:  # per conv layer against the epoch, mean over seeds
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], names):
            runs = [r["layer_grads"] for r in deep if r["setting"] == name]
            mean = [[sum(run[e][l] for run in runs) / len(runs) for l in range(len(runs[0][0]))]
                    for e in range(len(runs[0]))]
            for l in range(len(mean[0])):
                ax.plot(range(1, len(mean) + 1), [m[l] for m in mean], label=f"conv{l + 1}")
            ax.set_yscale("log")
            ax.set_title(f"{depths[-1]}: {name}", fontsize=8)
            ax.set_xlabel("epoch")
        axes[0][0].set_ylabel("mean |gradient|")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        plt.show()


for path in committed:
    print(f"--- {path.parent.name}")
    show(json.loads(path.read_text()))

# %% [markdown]
# ## A tiny re-run
# One epoch, few steps, three settings, two seeds, no learning-rate search: enough to exercise
# the whole command (teacher, EP with and without local errors, the equilibrium gradient,
# table, paired differences, figures), not to reproduce the numbers above. The full run is
# `pyeqprop study depth --jobs 2 --out study-depth` (see `docs/results/README.md` for its time).

# %%
from pyeqprop.study.depth import run_depth_study
from pyeqprop.train.config import TrainConfig

out = Path(tempfile.mkdtemp(prefix="pyeqprop-nb06-"))
base = TrainConfig(epochs=1, teacher_epochs=1, T1=20, T2=10, feedback=0.1, weight_scale=4.0, teacher_weight_scale=4.0,
                   schedule="gauss-seidel", settle_tol=1e-5, progress="none")
depths = {"shallow": "c4m", "deep": "c4-c4m-c4-c4"} if CI else {"shallow": "c16m-c32m",
                                                                  "deep": "c8-c8-c16m-c16-c16-c32m-c32-c32"}
run_depth_study(base, out=out, depths=depths, settings=("ep", "ep+local", "implicit"), seeds=(0, 1),
                log=lambda m: None)
show(json.loads((out / "results.json").read_text()))
