"""The run folder of a training job: its name, its exclusive claim, and the record of its resumes.

A job owns its folder from the moment it starts (after its configuration, data and network are known
to be good); nothing is created before, so a job that fails to start leaves nothing behind::

    RUN/config.toml        the configuration the run was started with (never rewritten)
    RUN/resumes.toml       what each resume changed, in order (only when a resume changed something)
    RUN/metrics.jsonl      one JSON object per finished epoch
    RUN/latest.npz         the checkpoint to resume from
    RUN/best.npz           the checkpoint with the best validation accuracy
    RUN/teacher.npz        the backprop teacher (trained once, then reused)
    RUN/curves.png         loss and accuracy per epoch (with matplotlib; or ``pyeqprop plot RUN``)

Claiming is atomic. ``config.toml`` is created exclusively (a complete temporary file hard-linked
to its name, which fails when the name exists), so of two jobs started at once into one folder
exactly one gets it and the other is told the folder holds a run. Without ``--out`` the folder is
``runs/<dataset>-<date>-<time>``, made with ``os.mkdir``; when that name is taken (another job
started in the same second, or an earlier folder) ``-2``, ``-3``, … is appended until one is free.

A folder holding ``config.toml`` but no ``latest.npz`` is a run that stopped before its first
checkpoint (or one still running that has not written it yet): ``--resume`` starts it again from the
beginning with its configuration, and reuses its cached teacher.

``config.toml`` keeps describing how the run was started. A resume that changes settings (``--resume
RUN --lr 0.01``) appends a ``[[resume]]`` table to ``resumes.toml`` with the position it continued
from and the keys it changed; the table is written only once the resumed job has saved its first
checkpoint, so a resume that fails or diverges before that leaves no trace, and the next plain
``--resume`` trains with the settings that made ``latest.npz``. The configuration of a run
(:func:`recorded_config`) is ``config.toml`` with every ``[[resume]]`` table applied in order.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

from .config import OPTIONS, ConfigError, TrainConfig, config_from_mapping, dump_toml, load_toml
from .errors import TrainingError

__all__ = ["RUN_FILES", "default_run_dir", "check_can_create", "check_fresh", "claim_run_dir", "has_run",
           "recorded_config", "changed_keys", "record_resume"]

RUN_FILES = ("config.toml", "resumes.toml", "metrics.jsonl", "latest.npz", "best.npz", "teacher.npz",
             "curves.png")
"""The files a run folder may hold (see the module docstring)."""

_MAX_SUFFIX = 10_000


def default_run_dir(cfg: TrainConfig, root: str | os.PathLike = "runs", stamp: str | None = None) -> Path:
    """The folder a job without ``out`` is named after: ``runs/<dataset>-<stamp>``, the stamp being the
    local date and time to the second (``20250131-235959``) unless given (:func:`claim_run_dir` appends
    ``-2``, ``-3``, … when the name is taken)."""
    return Path(root) / f"{cfg.dataset}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"


def _unwritable(run: Path, why: str) -> TrainingError:
    return TrainingError(f"output folder {str(run)!r} is not writable ({why}); choose another with --out")


def check_can_create(run: Path) -> None:
    """Raise :class:`TrainingError` early (before data is loaded) when ``run`` cannot become a run folder:
    a file stands where it or one of its parents should be, or the nearest existing folder is read-only.
    Creates nothing; the claim itself checks again."""
    p = Path(run)
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise _unwritable(Path(run), f"{p} is not a folder")
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise _unwritable(Path(run), f"{p} is read-only")


def has_run(run: Path) -> bool:
    """Whether ``run`` holds a run (its config.toml, a checkpoint or metrics)."""
    return any((Path(run) / name).exists() for name in ("config.toml", "latest.npz", "metrics.jsonl"))


def _taken(run: Path) -> TrainingError:
    if (run / "latest.npz").exists() or not (run / "config.toml").exists():
        held = "latest.npz" if (run / "latest.npz").exists() else "metrics.jsonl"
        return TrainingError(f"output folder {str(run)!r} already holds a run ({held}); continue it with "
                             f"--resume {run} or choose another --out")
    return TrainingError(f"output folder {str(run)!r} already holds a run that has no checkpoint yet (it stopped "
                         f"before its first one, or is still running); start it again from the beginning with "
                         f"--resume {run} (its config.toml; flags override) or choose another --out")


def check_fresh(run: Path) -> None:
    """A new run must not mix its files with an earlier run's: :class:`TrainingError` when ``run`` holds one."""
    if has_run(Path(run)):
        raise _taken(Path(run))


def _create_exclusive(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, complete or not at all; FileExistsError when it exists.

    The text goes to a temporary file first (flushed and fsynced), which is then hard-linked to
    ``path``: ``link`` fails on an existing name, atomically. Where hard links are not supported the
    file is created with O_EXCL instead (exclusive too, though a crash may leave it incomplete).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = text.encode("utf-8")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network or FAT file systems)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        tmp.unlink(missing_ok=True)


def _claim(run: Path, cfg: TrainConfig) -> None:
    """Make ``run`` this job's folder by creating its config.toml exclusively; :class:`TrainingError` when
    another run holds it."""
    if (run / "latest.npz").exists() or (run / "metrics.jsonl").exists():  # a run without config.toml
        raise _taken(run)
    try:
        _create_exclusive(run / "config.toml", dump_toml(cfg))  # its comments use SPEC.md symbols
    except FileExistsError:
        raise _taken(run) from None
    except OSError as exc:
        raise _unwritable(run, exc.strerror or str(exc)) from None


def claim_run_dir(cfg: TrainConfig, root: str | os.PathLike = "runs", stamp: str | None = None) -> Path:
    """Create this job's run folder and its config.toml, atomically, and return the folder.

    ``cfg.out`` when given (it may exist, empty or holding other files, but not a run); otherwise the
    first free one of ``default_run_dir(cfg, root, stamp)``, then that name with ``-2``, ``-3``, ….

    Raises
    ------
    TrainingError
        When ``cfg.out`` holds a run (naming ``--resume``), or the folder cannot be written.
    """
    if cfg.out:
        run = Path(cfg.out)
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(run, exc.strerror or str(exc)) from None
        _claim(run, cfg)
        return run
    base = default_run_dir(cfg, root, stamp)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(base, exc.strerror or str(exc)) from None
    for n in range(1, _MAX_SUFFIX):
        run = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            run.mkdir()  # atomic: of two jobs asking for one name, one gets FileExistsError
        except FileExistsError:
            continue
        except OSError as exc:
            raise _unwritable(run, exc.strerror or str(exc)) from None
        _claim(run, cfg)
        return run
    raise TrainingError(f"no free run folder name after {base} (tried {_MAX_SUFFIX - 1}); choose one with --out")


# ---------------------------------------------------------------------- resumes
def _resumes(run: Path) -> list[dict]:
    path = Path(run) / "resumes.toml"
    if not path.exists():
        return []
    records = load_toml(path).get("resume", [])
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("changed", {}), dict)
                                                for r in records):
        raise ConfigError(f"{path} is not a resume record: expected [[resume]] tables with a [resume.changed] "
                          "table each")
    return records


def recorded_config(run: str | os.PathLike) -> TrainConfig:
    """The configuration that made the run's latest checkpoint: config.toml, then each resume's changes.

    Raises
    ------
    TrainingError
        When ``run`` has no config.toml.
    ConfigError
        When config.toml or resumes.toml is malformed (naming the file, key and value).
    """
    path = Path(run) / "config.toml"
    if not path.exists():
        raise TrainingError(f"cannot resume: {path} does not exist (is {str(run)!r} a run folder?)")
    cfg = config_from_mapping(load_toml(path))
    for rec in _resumes(Path(run)):
        cfg = config_from_mapping(rec.get("changed", {}), cfg)
    return cfg


def changed_keys(cfg: TrainConfig, recorded: TrainConfig) -> dict:
    """The keys whose value in ``cfg`` differs from ``recorded`` (``out`` aside: --resume names the folder)."""
    return {k: getattr(cfg, k) for k in OPTIONS if k != "out" and getattr(cfg, k) != getattr(recorded, k)}


def record_resume(run: Path, changed: dict, epoch: int, batch: int) -> None:
    """Append a ``[[resume]]`` table to ``run/resumes.toml`` (atomically: the whole file is replaced)."""
    path = Path(run) / "resumes.toml"
    old = path.read_text(encoding="utf-8") if path.exists() else (
        "# pyeqprop: what each resume of this run changed, in order. config.toml holds the settings the run was\n"
        "# started with; --resume applies config.toml, then every table below, then its own flags.\n")
    at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = ["", "[[resume]]", f'at = "{at}"',
             f"epoch = {int(epoch)}  # the position it continued from: epochs done, and batches done in the next",
             f"batch = {int(batch)}", "", "[resume.changed]"]
    lines += [f"{k} = {OPTIONS[k].as_toml(v)}" for k, v in changed.items()]
    tmp = path.with_name(".resumes.toml.tmp")
    tmp.write_text(old + "\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
