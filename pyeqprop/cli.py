"""The ``pyeqprop`` command line: train, evaluate, plot, teacher, gdu-check, diagnose, bench, conformance, study.

The CLI is the application layer: it imports the library, never the other way round.
Known errors (bad config, missing or unwritable files, unavailable backends, missing optional
packages) print one ``error:`` line and exit with status 2; no traceback. A diverged run exits
with 3, an interrupted one with 128 + the signal's number: 130 after Ctrl-C (SIGINT), 143 after
SIGTERM (both save latest.npz first).
"""
from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _known_errors():
    from .backend import BackendError
    from .model.arch import ArchError
    from .train.config import ConfigError
    from .train.errors import TrainingError

    # OSError covers a missing file, a full disk or a file-size limit hit while writing the run folder
    errs = [BackendError, ArchError, ConfigError, TrainingError, OSError, ImportError]
    try:
        from .train.checkpoint import CheckpointError

        errs.append(CheckpointError)
    except ImportError:
        pass
    try:
        from .data.download import ChecksumError, CorruptArchiveError, DownloadError

        errs += [DownloadError, ChecksumError, CorruptArchiveError]
    except ImportError:
        pass
    return tuple(errs)


class _OptionHelpFormatter(argparse.HelpFormatter):
    """Adds a configuration flag's default and allowed values to its help text.

    The addition is made when help is printed, not when the parser is built, so allowed values
    defined in modules the CLI does not import at start-up (:class:`pyeqprop.train.config.Imported`)
    are imported for ``--help`` only. Overriding ``_get_help_string`` is how argparse's own
    ArgumentDefaultsHelpFormatter does it.
    """

    def _get_help_string(self, action):
        opt = getattr(action, "option", None)
        if opt is None:
            return super()._get_help_string(action)
        return opt.describe().replace("%", "%%")


def _add_train_flags(p):
    from .train.config import OPTIONS

    p.formatter_class = _OptionHelpFormatter
    p.add_argument("--config", metavar="FILE", help="TOML file with any of the keys below")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its latest checkpoint (a run "
                   "that has none starts again); its config.toml and resumes.toml give the settings, flags override")
    group = p.add_argument_group("configuration keys (flags override the config file; a boolean flag alone "
                                 "means true: --augment is --augment true)")
    for opt in OPTIONS.values():
        extra = {"nargs": "?", "const": "true"} if opt.type is bool else {}
        action = group.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                                    help=opt.help.replace("%", "%%"), **extra)
        action.option = opt  # read by _OptionHelpFormatter


def _overrides(ns):
    from .train.config import OPTIONS

    return {name: getattr(ns, name) for name in OPTIONS if getattr(ns, name, None) is not None}


def _config_for(ns):
    from .train.config import config_from_mapping, load_toml

    if getattr(ns, "resume", None):
        from .train.runfolder import recorded_config

        base = recorded_config(ns.resume)  # config.toml, then what each earlier resume changed
    else:
        base = None
    # defaults (or the run's recorded configuration on resume) < --config FILE < flags
    if getattr(ns, "config", None):
        base = config_from_mapping(load_toml(ns.config), base)
    return config_from_mapping(_overrides(ns), base)


def _exit_code(exc) -> int:
    """The exit status the command line gives an exception (see the module docstring)."""
    from .train.errors import TrainingDiverged

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, TrainingDiverged):
        return EXIT_DIVERGED
    if isinstance(exc, (*_known_errors(), ValueError)):
        return EXIT_USAGE
    return 1


def _cmd_train(ns):
    from .train.comm import world
    from .train.parallel import run_on_ranks

    comm = world()  # the MPI ranks under mpiexec -n N: every rank runs this command (pyeqprop.train.parallel)
    return run_on_ranks(comm, lambda: _train_job(ns, comm), _exit_code)


def _train_job(ns, comm):
    from .train.errors import TrainingDiverged
    from .train.loop import train
    from .train.parallel import everywhere

    cfg = everywhere(comm, lambda: _config_for(ns))
    try:
        res = train(cfg, resume=ns.resume, comm=comm)
    except TrainingDiverged as exc:
        if comm.is_root:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if res.interrupted:
        return 128 + int(res.signal) if res.signal else EXIT_INTERRUPTED  # EXIT_INTERRUPTED or EXIT_TERMINATED
    if not comm.is_root:
        return 0
    line = f"test accuracy: EP student {100 * res.test_acc:.2f}%"
    if res.teacher_test_acc is not None:
        line += f" | backprop teacher (same architecture, feed-forward) {100 * res.teacher_test_acc:.2f}%"
    print(line + f"  [{res.seconds:.0f}s, run folder {res.run_dir}]")
    return 0


def _cmd_evaluate(ns):
    from .train.evaluate import evaluate_run, gradient_agreement

    if ns.gradients:
        gradient_agreement(ns.path, batches=ns.gradients, dataset=ns.dataset, backend=ns.backend)
        return 0
    evaluate_run(ns.path, dataset=ns.dataset, backend=ns.backend)
    return 0


def _cmd_plot(ns):
    from .train.curves import plot_run

    print(f"wrote {plot_run(ns.run, ns.out)}")
    return 0


def _cmd_teacher(ns):
    from .train.teacher import run_teacher_cli

    return run_teacher_cli(_config_for(ns), ns.save)


def _cmd_gdu(ns):
    from .diagnostics.gdu import run_gdu_cli

    return run_gdu_cli(ns)


def _cmd_diagnose(ns):
    from .diagnostics.signals import run_diagnose_cli

    return run_diagnose_cli(ns)


def _cmd_bench(ns):
    if ns.what == "ops":
        from .bench.ops import run_ops_bench

        run_ops_bench(repeats=ns.repeats, backend=ns.backend, dtype=ns.dtype, quick=ns.quick, peer=ns.peer,
                      threads=ns.threads)
        return 0
    if ns.what == "ep":
        from .bench.ep import run_ep_bench

        return run_ep_bench(ns)
    if ns.what == "memory":
        from .bench.memory import run_memory_bench

        return run_memory_bench(ns)
    if ns.what == "precision":
        from .bench.precision import run_precision_bench

        return run_precision_bench(ns)
    if ns.what == "scaling":
        from .bench.scaling import run_scaling_bench

        return run_scaling_bench(ns)
    raise AssertionError(ns.what)


def _cmd_conformance(ns):
    from .conformance import run_conformance_cli

    return run_conformance_cli(ns)


def _cmd_study(ns):
    from .study.depth import run_study_cli
    from .study.workers import StudyStopped

    try:
        return run_study_cli(ns)
    except StudyStopped as exc:  # every running run saved latest.npz; --resume continues
        print(f"\n{exc}", file=sys.stderr)
        return 128 + exc.signum


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .backend import BACKENDS, DTYPES

    parser = argparse.ArgumentParser(prog="pyeqprop", description="Equilibrium Propagation for convolutional CRNNs "
                                     "(reference implementation). Run 'pyeqprop train' for the default job.")
    parser.add_argument("--version", action="version", version=f"pyeqprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="train a CRNN with EP (default: digits, symmetric EP + local errors + distillation)")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("evaluate", help="test accuracy of a run folder or checkpoint")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--dataset", default=None, help="data set to score on (default: the run's own); it must have "
                                                    "the run's input shape and classes")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="array backend to evaluate on (default: the run's own); checkpoints hold host arrays, so "
                        "a run trained on cupy can be evaluated with --backend numpy")
    p.add_argument("--gradients", type=int, default=0, metavar="N",
                   help="instead: the run's gradient estimate against the equilibrium gradient (Eq. 5.7) on its "
                        "first N training batches, cosine and norm ratio per layer, and (symmetric estimator) the "
                        "largest response asymmetry of Eq. 4.9")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("plot", help="draw a run's curves.png (loss on a log scale, accuracy) from its metrics.jsonl")
    p.add_argument("run", metavar="RUN", help="the run folder")
    p.add_argument("--out", metavar="PNG", default=None, help="where to write the figure (default: RUN/curves.png)")
    p.set_defaults(func=_cmd_plot)
    p = sub.add_parser("teacher", help="train the backprop teacher only and save it")
    p.add_argument("--save", metavar="FILE", default="teacher.npz")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_teacher)
    p = sub.add_parser("gdu-check", help="EP vs BPTT per parameter tensor, and the GDU figure")
    try:
        from .diagnostics.gdu import add_gdu_arguments

        add_gdu_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=_cmd_gdu)
    p = sub.add_parser("diagnose", help="per-layer signal magnitudes for plain EP and each intermediate-signal setting")
    try:
        from .diagnostics.signals import add_diagnose_arguments

        add_diagnose_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=_cmd_diagnose)
    p = sub.add_parser("bench", help="benchmarks: ops, ep, memory, precision, scaling")
    p.add_argument("what", choices=("ops", "ep", "memory", "precision", "scaling"))
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contender (after one warm-up); the median "
                                                          "is reported")
    p.add_argument("--peer", choices=("none", "torch"), default="none",
                   help="time the same work in PyTorch, interleaved with ours (torch is imported only then)")
    p.add_argument("--backend", default="numpy", choices=BACKENDS, help="array backend of our side")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="floating dtype of states and parameters")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="bench ops: limit NumPy's BLAS and torch to N threads (default: as configured); bench ep "
                        "always reports 1 and 2 threads")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--case", choices=("digits", "laborieux"), default="digits",
                   help="bench scaling: the EP step timed at 1 and 2 MPI ranks (--repeats: alternating rounds)")
    p.add_argument("--tol", type=float, default=1e-5, help="bench ep: the tolerance the settling table settles to")
    p.add_argument("--checkpoint", default=None, metavar="NPZ",
                   help="bench ep: settle a trained digits net (a run's latest.npz) instead of the initial one")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("conformance", help="run the conformance vectors against an implementation")
    p.add_argument("--adapter", default=None, metavar="MODULE:OBJECT")
    p.add_argument("--vectors", default=None, metavar="DIR")
    p.set_defaults(func=_cmd_conformance)
    p = sub.add_parser("study", help="experiments: 'depth' (plain EP vs intermediate signals, shallow vs deep)")
    p.add_argument("which", choices=("depth",))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_study)
    return parser


class _ConsoleHandler(logging.Handler):
    """The library's log records as the CLI prints them: INFO as plain lines on stdout, warnings and
    errors on stderr as ``warning: …``. The streams are looked up at each record (tests swap them)."""

    def emit(self, record):
        try:
            msg = self.format(record)
            if record.levelno >= logging.WARNING:
                print(f"{record.levelname.lower()}: {msg}", file=sys.stderr, flush=True)
            else:
                print(msg, flush=True)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


def _console_logging():
    """Route the ``pyeqprop`` logger to the console for one command; returns a function that undoes it."""
    logger = logging.getLogger("pyeqprop")
    handler = _ConsoleHandler()
    previous = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def undo():
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]

    return undo


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "command", None):
        parser.print_help()
        return EXIT_USAGE
    undo_logging = _console_logging()
    try:
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and returns by itself)
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        undo_logging()


if __name__ == "__main__":
    sys.exit(main())
