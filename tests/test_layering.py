"""The package's layering, read from its imports (ast): backend → ops → model → learning → the application.

A module may import only from its own layer or the layers below it, and never a private name
(``_x``) of another module; outside ``model/`` no module touches a private attribute of another
object (``net._x``); and ``learning/`` uses the network only through the energy protocol of
SPEC.md Eq. 3.12. The application's packages are ordered too: data and testing, then train,
diagnostics, study, bench, conformance and the cli, each free to import those before it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pyeqprop"

RANK = {"backend": 0, "_shapes": 0, "ops": 1, "model": 2, "learning": 3, "data": 4, "testing": 4, "train": 5,
        "diagnostics": 6, "study": 7, "bench": 8, "conformance": 9, "cli": 10, "__main__": 10}
"""The layer of each top-level module or package of pyeqprop; a module imports only ranks ≤ its own."""

PROTOCOL = {"init_state", "nudge", "drive", "step", "dphi_dtheta", "dphi_ds", "phi", "cost", "hessian_vector",
            "dphi_dtheta_tangent", "check_state", "check_input", "logits", "params", "cost_terms", "layers", "act",
            "xp", "dtype", "device", "readout_term", "num_classes", "arch", "add_cost_term", "conv_layer_indices",
            "state_shapes", "network_param_names", "update", "dtype_name", "input_drive",
            "dphi_dtheta_diff", "symmetric_hessian_vector", "layer_weights",
            "free_base", "delta_drive", "delta_update", "dphi_dtheta_delta_diff"}
"""The network members a learning algorithm may use (SPEC.md Eq. 3.12)."""


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "vectors" not in p.parts)


def _name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _rank(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "pyeqprop" or len(parts) < 2:
        return None  # the package façade pyeqprop/__init__.py, or a third-party module
    return RANK[parts[1]]


def _imports(path: Path, pkg: Path = PKG):
    """(line, imported module, imported names) of every import in ``path``, relative ones resolved."""
    me = _name(path, pkg)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod, [a.name for a in node.names]


def _violations(paths=None, pkg: Path = PKG):
    out = []
    for path in _modules() if paths is None else paths:
        me = _name(path, pkg)
        mine = _rank(me)
        for line, mod, names in _imports(path, pkg):
            if not mod.startswith("pyeqprop"):
                continue
            theirs = _rank(mod)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"{me}:{line} imports {mod} (layer {theirs} above its own {mine})")
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    out.append(f"{me}:{line} imports the private name {n} from {mod}")
    return out


def test_no_import_goes_up_the_layers_or_takes_a_private_name():
    assert _violations() == []


def test_every_package_module_has_a_layer():
    tops = {_name(p).split(".")[1] for p in _modules() if _name(p) != "pyeqprop"}
    assert tops <= set(RANK), f"modules with no layer in RANK: {sorted(tops - set(RANK))}"


PICKLE_RECONSTRUCTORS = {"multiarray._reconstruct", "numeric._frombuffer"}
"""NumPy's own pickle reconstructors, which the CIFAR loader's safe unpickler allows by name."""
DOCUMENTED = {"os._exit"}
"""Standard-library functions whose documented, public name starts with an underscore (a study worker whose
study is gone exits with ``os._exit``: no cleanup handler may wait for the dead parent)."""


def _private_attribute_uses(path: Path):
    """``obj._x`` where obj is neither self/cls, super(), nor a class or function of the same module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    local = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            v = node.value
            if isinstance(v, ast.Name) and (v.id in ("self", "cls") or v.id in local):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            if ast.unparse(node) in PICKLE_RECONSTRUCTORS | DOCUMENTED:
                continue
            yield node.lineno, ast.unparse(node)


def test_outside_model_no_module_touches_a_private_attribute():
    bad = [f"{_name(p)}:{line} uses {expr}" for p in _modules() if _rank(_name(p)) not in (None, RANK["model"])
           for line, expr in _private_attribute_uses(p)]
    assert bad == []


def _net_members(path: Path):
    """Attributes read from a variable called ``net`` (the network a learning function receives)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "net":
            yield node.lineno, node.attr


def test_learning_uses_the_network_through_the_energy_protocol():
    """Eq. 3.12: settling, the estimators, BPTT and the signals read only protocol members of the network."""
    learning = [p for p in _modules() if _name(p).startswith("pyeqprop.learning")]
    assert learning
    bad = [f"{_name(p)}:{line} uses net.{attr}" for p in learning for line, attr in _net_members(p)
           if attr not in PROTOCOL]
    assert bad == []


# ---------------------------------------------------------------------- the checks can fail
@pytest.mark.parametrize("source, expected", [
    ("from ..learning.settle import settle\n", "layer 3 above its own 2"),
    ("def f():\n    from pyeqprop.train.loop import train\n", "layer 5 above its own 2"),
    ("from .crnn import _helper\n", "private name _helper"),
])
def test_the_layering_check_can_fail(tmp_path, source, expected):
    probe = tmp_path / "pyeqprop" / "model" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source, encoding="utf-8")
    found = _violations([probe], tmp_path / "pyeqprop")
    assert any(expected in v for v in found), found


def test_the_private_attribute_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(net):\n    return net._top_down, self_like._x\n", encoding="utf-8")
    assert [e for _, e in _private_attribute_uses(probe)] == ["net._top_down", "self_like._x"]
