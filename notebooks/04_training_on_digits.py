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
# # 04 · Training on the digits
#
# The main job of pyeqprop end to end: symmetric EP (Eq. 4.2) with local error heads and
# distillation (Eq. 6.1) on scikit-learn's 1797 real 8×8 digits, through the same function
# the command `pyeqprop train` calls, `pyeqprop.train.loop.train(TrainConfig(...))`. It
# trains the backprop teacher first (Eqs. 7.1-7.3), then the CRNN student, and returns the
# per-epoch history that the run folder's `metrics.jsonl` holds.

# %%
import logging
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from pyeqprop.train.config import TrainConfig
from pyeqprop.train.loop import train

CI = os.environ.get("PYEQPROP_NOTEBOOK_CI") == "1"  # set by tests/test_notebooks.py
logging.basicConfig(level=logging.INFO, format="%(message)s")  # show the library's progress lines (logger pyeqprop)

# ---- FULL_JOB: True runs the default job of `pyeqprop train` (30 epochs, T1 = 30, T2 = 10,
# a 20-epoch teacher; minutes on a laptop). CI runs a 3-epoch version with fewer steps. ----
FULL_JOB = not CI

out = Path(tempfile.mkdtemp(prefix="pyeqprop-nb04-")) / "run"  # outside the repository
if FULL_JOB:
    cfg = TrainConfig(out=str(out), progress="none")
else:
    cfg = TrainConfig(out=str(out), progress="none", epochs=3, T1=8, T2=3, teacher_epochs=3)
print(cfg)

# %%
result = train(cfg)
# %matplotlib inline
print(f"\nstudent test accuracy {100 * result.test_acc:.2f}%, teacher {100 * result.teacher_test_acc:.2f}%, "
      f"{result.seconds:.0f}s")
print("run folder:", sorted(p.name for p in result.run_dir.iterdir()))

# %% [markdown]
# ## Curves from `result.history`
#
# One row per epoch (keys `pyeqprop.train.loop.METRIC_KEYS`). Training loss and accuracy are
# running means over the epoch's batches, measured at the free state with the weights of
# that moment; test values come after the epoch with T_eval = T1 free steps. The teacher's
# test accuracy is the dashed line. The last panel shows the largest settling residual
# (Eq. 3.11) of each epoch: EP's link to the gradient (Eq. 4.4) assumes converged phases, so
# a residual far from zero says the update is a biased estimate of it, even when training
# works.

# %%
h = result.history
epochs = [r["epoch"] for r in h]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
axes[0].plot(epochs, [r["train_loss"] for r in h], "o-", label="train")
axes[0].plot(epochs, [r["test_loss"] for r in h], "s-", label="test")
axes[0].set_ylabel("cross-entropy")
axes[1].plot(epochs, [100 * r["train_acc"] for r in h], "o-", label="train")
axes[1].plot(epochs, [100 * r["test_acc"] for r in h], "s-", label="test")
axes[1].axhline(100 * result.teacher_test_acc, color="black", ls="--", lw=1, label="teacher (backprop), test")
axes[1].set_ylabel("accuracy (%)")
axes[2].semilogy(epochs, [r["residual_free"] for r in h], "o-", label="free phase")
axes[2].semilogy(epochs, [r["residual_nudged"] for r in h], "s-", label="nudged phases")
axes[2].set_ylabel("largest residual of the epoch")
lowest = min(min(r["residual_free"], r["residual_nudged"]) for r in h)
axes[2].set_ylim(min(1e-3, lowest / 2), 2)  # keep 10⁻³ … 1 in view so "far from zero" is visible
for ax in axes:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
fig.suptitle(f"arch {cfg.arch!r} on {cfg.dataset}: {cfg.estimator} EP, β = {cfg.beta}, T1 = {cfg.T1}, T2 = {cfg.T2}, "
             f"local {cfg.local_layers}, KD {cfg.kd_layers}")
fig.tight_layout()
plt.show()

# %%
print(f"{'epoch':>5} {'train loss':>11} {'train acc':>10} {'test loss':>10} {'test acc':>9} {'seconds':>8}")
for r in h:
    print(f"{r['epoch']:5d} {r['train_loss']:11.4f} {100 * r['train_acc']:9.2f}% {r['test_loss']:10.4f} "
          f"{100 * r['test_acc']:8.2f}% {r['seconds']:8.1f}")
gap = 100 * (result.teacher_test_acc - result.test_acc)
print(f"\nthe backprop teacher is {gap:+.2f} points ahead of the EP student on the test split")

# %% [markdown]
# The same job from a shell: `pyeqprop train` (or `pyeqprop train --epochs 3 --T1 8 ...`);
# `pyeqprop train --resume RUN` continues a run, and `pyeqprop evaluate RUN` re-measures it.
