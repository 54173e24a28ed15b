"""Layer objects: each layer kind owns its maps and their adjoints, side by side (Eqs. 3.1, 3.7, 3.9, 5.3).

Notation: a the layer's input (s_{l−1}, or x for l = 1), s its state s_l, n the batch;
a conv layer has W (o, c, k, k), b (o,), padding p and pooling P ∈ {max 2×2/2, avg 2×2/2,
identity}, with P* its adjoint (max-unpooling at the argmax ``idx``, average-unpooling, or the
identity); an fc layer has W (out, in) and b (out,).

Each layer object provides, for its own kind only:

=========================  =====================================================  ==========
``bottom_up(θ, a)``        B(a) = P(conv(a; W, p) + b)  |  W vec(a) + b, and idx   Eq. 3.1
``bottom_up_linear(θ, a,   the frozen-argmax linear part of B: P_idx(conv(a; W))   Eq. 5.3
idx)``                     |  W vec(a) (no bias)
``top_down(θ, s, idx,      T(s) = conv_transpose(P*_idx(s); W)  |  reshape(Wᵀ s):  Eq. 3.7
shape)``                   the adjoint of ``bottom_up_linear`` in a
``param_adjoint(a, s,      ∂⟨B(a), s⟩/∂θ summed over the batch, argmax frozen at   Eq. 3.9
idx)``                     idx: (conv2d_weight_grad(a, P*(s)), Σ P*(s))  |  (sᵀ
                           vec(a), Σ s)
``param_adjoint_diff(a,    ∂⟨B(a), s⟩/∂θ − ∂⟨B(a'), s'⟩/∂θ formed before the       Eq. 4.6
s, idx, a', s', idx')``    reductions: ⟨a − a', P*s⟩ + ⟨a', P*s − P*'s'⟩ terms
``bottom_up_delta(θ, da,   ΔB = B(a + da) − B(a) without forming a + da, from the  Eq. 4.8
z, idx)``                  free pre-pool map z = conv(a) + b and its argmax idx,
                           and the argmax at a + da
``top_down_delta(θ, ds,    ΔT = T'(s + ds) − T(s) (T' at the argmax idx', T at     Eq. 4.8
s, idx', idx, shape)``     idx) without forming s + ds
``param_adjoint_delta(a,   ∂⟨B(a + da¹), s + ds¹⟩/∂θ − ∂⟨B(a + da²), s + ds²⟩/∂θ   Eq. 4.8
da¹, s, ds¹, idx¹, da²,    from the differences: the difference-variable form of
ds², idx²)``               ``param_adjoint_diff``
``argmax(θ, a)``           the max-pool argmax of B(a); None without max pooling   Eq. 2.6
                           (and then no convolution runs)
``unpool(g, idx)``         P*_idx(g)                                               Eqs. 2.7-2.8
``prepare(θ)``             what the layer builds once per batch from θ for its     Eq. 2.1
                           many drives (a conv layer's weight matrix); passed
                           back as ``prep`` to ``bottom_up``, ``argmax``,
                           ``top_down``
=========================  =====================================================  ==========

The CRNN (its Φ, drive and ∂Φ/∂θ), the feed-forward teacher (Eq. 7.1 and its reverse pass
7.3) and BPTT (the Hessian-vector product of Eq. 5.3) compose these; no other module switches
on the kind of a layer.
"""
from __future__ import annotations

from ..backend import namespace_of
from ..ops.conv import conv2d, conv2d_bias_grad, conv2d_transpose, conv2d_weight_grad, conv_weight_matrix
from ..ops.linear import linear, linear_transpose, linear_weight_grad
from ..ops.pool import avg_pool2d, avg_unpool2d, max_pool2d, max_pool2d_select, max_unpool2d
from .arch import ConvLayer, FCLayer
from .params import ParamSpec

__all__ = ["ConvMap", "DenseMap", "make_layer", "make_layers", "param_specs"]


class _Named:
    """What every layer object holds: its description, its name and its parameters' names; and the
    difference-variable parameter adjoint (Eq. 4.8), which needs only the layer's ``unpool`` and its
    two reductions ``weight_grad`` and ``bias_grad``."""

    def __init__(self, desc):
        self.desc = desc
        self.name = desc.name
        self.weight, self.bias = f"{desc.name}.weight", f"{desc.name}.bias"
        self.state_shape = desc.state_shape

    def param_adjoint_delta(self, a, da1, s, ds1, idx1, da2, ds2, idx2):
        """Σ_batch [∂⟨B(a + da¹), s + ds¹⟩ − ∂⟨B(a + da²), s + ds²⟩]/∂(W, b), each phase at its own argmax,
        from the phase differences da, ds (Eq. 4.8).

        With g^i = P*_{idx^i}(s + ds^i) and the difference of the two formed from the small parts,

            Δg = P*_{idx¹}(ds¹) − P*_{idx²}(ds²) + [P*_{idx¹}(s) − P*_{idx²}(s)],

        dW = W-adjoint(a, Δg) + W-adjoint(da¹, g¹) − W-adjoint(da², g²) and db = Σ Δg. The bracket is
        exactly 0 where the argmaxes agree. ``da``/``ds`` None: zero (the free phase, or the input x,
        which no phase changes).
        """
        dg = None if ds1 is None else self.unpool(ds1, idx1)  # (n, o, h_conv, w_conv) or (n, out)
        if ds2 is not None:
            term = self.unpool(ds2, idx2)
            dg = -term if dg is None else dg - term
        if idx1 is not None:  # max pooling: non-zero only where the argmax moved
            moved = self.unpool(s, idx1) - self.unpool(s, idx2)
            dg = moved if dg is None else dg + moved
        if dg is None:  # neither phase differs from the base
            dg = self.unpool(s, idx1) * 0.0
        dW = self.weight_grad(a, dg)
        if da1 is not None:
            dW = dW + self.weight_grad(da1, self.unpool(s if ds1 is None else s + ds1, idx1))
        if da2 is not None:
            dW = dW - self.weight_grad(da2, self.unpool(s if ds2 is None else s + ds2, idx2))
        return dW, self.bias_grad(dg)


class ConvMap(_Named):
    """A convolutional layer: B(a) = P(conv(a; W, p) + b), a (n, c, h, w) -> (n, o, h_out, w_out) (Eq. 3.1).

    Parameters
    ----------
    desc : :class:`~pyeqprop.model.arch.ConvLayer`
        The resolved description: name, channels, kernel, padding, pooling and sizes.

    Adjoint
    -------
    With the argmax frozen, B is affine in a and in θ: ``top_down`` is the adjoint in a of
    ``bottom_up_linear`` (⟨P_idx(conv(a; W)), s⟩ = ⟨a, T(s)⟩, Eqs. 2.3, 2.7a), and
    ``param_adjoint`` gives ∂⟨B(a), s⟩/∂(W, b) (Eq. 2.4).
    """

    kind = "conv"

    def __init__(self, desc: ConvLayer):
        super().__init__(desc)
        self.padding = desc.padding
        self.kernel = desc.kernel
        self.pool = desc.pool

    def param_specs(self) -> list[ParamSpec]:
        """W (o, c, k, k) and b (o,), fan-in c·k·k for Eq. 3.10."""
        d = self.desc
        fan_in = d.in_channels * d.kernel * d.kernel
        return [ParamSpec(self.weight, (d.out_channels, d.in_channels, d.kernel, d.kernel), fan_in),
                ParamSpec(self.bias, (d.out_channels,), fan_in)]

    def prepare(self, params):
        """W's patch-matrix form (k·k·c, o), built once for a batch's drives (Eq. 2.1): every settling step
        applies W twice (B and T), and building the matrix is a transposing copy of W."""
        return conv_weight_matrix(params[self.weight])

    def bottom_up(self, params, a, prep=None):
        """B(a) = P(conv(a; W, p) + b) and the max-pool argmax (None unless P is max), Eq. (3.1).
        ``prep``: :meth:`prepare` of these ``params``, or None."""
        z = conv2d(a, params[self.weight], params[self.bias], padding=self.padding,
                   weight_matrix=prep)  # (n, o, h_conv, w_conv)
        if self.pool == "max":
            return max_pool2d(z)  # (n, o, h_conv/2, w_conv/2), argmax
        if self.pool == "avg":
            return avg_pool2d(z), None
        return z, None

    def argmax(self, params, a, prep=None):
        """The max-pool argmax of B(a), or None without max pooling (then no convolution is run)."""
        return self.bottom_up(params, a, prep)[1] if self.pool == "max" else None

    def pre_pool(self, params, a, prep=None):
        """z = conv(a; W, p) + b, the map before max pooling, and its argmax; (None, None) unless P is max.
        What :meth:`bottom_up_delta` needs of the free state (Eq. 4.8)."""
        if self.pool != "max":
            return None, None
        z = conv2d(a, params[self.weight], params[self.bias], padding=self.padding,
                   weight_matrix=prep)  # (n, o, h_conv, w_conv)
        return z, max_pool2d(z)[1]

    def bottom_up_delta(self, params, da, z, idx, prep=None):
        """ΔB = B(a + da) − B(a) without forming a + da, and the argmax of B(a + da) (Eq. 4.8).

        ``z``, ``idx``: :meth:`pre_pool` at a. With dz = conv(da; W, p) (no bias):

            ΔB = P_{idx'}(dz) + [P_{idx'}(z) − P_{idx}(z)],   idx' = argmax of z + dz   (max pooling),
            ΔB = P(dz)                                                                  (avg, identity).

        The bracket is exactly 0 where the argmax did not move; z + dz is formed only to find idx'.
        Returns (ΔB, idx'), idx' None without max pooling.
        """
        dz = conv2d(da, params[self.weight], padding=self.padding, weight_matrix=prep)  # (n, o, h_conv, w_conv)
        if self.pool == "max":
            moved = max_pool2d(z + dz)[1]
            return max_pool2d_select(dz, moved) + (max_pool2d_select(z, moved) - max_pool2d_select(z, idx)), moved
        if self.pool == "avg":
            return avg_pool2d(dz), None
        return dz, None

    def bottom_up_linear(self, params, a, idx):
        """P_idx(conv(a; W, p)): B without its bias, the pooling a selection at ``idx`` (Eq. 5.3)."""
        z = conv2d(a, params[self.weight], padding=self.padding)  # (n, o, h_conv, w_conv)
        if self.pool == "max":
            return max_pool2d_select(z, idx)
        if self.pool == "avg":
            return avg_pool2d(z)
        return z

    def unpool(self, g, idx):
        """P*: the adjoint of the pooling, at ``idx`` for max pooling (Eqs. 2.7, 2.8); identity otherwise."""
        if self.pool == "max":
            return max_unpool2d(g, idx, output_size=self.desc.conv_hw)
        if self.pool == "avg":
            return avg_unpool2d(g, output_size=self.desc.conv_hw)
        return g

    def top_down(self, params, s, idx, below_shape, prep=None):
        """T(s) = conv_transpose(P*_idx(s); W): the feedback to the layer below, shape ``below_shape`` (Eq. 3.7).
        ``prep``: :meth:`prepare` of these ``params``, or None."""
        g = self.unpool(s, idx)  # (n, o, h_conv, w_conv)
        return conv2d_transpose(g, params[self.weight], padding=self.padding, output_size=below_shape[2:],
                                weight_matrix=prep)

    def top_down_delta(self, params, ds, s, moved, idx, below_shape, prep=None):
        """ΔT = T_{idx'}(s + ds) − T_{idx}(s) without forming s + ds (Eq. 4.8), shape ``below_shape``:

            ΔT = conv_transpose(P*_{idx'}(ds) + [P*_{idx'}(s) − P*_{idx}(s)]; W),

        the bracket only with max pooling (``moved`` = idx' and ``idx`` its argmaxes), and exactly 0
        where they agree."""
        g = self.unpool(ds, moved)  # (n, o, h_conv, w_conv)
        if self.pool == "max":
            g = g + (self.unpool(s, moved) - self.unpool(s, idx))
        return conv2d_transpose(g, params[self.weight], padding=self.padding, output_size=below_shape[2:],
                                weight_matrix=prep)

    def weight_grad(self, a, g):
        """Σ_batch ∂⟨conv(a; W, p), g⟩/∂W for g of the pre-pool shape (Eq. 2.4)."""
        return conv2d_weight_grad(a, g, kernel_size=self.kernel, padding=self.padding)

    @staticmethod
    def bias_grad(g):
        """Σ_batch ∂⟨b, g⟩/∂b, summed over the batch and the plane."""
        return conv2d_bias_grad(g)

    def param_adjoint(self, a, s, idx, *, with_bias=True):
        """Σ_batch ∂⟨B(a), s⟩/∂(W, b) at frozen argmax ``idx`` (Eq. 3.9): (dW, db); db is None without bias."""
        g = self.unpool(s, idx)  # (n, o, h_conv, w_conv)
        dW = conv2d_weight_grad(a, g, kernel_size=self.kernel, padding=self.padding)
        return dW, (conv2d_bias_grad(g) if with_bias else None)

    def param_adjoint_diff(self, a, s, idx, a2, s2, idx2):
        """Σ_batch [∂⟨B(a), s⟩ − ∂⟨B(a2), s2⟩]/∂(W, b), each at its own argmax, differences first (Eq. 4.6).

        With g = P*_idx(s), g2 = P*_idx2(s2): dW = W-adjoint(a − a2, g) + W-adjoint(a2, g − g2), one
        pass when ``a is a2`` (the input x is shared by every phase); db = Σ (g − g2).
        """
        g, g2 = self.unpool(s, idx), self.unpool(s2, idx2)  # (n, o, h_conv, w_conv) each
        dg = g - g2
        dW = conv2d_weight_grad(a2, dg, kernel_size=self.kernel, padding=self.padding)
        if a is not a2:
            dW = dW + conv2d_weight_grad(a - a2, g, kernel_size=self.kernel, padding=self.padding)
        return dW, conv2d_bias_grad(dg)


class DenseMap(_Named):
    """A fully connected layer: B(a) = W vec(a) + b, a (n, …) -> (n, out) (Eq. 3.1).

    Also the softmax readout's shape of map (the teacher's output layer, Eq. 7.1).

    Adjoint
    -------
    ``top_down`` is the adjoint in a of ``bottom_up_linear`` (⟨W vec(a), s⟩ = ⟨a, reshape(Wᵀ s)⟩,
    Eq. 2.11), and ``param_adjoint`` gives ∂⟨B(a), s⟩/∂(W, b) = (sᵀ vec(a), Σ s).
    """

    kind = "fc"

    def param_specs(self) -> list[ParamSpec]:
        """W (out, in) and b (out,), fan-in = in for Eq. 3.10."""
        d = self.desc
        return [ParamSpec(self.weight, (d.out_features, d.in_features), d.in_features),
                ParamSpec(self.bias, (d.out_features,), d.in_features)]

    @staticmethod
    def _flat(a):
        xp = namespace_of(a)
        return xp.reshape(a, (a.shape[0], -1))  # (n, c, h, w) -> (n, c·h·w)

    def prepare(self, params):
        """None: an fc layer applies W as it is (Eq. 2.11)."""
        return None

    def bottom_up(self, params, a, prep=None):
        """B(a) = W vec(a) + b, and no argmax (None), Eq. (3.1)."""
        return linear(self._flat(a), params[self.weight], params[self.bias]), None

    def argmax(self, params, a, prep=None):
        """None: an fc layer has no pooling."""
        return None

    def pre_pool(self, params, a, prep=None):
        """(None, None): an fc layer has no pooling (Eq. 4.8)."""
        return None, None

    def bottom_up_delta(self, params, da, z=None, idx=None, prep=None):
        """ΔB = B(a + da) − B(a) = W vec(da), and no argmax (Eq. 4.8)."""
        return self.bottom_up_linear(params, da), None

    def top_down_delta(self, params, ds, s, moved, idx, below_shape, prep=None):
        """ΔT = T(s + ds) − T(s) = reshape(Wᵀ ds) (Eq. 4.8)."""
        return self.top_down(params, ds, None, below_shape)

    def weight_grad(self, a, g):
        """Σ_batch ∂⟨W vec(a), g⟩/∂W = gᵀ vec(a) (Eq. 2.11)."""
        return linear_weight_grad(self._flat(a), g)

    @staticmethod
    def bias_grad(g):
        """Σ_batch g."""
        xp = namespace_of(g)
        return xp.sum(g, axis=0)

    def bottom_up_linear(self, params, a, idx=None):
        """W vec(a): B without its bias (Eq. 5.3)."""
        return linear(self._flat(a), params[self.weight])

    def unpool(self, g, idx=None):
        """The identity: an fc layer has no pooling."""
        return g

    def top_down(self, params, s, idx, below_shape, prep=None):
        """T(s) = reshape(Wᵀ s) to ``below_shape`` (Eq. 3.7)."""
        xp = namespace_of(s)
        return xp.reshape(linear_transpose(s, params[self.weight]), below_shape)  # (n, in) -> shape of the layer below

    def param_adjoint(self, a, s, idx=None, *, with_bias=True):
        """Σ_batch ∂⟨B(a), s⟩/∂(W, b) = (sᵀ vec(a), Σ_n s) (Eq. 3.9); db is None without bias."""
        xp = namespace_of(s)
        dW = linear_weight_grad(self._flat(a), s)
        return dW, (xp.sum(s, axis=0) if with_bias else None)

    def param_adjoint_diff(self, a, s, idx, a2, s2, idx2):
        """Σ_batch [∂⟨B(a), s⟩ − ∂⟨B(a2), s2⟩]/∂(W, b), differences first (Eq. 4.6):
        ((s − s2)ᵀ vec(a2) + sᵀ vec(a − a2), Σ_n (s − s2)); one pass when ``a is a2``."""
        xp = namespace_of(s)
        ds = s - s2
        dW = linear_weight_grad(self._flat(a2), ds)
        if a is not a2:
            dW = dW + linear_weight_grad(self._flat(a - a2), s)
        return dW, xp.sum(ds, axis=0)


def make_layer(desc):
    """The layer object of a resolved description: :class:`ConvMap` or :class:`DenseMap`."""
    if isinstance(desc, ConvLayer):
        return ConvMap(desc)
    if isinstance(desc, FCLayer):
        return DenseMap(desc)
    raise TypeError(f"cannot build a layer from {desc!r}: expected a ConvLayer or FCLayer description")


def make_layers(descs) -> tuple:
    """Layer objects for a sequence of descriptions, in order."""
    return tuple(make_layer(d) for d in descs)


def param_specs(layers) -> list[ParamSpec]:
    """Weight and bias specs of ``layers`` in order (W then b per layer), Eq. (3.10)."""
    return [spec for layer in layers for spec in layer.param_specs()]
