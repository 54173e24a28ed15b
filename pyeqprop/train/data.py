"""The training data of a job: loaded, normalised on the host (unless augmenting) and moved to the device once."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Data", "prepare_data"]


@dataclass
class Data:
    """The train and test splits on the job's backend, with the normalisation they need."""

    x_train: object
    y_train: object
    x_test: object
    y_test: object
    input_shape: tuple
    num_classes: int
    mean: tuple
    std: tuple
    name: str


def prepare_data(cfg, xp, dataset=None) -> Data:
    """Load ``dataset`` (default ``cfg.dataset``), normalise on host (unless augmenting), move it to ``xp`` once."""
    from ..data import load_dataset
    from ..data.augment import normalize

    name = dataset or cfg.dataset
    official = name.lower().replace("-", "").replace("_", "") in ("cifar10", "cifar100")
    ds = load_dataset(name, root=cfg.data_root or None, download=cfg.download, seed=cfg.seed,
                      test_fraction=None if official else cfg.test_fraction)
    dtype = getattr(xp, cfg.dtype)
    x_tr = xp.asarray(ds.x_train, dtype=dtype)
    x_te = normalize(xp.asarray(ds.x_test, dtype=dtype), ds.mean, ds.std)
    if not cfg.augment:
        x_tr = normalize(x_tr, ds.mean, ds.std)
    return Data(x_tr, xp.asarray(ds.y_train), x_te, xp.asarray(ds.y_test), ds.input_shape, ds.num_classes,
                ds.mean, ds.std, ds.name)
