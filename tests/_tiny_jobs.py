"""The tiny training job that the run-folder and reliability tests share, and their comparisons.

Synthetic 8×8 images (183 training samples at the default test and validation fractions = 3 batches
of 64), one conv layer, T1 = 5; random-sign EP and augmentation both draw from the per-batch
generator, so resuming exercises the derived randomness as well as the saved parameters and momentum.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pyeqprop.train.checkpoint import load_checkpoint
from pyeqprop.train.config import TrainConfig

N_BATCHES = 3  # ceil(183 / 64) training batches
TINY = dict(dataset="synthetic", arch="c4m", T1=5, T2=2, epochs=2, teacher_epochs=1, batch_size=64,
            progress="none", estimator="random-sign", augment=True)
TINY_FLAGS = ["--dataset", "synthetic", "--arch", "c4m", "--T1", "5", "--T2", "2", "--teacher-epochs", "1",
              "--batch-size", "64", "--progress", "none", "--estimator", "random-sign", "--augment", "true"]


def quiet(*args, **kwargs):
    pass


def tiny(out, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **overrides})


def metrics(run) -> list[dict]:
    """metrics.jsonl without the wall-clock column, which is the one thing allowed to differ."""
    rows = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_state(run_a, run_b, name="latest.npz"):
    """Parameters (and their dtypes), momentum buffers, step count and position of two checkpoints are
    bitwise equal."""
    a, b = load_checkpoint(Path(run_a, name)), load_checkpoint(Path(run_b, name))
    assert list(a.params) == list(b.params)
    for k in a.params:
        assert a.params[k].dtype == b.params[k].dtype
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=f"parameter {k}")
    for k, v in a.optimizer_state["velocity"].items():
        np.testing.assert_array_equal(v, b.optimizer_state["velocity"][k], err_msg=f"velocity {k}")
    assert a.optimizer_state["steps"] == b.optimizer_state["steps"]
    assert a.progress["position"] == b.progress["position"]


def wait_for(predicate, proc, timeout, what):
    """Poll ``predicate`` until it holds; fail (killing ``proc`` on a timeout) if the process ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
