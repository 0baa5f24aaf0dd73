"""The packages import one way: the math (``nado``) ← the model (``models``) ← ``sampling`` ←
``algorithms`` ← the entry points (``train``, ``launch``, ``cli``); ``oracles``, ``data`` and
``eval`` stand beside (``data`` imports nothing of the package, ``oracles`` only ``data``,
``eval`` the model and sampling). Read from the source's import statements, function-level
imports included."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nemo_acft"

#: what each part may import (besides itself and the shared leaves: ``io_utils``, ``config``,
#: ``errors``, ``runlock``, ``progress``, ``quiet``, ``world``)
ALLOWED = {
    "nado": set(),
    "models": {"nado", "cpu_compat"},
    "sampling": {"models", "nado", "oracles"},
    "algorithms": {"sampling", "models", "nado", "data", "oracles", "eval"},
    "data": set(),
    "oracles": {"data"},
    "eval": {"models", "sampling", "nado", "data", "oracles"},
    "cpu_compat": set(),
    "io_utils": set(),
    "config": set(),
    "errors": set(), "runlock": {"errors", "io_utils"}, "progress": set(), "quiet": set(),
    "world": set(),
    # entry points: anything
    "train": None, "launch": None, "cli": None,
}
LEAVES = {"io_utils", "config", "errors", "runlock", "progress", "quiet", "world"}


def _part(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "nemo_acft" or name.startswith("nemo_acft."):
                parts = name.split(".")
                if len(parts) > 1:
                    yield node.lineno, parts[1]


def test_packages_import_one_way():
    bad = []
    files = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)
    assert len(files) > 30
    for path in files:
        part = _part(path)
        allowed = ALLOWED[part]
        if allowed is None:
            continue
        for line, target in _imports(path):
            if target == part or target in LEAVES and part not in LEAVES:
                continue
            if target not in allowed:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({part}) imports {target}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_cycle(tmp_path):
    """The checker itself: a data module importing the oracles is reported."""
    bad = tmp_path / "x.py"
    bad.write_text("from nemo_acft.oracles import LexiconOracle\n")
    assert list(_imports(bad)) == [(1, "oracles")]
    assert "oracles" not in ALLOWED["data"]
