"""SPEC.md is the index of the algorithm: every equation there has a test, and every citation points at it.

A citation is ``Eq. (3.7)``, ``Eq. 3.7``, ``Eqs. (4.1)-(4.3)`` or ``Eqs. 5.1-5.4`` in code, docstrings
or tests. A range expands to every equation of that section between its ends.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"^### \((\d+)\.(\d+)([a-z]?)\)", re.M)
CITE = re.compile(r"Eqs?\.\s*\(?(\d+)\.(\d+)([a-z]?)\)?(?:\s*[-–]\s*\(?(\d+)\.(\d+)([a-z]?)\)?)?")


def spec_equations() -> list[str]:
    text = (ROOT / "SPEC.md").read_text(encoding="utf-8")
    return [f"{a}.{b}{c}" for a, b, c in HEADING.findall(text)]


def _key(eq: str):
    m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)", eq)
    return int(m.group(1)), int(m.group(2)), m.group(3)


def citations(paths) -> dict[str, set[str]]:
    """Map each cited equation number to the files citing it (ranges expanded against SPEC.md)."""
    known = sorted(spec_equations(), key=_key)
    found: dict[str, set[str]] = {}
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for m in CITE.finditer(text):
            lo = f"{m.group(1)}.{m.group(2)}{m.group(3)}"
            hi = f"{m.group(4)}.{m.group(5)}{m.group(6)}" if m.group(4) else None
            cited = [lo]
            if hi is not None:
                cited = [e for e in known if _key(lo) <= _key(e) <= _key(hi)] or [lo, hi]
                cited += [lo, hi]
            for eq in cited:
                found.setdefault(eq, set()).add(str(path.relative_to(ROOT)))
    return found


def _files(*dirs):
    out = []
    for d in dirs:
        out += sorted((ROOT / d).rglob("*.py"))
    return [p for p in out if p.name != "test_spec.py"]


def _test_files():
    """Test modules (the example port under reference_tests/ports is a port, not a test)."""
    return [p for p in _files("tests", "reference_tests") if "ports" not in p.parts and p.name.startswith("test_")]


CHECKED_BY = re.compile(r"^— checked by: (.*)$", re.M)


def _equation_blocks():
    """(equation number, the text under its heading up to the next one) for every equation of SPEC.md."""
    text = (ROOT / "SPEC.md").read_text(encoding="utf-8")
    heads = list(HEADING.finditer(text))
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        yield f"{h.group(1)}.{h.group(2)}{h.group(3)}", text[h.end():end]


def _backticked_line(pattern) -> dict[str, list[str]]:
    """Per equation, the `names` on its first line matching ``pattern`` (empty when there is none)."""
    out = {}
    for eq, block in _equation_blocks():
        m = pattern.search(block)
        out[eq] = re.findall(r"`([^`]+)`", m.group(1)) if m else []
    return out


def checked_by_in_spec() -> dict[str, list[str]]:
    """The '— checked by:' list written under each equation of SPEC.md."""
    return _backticked_line(CHECKED_BY)


def test_spec_numbers_are_unique():
    eqs = spec_equations()
    assert eqs, "SPEC.md defines no numbered equations"
    dup = sorted({e for e in eqs if eqs.count(e) > 1})
    assert not dup, f"SPEC.md numbers these equations twice: {dup}"


def test_every_citation_exists_in_the_spec():
    """Code and tests cite only equations SPEC.md defines."""
    known = set(spec_equations())
    cited = citations(_files("pyeqprop", "tests", "reference_tests"))
    unknown = {eq: sorted(files) for eq, files in cited.items() if eq not in known}
    assert not unknown, f"cited equation numbers missing from SPEC.md: {unknown}"


def test_every_spec_equation_has_a_test():
    """Each numbered equation is cited by at least one test."""
    cited = citations(_test_files())
    missing = [eq for eq in spec_equations() if eq not in cited]
    assert not missing, f"SPEC.md equations no test cites: {missing}"


def test_checked_by_lists_are_current():
    """Each equation's '— checked by:' line in SPEC.md names exactly the test modules citing it."""
    cited = citations(_test_files())
    listed = checked_by_in_spec()
    stale = {eq: (sorted(files), sorted(cited.get(eq, set())))
             for eq, files in listed.items() if sorted(files) != sorted(cited.get(eq, set()))}
    assert not stale, f"update the '— checked by' lines of SPEC.md (listed, actual): {stale}"


def test_every_spec_equation_is_implemented_and_cited_in_code():
    """Each numbered equation is cited by the library code that implements it."""
    cited = citations(_files("pyeqprop"))
    missing = [eq for eq in spec_equations() if eq not in cited]
    assert not missing, f"SPEC.md equations no library code cites: {missing}"


def test_the_checker_can_fail():
    """The citation scanner finds a made-up number (so the tests above are not vacuous)."""
    text = '"""Implements Eq. (99.1) and Eqs. 3.1-3.2."""\n'
    found = {f"{m.group(1)}.{m.group(2)}" for m in CITE.finditer(text)}
    assert "99.1" in found and "3.1" in found


IMPLEMENTED_BY = re.compile(r"^— (`[^`]+`(?:, `[^`]+`)*)\s*$", re.M)


def implementations_in_spec() -> dict[str, list[str]]:
    """The '— `name`, …' line under each equation of SPEC.md: the functions that implement it."""
    return _backticked_line(IMPLEMENTED_BY)


def resolve(name: str):
    """The object a fully qualified name denotes (module, then attributes), and the docstrings around it:
    its own, its class's (for a method) and its module's."""
    import importlib
    import inspect

    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        chain = [obj]
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
            chain.append(obj)
        docs = [inspect.getdoc(o) or "" for o in chain]
        return obj, "\n".join(docs)
    raise ImportError(name)


def test_every_spec_equation_names_its_function():
    """Each numbered equation names, fully qualified, the functions that implement it; each name
    resolves, and its docstring (or its class's or module's) cites the equation."""
    impl = implementations_in_spec()
    unnamed = [eq for eq, names in impl.items() if not names]
    assert not unnamed, f"SPEC.md equations that name no implementing function: {unnamed}"
    bad = {}
    for eq, names in impl.items():
        for name in names:
            try:
                _, doc = resolve(name)
            except (ImportError, AttributeError) as exc:
                bad[f"{eq} {name}"] = f"does not resolve ({exc})"
                continue
            cited = {f"{m.group(1)}.{m.group(2)}{m.group(3)}" for m in CITE.finditer(doc)}
            known = sorted(spec_equations(), key=_key)
            for m in CITE.finditer(doc):  # ranges count for every equation between their ends
                if m.group(4):
                    lo, hi = f"{m.group(1)}.{m.group(2)}{m.group(3)}", f"{m.group(4)}.{m.group(5)}{m.group(6)}"
                    cited |= {e for e in known if _key(lo) <= _key(e) <= _key(hi)}
            if eq not in cited:
                bad[f"{eq} {name}"] = "its docstrings do not cite the equation"
    assert not bad, f"SPEC.md implementation names to fix: {bad}"


def test_the_name_check_can_fail():
    """A name that does not exist is reported as such (the check above is not vacuous)."""
    import pytest

    with pytest.raises((ImportError, AttributeError)):
        resolve("pyeqprop.model.crnn.CRNN.no_such_method")
    _, doc = resolve("pyeqprop.model.crnn.CRNN.phi")
    assert "3.2" in doc
