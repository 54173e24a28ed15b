"""The training data of a job: loaded, normalised on the host (unless augmenting) and moved to the device once."""
from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["Data", "prepare_data"]

_log = logging.getLogger(__name__)


@dataclass
class Data:
    """The train, validation and test splits on the job's backend, with the normalisation they need.

    The validation split (None without one) is held out of the training split, stratified, from
    ``default_rng([seed, 1])``; it chooses best.npz, so the test split is reported, never selected on.
    """

    x_train: object
    y_train: object
    x_test: object
    y_test: object
    input_shape: tuple
    num_classes: int
    mean: tuple
    std: tuple
    name: str
    x_val: object = None
    y_val: object = None


def prepare_data(cfg, xp, dataset=None, *, training: bool = True) -> Data:
    """Load ``dataset`` (default ``cfg.dataset``), normalise on host (unless augmenting), move it to ``xp`` once.

    With ``training``, a batch size larger than the training split is logged as a warning (every epoch
    is then one batch of the whole split).
    """
    import numpy as np

    from ..data import load_dataset
    from ..data.augment import normalize
    from ..data.datasets import stratified_split

    name = dataset or cfg.dataset
    official = name.lower().replace("-", "").replace("_", "") in ("cifar10", "cifar100")
    ds = load_dataset(name, root=cfg.data_root or None, download=cfg.download, seed=cfg.seed,
                      test_fraction=None if official else cfg.test_fraction)
    dtype = getattr(xp, cfg.dtype)
    x_host, y_host = ds.x_train, ds.y_train
    x_va = y_va = None
    if cfg.val_fraction > 0:
        tr, va = stratified_split(y_host, cfg.val_fraction, np.random.default_rng([cfg.seed, 1]))
        x_va = normalize(xp.asarray(x_host[va], dtype=dtype), ds.mean, ds.std)
        y_va = xp.asarray(y_host[va])
        x_host, y_host = x_host[tr], y_host[tr]
    if training:
        for key in ("batch_size",) + (("teacher_batch_size",) if cfg.teacher_epochs > 0 else ()):
            if getattr(cfg, key) > x_host.shape[0]:
                _log.warning(f"{key} {getattr(cfg, key)} is larger than the training split ({x_host.shape[0]} "
                             f"samples of {ds.name}): every epoch is a single batch of {x_host.shape[0]}")
    x_tr = xp.asarray(x_host, dtype=dtype)
    x_te = normalize(xp.asarray(ds.x_test, dtype=dtype), ds.mean, ds.std)
    if not cfg.augment:
        x_tr = normalize(x_tr, ds.mean, ds.std)
    return Data(x_tr, xp.asarray(y_host), x_te, xp.asarray(ds.y_test), ds.input_shape, ds.num_classes,
                ds.mean, ds.std, ds.name, x_va, y_va)
