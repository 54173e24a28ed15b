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
# # 01 · Primitives and their adjoints
#
# Every operation pyeqprop uses is written by hand in `pyeqprop.ops`, together with its
# adjoint (SPEC.md §2). This notebook applies them to one real 8×8 handwritten digit from
# scikit-learn's `digits` set, draws what they do, and checks numerically that each
# "backward" map is the adjoint of its "forward" map: ⟨A x, y⟩ = ⟨x, Aᵀ y⟩.
#
# | SPEC | forward | adjoint |
# | --- | --- | --- |
# | (2.1), (2.3), (2.4) | `conv2d` | `conv2d_transpose` (in x), `conv2d_weight_grad` (in w) |
# | (2.2) | output size `h' = ⌊(h + 2p − k)/s⌋ + 1` | `output_size` given explicitly |
# | (2.5), (2.6), (2.7), (2.7a) | `max_pool2d` | `max_unpool2d` (at frozen indices) |
# | (2.8) | `avg_pool2d` | `avg_unpool2d` |

# %%
import matplotlib.pyplot as plt
import numpy as np

from pyeqprop import ops
from pyeqprop._shapes import conv_insize_range, conv_outsize
from pyeqprop.data import load_dataset

ds = load_dataset("digits")
digit = np.asarray(ds.x_train[:1], dtype=np.float64)  # (n, c, h, w) = (1, 1, 8, 8), values in [0, 1]
print("digit", digit.shape, "label", int(ds.y_train[0]))


def show(images, titles, *, cmap="gray", vmin=None, vmax=None, size=1.8):
    """One row of images (each (h, w)) with titles."""
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.4), squeeze=False)
    for ax, im, title in zip(axes[0], images, titles):
        ax.imshow(im, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    plt.show()


show([digit[0, 0]], [f"digit, label {int(ds.y_train[0])}"], size=2.4)

# %% [markdown]
# ## Convolution, Eq. (2.1)
#
# `conv2d` is cross-correlation (no kernel flip), NCHW inputs and OIHW weights, as in
# PyTorch: y[n,o,i,j] = b[o] + Σ_{c,a,β} w[o,c,a,β] · x_p[n,c, s·i + a, s·j + β].
# Three hand-made 3×3 kernels (a blur and two Sobel edge detectors) with padding 1 keep the
# 8×8 size.

# %%
blur = np.full((3, 3), 1 / 9)
sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
w = np.stack([blur, sobel_x, sobel_x.T])[:, None]  # (o, c, k_h, k_w) = (3, 1, 3, 3)
y = ops.conv2d(digit, w, padding=1)  # (1, 3, 8, 8)
print("conv2d:", digit.shape, "->", y.shape)
show([digit[0, 0], *y[0]], ["input", "blur", "∂/∂x (Sobel)", "∂/∂y (Sobel)"])

# %% [markdown]
# ## Transposed convolution, Eq. (2.3), and the stride ambiguity, Eq. (2.2)
#
# `conv2d_transpose` scatters each output value back through the kernel: it is the adjoint
# of `conv2d` in x, not its inverse. With stride 2 several input sizes give the same output
# size, so the adjoint takes `output_size` explicitly.

# %%
back = ops.conv2d_transpose(y, w, padding=1, output_size=(8, 8))  # (1, 3, 8, 8) -> (1, 1, 8, 8)
show([digit[0, 0], back[0, 0]], ["x", "conv2dᵀ(conv2d(x))"], size=2.2)

for h in (7, 8):
    print(f"h = {h}: stride 2, k = 3, p = 1 gives h' = {conv_outsize(h, 3, 2, 1)}")
print("every h with h' = 4:", list(conv_insize_range(4, 3, 2, 1)))
y2 = ops.conv2d(digit, w, stride=2, padding=1)  # (1, 3, 4, 4)
z7 = ops.conv2d_transpose(y2, w, stride=2, padding=1, output_size=(7, 7))
z8 = ops.conv2d_transpose(y2, w, stride=2, padding=1, output_size=(8, 8))
print("stride-2 transpose to", z7.shape, "and to", z8.shape)

# %% [markdown]
# ## Pooling, Eqs. (2.5)-(2.8)
#
# `max_pool2d` returns the maxima and their flat indices u·w + v in each input plane
# (PyTorch's convention; ties go to the first maximum in row-major window order).
# `max_unpool2d` puts values back at those indices (a scatter-add, Eq. 2.7), and
# `avg_unpool2d` spreads each value evenly over its window (Eq. 2.8).

# %%
mp, idx = ops.max_pool2d(digit)  # (1, 1, 4, 4) values and int64 indices
ap = ops.avg_pool2d(digit)  # (1, 1, 4, 4)
mu = ops.max_unpool2d(mp, idx, output_size=(8, 8))  # (1, 1, 8, 8), zero off the argmaxes
au = ops.avg_unpool2d(ap, output_size=(8, 8))  # (1, 1, 8, 8), each value / 4 over its window
print("max-pool indices (flat u·8 + v):\n", idx[0, 0])
show([digit[0, 0], mp[0, 0], mu[0, 0], ap[0, 0], au[0, 0]],
     ["x", "max_pool2d", "max_unpool2d", "avg_pool2d", "avg_unpool2d"], vmin=0, vmax=1)
sel = ops.max_pool2d_select(digit, idx)  # Eq. (2.7a): selection at frozen indices
print("max_pool2d_select(x, indices) == max_pool2d(x)[0]:", bool(np.array_equal(sel, mp)))

# %% [markdown]
# ## Adjoint identities
#
# For each linear map A and its hand-written adjoint Aᵀ we draw float64 x and y and compare
# ⟨A x, y⟩ with ⟨x, Aᵀ y⟩. In exact arithmetic both are the same sum of M products
# (M = outputs × taps per output); in floating point each side adds them in a different
# order, so they may differ by at most about M·ε·Σ|products| = M·ε·⟨|A| |x|, |y|⟩, with
# ε = 2⁻⁵² and |A| the map with absolute-valued coefficients. That bound is printed next to
# the difference and asserted. Max pooling is linear only with its indices frozen (Eq. 2.7);
# we freeze them at the argmax of the digit's feature maps. The reference tests
# (`reference_tests/`) check the same identities over random shapes, strides and paddings.

# %%
rng = np.random.default_rng(0)
eps = np.finfo(np.float64).eps


def check(name, A, AT, x, y, *, taps, absA=None):
    """Print ⟨Ax, y⟩, ⟨x, Aᵀy⟩, their difference and the round-off bound M·ε·⟨|A||x|, |y|⟩."""
    absA = A if absA is None else absA  # maps with non-negative coefficients are their own |A|
    lhs, rhs = float(np.sum(A(x) * y)), float(np.sum(x * AT(y)))
    M = y.size * taps
    bound = M * eps * float(np.sum(absA(np.abs(x)) * np.abs(y)))
    print(f"{name:<30} ⟨Ax,y⟩ = {lhs:+.15e}  ⟨x,Aᵀy⟩ = {rhs:+.15e}  |diff| = {abs(lhs - rhs):.1e} "
          f"≤ {bound:.1e}")
    assert abs(lhs - rhs) <= bound


# conv2d in x (Eq. 2.3) and in w (Eq. 2.4), stride 2 and padding 1 on a 9×7 input
x = rng.standard_normal((2, 3, 9, 7))
wk = rng.standard_normal((4, 3, 3, 3))
g = rng.standard_normal((2, 4) + tuple(conv_outsize(s, 3, 2, 1) for s in (9, 7)))  # (2, 4, 5, 4)
check("conv2d in x (2.3)",
      lambda v: ops.conv2d(v, wk, stride=2, padding=1),
      lambda u: ops.conv2d_transpose(u, wk, stride=2, padding=1, output_size=(9, 7)),
      x, g, taps=3 * 3 * 3, absA=lambda v: ops.conv2d(v, np.abs(wk), stride=2, padding=1))
check("conv2d in w (2.4)",
      lambda v: ops.conv2d(x, v, stride=2, padding=1),
      lambda u: ops.conv2d_weight_grad(x, u, kernel_size=3, stride=2, padding=1),
      wk, g, taps=3 * 3 * 3, absA=lambda v: ops.conv2d(np.abs(x), v, stride=2, padding=1))

# max pooling at frozen indices (Eqs. 2.7, 2.7a), indices from the digit's feature maps
feat = ops.conv2d(digit, w, padding=1)  # (1, 3, 8, 8)
_, fidx = ops.max_pool2d(feat)  # (1, 3, 4, 4)
check("max pool 2×2/2 (2.7)",
      lambda v: ops.max_pool2d_select(v, fidx),
      lambda u: ops.max_unpool2d(u, fidx, output_size=(8, 8)),
      rng.standard_normal(feat.shape), rng.standard_normal(fidx.shape), taps=1)

# overlapping max pooling (3×3 windows, stride 2): the unpooling has to scatter-add
xo = rng.standard_normal((2, 2, 9, 9))
_, oidx = ops.max_pool2d(xo, kernel_size=3, stride=2)  # (2, 2, 4, 4)
check("max pool 3×3/2, overlapping",
      lambda v: ops.max_pool2d_select(v, oidx, kernel_size=3, stride=2),
      lambda u: ops.max_unpool2d(u, oidx, kernel_size=3, stride=2, output_size=(9, 9)),
      xo, rng.standard_normal(oidx.shape), taps=1)

# average pooling (Eq. 2.8)
check("avg pool 2×2/2 (2.8)",
      lambda v: ops.avg_pool2d(v),
      lambda u: ops.avg_unpool2d(u, output_size=(8, 8)),
      rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 3, 4, 4)), taps=4)

# %% [markdown]
# Each pair agrees to the last few digits, far inside the round-off bound. An adjoint that
# were only "approximately right" (an off-by-one in the padding, a flipped kernel, a dropped
# overlap) would differ in the leading digits.
