"""Random crop / flip / normalisation on NumPy and array_api_strict, against a plain-NumPy oracle."""
import numpy as np
import pytest

from pyeqprop.backend import get_namespace, to_numpy
from pyeqprop.data import augment, crop, hflip, normalize, random_crop, random_hflip

BACKENDS = ["numpy", "array_api_strict"]


def _xp(name):
    if name == "array_api_strict":
        pytest.importorskip("array_api_strict")
    return get_namespace(name)


def oracle_crop(x, oy, ox, p, mode):
    """Pad with np.pad, then slice each window: y[n] = x_pad[n, :, a:a+h, b:b+w]."""
    n, c, h, w = x.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="constant" if mode == "zeros" else "edge")
    return np.stack([xpad[k, :, oy[k]:oy[k] + h, ox[k]:ox[k] + w] for k in range(n)])


def _images(n=6, c=3, h=7, w=5, seed=0):
    return np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32) + np.float32(0.5)  # no zeros


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_known_offsets(backend):
    xp = _xp(backend)
    x = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    xd = xp.asarray(x)
    assert np.array_equal(to_numpy(crop(xd, [2], [2], padding=2)), x)  # centre offset: identity
    y = to_numpy(crop(xd, [0], [3], padding=2))  # 2 rows down, 1 column left
    want = np.zeros((4, 4), np.float32)
    want[2:, :3] = x[0, 0, :2, 1:]
    assert np.array_equal(y[0, 0], want)
    y_edge = to_numpy(crop(xd, [0], [3], padding=2, padding_mode="edge"))
    assert np.array_equal(y_edge[0, 0], oracle_crop(x, [0], [3], 2, "edge")[0, 0])
    assert np.array_equal(y_edge[0, 0, 0], x[0, 0, 0, [1, 2, 3, 3]])  # top rows repeat row 0, right edge repeats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["zeros", "edge"])
def test_crop_matches_pad_and_slice_oracle(backend, mode):
    xp = _xp(backend)
    x = _images()
    rng = np.random.default_rng(1)
    oy, ox = rng.integers(0, 9, size=(2, x.shape[0]))
    y = crop(xp.asarray(x), oy, ox, padding=4, padding_mode=mode)
    assert y.shape == x.shape and y.dtype == xp.float32
    np.testing.assert_array_equal(to_numpy(y), oracle_crop(x, oy, ox, 4, mode))


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_crop_gives_some_window_of_the_padded_image(backend):
    xp = _xp(backend)
    x = _images(n=20, h=8, w=8)
    y = to_numpy(random_crop(xp.asarray(x), np.random.default_rng(2), padding=4))
    assert y.shape == x.shape
    shifts = set()
    for k in range(x.shape[0]):
        hits = [(a, b) for a in range(9) for b in range(9)
                if np.array_equal(y[k], oracle_crop(x[k:k + 1], [a], [b], 4, "zeros")[0])]
        assert hits, f"sample {k} is no 8×8 window of its padded image"
        shifts.add(hits[0])
    assert len(shifts) > 5  # offsets really vary


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_known_image_and_random_flip(backend):
    xp = _xp(backend)
    x = _images(n=2)
    y = to_numpy(hflip(xp.asarray(x), [True, False]))
    assert np.array_equal(y[0], x[0, :, :, ::-1]) and np.array_equal(y[1], x[1])
    xs = _images(n=64)
    ys = to_numpy(random_hflip(xp.asarray(xs), np.random.default_rng(3)))
    flipped = [np.array_equal(ys[k], xs[k, :, :, ::-1]) for k in range(64)]
    kept = [np.array_equal(ys[k], xs[k]) for k in range(64)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two
    assert 10 < sum(flipped) < 54


@pytest.mark.parametrize("backend", BACKENDS)
def test_augment_keeps_shape_dtype_namespace_and_is_seeded(backend):
    xp = _xp(backend)
    x = xp.asarray(_images(n=5, h=32, w=32))
    a = augment(x, np.random.default_rng(4))
    b = augment(x, np.random.default_rng(4))
    assert a.shape == (5, 3, 32, 32) and a.dtype == xp.float32
    assert type(a) is type(x)
    assert np.array_equal(to_numpy(a), to_numpy(b))
    assert np.array_equal(to_numpy(augment(x, np.random.default_rng(0), padding=0, flip=False)), to_numpy(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_per_channel(backend):
    xp = _xp(backend)
    x = _images(n=3, c=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 1.0, 2.0)
    y = normalize(xp.asarray(x), mean, std)
    want = (x - np.float32(mean).reshape(1, 3, 1, 1)) / np.float32(std).reshape(1, 3, 1, 1)
    assert y.dtype == xp.float32
    np.testing.assert_allclose(to_numpy(y), want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="3 entries"):
        normalize(xp.asarray(x), (0.0,), (1.0,))


def test_argument_errors():
    x = _images(n=2)
    with pytest.raises(ValueError, match="padding_mode"):
        crop(x, [0, 0], [0, 0], padding_mode="reflect")
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        crop(x, [9, 0], [0, 0], padding=4)
    with pytest.raises(TypeError, match="Generator"):
        augment(x, 0)
