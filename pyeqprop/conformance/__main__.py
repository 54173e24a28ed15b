"""``python -m pyeqprop.conformance regenerate [--out DIR]`` and ``… run [--adapter M:O] [--vectors DIR]``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyeqprop.conformance",
                                     description="conformance vectors for ports of pyeqprop")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("regenerate", help="rebuild every case and write the .npz files and manifest.json")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: pyeqprop/conformance/vectors, the package data)")
    p = sub.add_parser("run", help="run the vectors against an adapter (as 'pyeqprop conformance')")
    p.add_argument("--adapter", default=None, metavar="MODULE:OBJECT")
    p.add_argument("--vectors", default=None, metavar="DIR")
    ns = parser.parse_args(argv)
    if ns.command == "regenerate":
        from . import regenerate
        from .format import load_manifest

        path = regenerate(ns.out)
        manifest = load_manifest(path.parent)
        total = sum(f.stat().st_size for f in path.parent.glob("*.npz")) + path.stat().st_size
        print(f"wrote {len(manifest['cases'])} cases to {path.parent} ({total / 1024:.0f} KiB)")
        return 0
    if ns.command == "run":
        from .adapter import run_conformance_cli

        return run_conformance_cli(ns)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
