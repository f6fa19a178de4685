"""The package's folders are its layers: each module imports only from its own layer and those below it."""

import ast
from pathlib import Path

import pytest

from tests.support.processes import ROOT

PACKAGE = ROOT / "federated"
# Bottom to top. leader and learner are one level: both sit on net, neither imports the other. privacy is
# arithmetic like core, on its level: each uses the other (DP-SGD builds on training, aggregation on DP noise).
LAYERS = ["common", "core|privacy", "wire", "net", "leader|learner", "tools"]
BASE = ("model", "utils")  # the design card's modules at the top, which users edit: they import nothing of ours


def level(module: str) -> int:
    """The layer index of a module of the package (federated.X.y)."""
    layer = module.split(".")[1]
    return next(index for index, names in enumerate(LAYERS) if layer in names.split("|"))


def imports(path: Path) -> list[str]:
    """Every module a file imports, wherever in it (functions too: a lazy import is still a dependency)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return found


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py" or path.parent != PACKAGE)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_a_module_imports_nothing_from_a_layer_above_its_own(path):
    own = module_of(path)
    ours = {name for name in imports(path) if name.startswith("federated.") and name.count(".") >= 1}
    upward = sorted(
        name
        for name in ours
        if name.split(".")[1] in {n for layer in LAYERS for n in layer.split("|")} and level(name) > level(own)
    )
    assert not upward, f"{own} imports from above its layer: {upward}"
    if own.split(".")[1] in ("leader", "learner"):
        other = "learner" if own.split(".")[1] == "leader" else "leader"
        assert not [name for name in ours if name.split(".")[1] == other], f"{own} imports the {other}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_module_imports_the_tests(path):
    assert not [name for name in imports(path) if name.split(".")[0] in ("tests", "conftest", "live")]


@pytest.mark.parametrize("name", BASE)
def test_the_user_edited_modules_import_nothing_of_the_package(name):
    assert not [module for module in imports(ROOT / f"{name}.py") if module.split(".")[0] == "federated"]


def test_the_layer_rule_is_not_vacuous():
    # the parser finds imports, including those inside functions, and ranks them
    assert "federated.core.strategies" in imports(PACKAGE / "leader" / "config.py")
    assert level("federated.tools.launch") > level("federated.leader.app") > level("federated.core.layout")
    assert level("federated.learner.app") == level("federated.leader.app")
