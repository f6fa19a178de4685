"""Objects are complete when built: no class of the package first sets an attribute outside __init__ (what exists
only later, such as the learner's model after the leader's first state, lives in an object built from it)."""

import ast

import pytest

from tests.support.processes import ROOT

CHECKED = sorted((ROOT / "federated").rglob("*.py"))


def self_attributes(function: ast.FunctionDef) -> set[str]:
    """The attributes of self that function assigns."""
    assigned = set()
    for node in ast.walk(function):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AnnAssign, ast.AugAssign))
            else []
        )
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id == "self":
                    assigned.add(part.attr)
    return assigned


def dataclass_fields(cls: ast.ClassDef) -> set[str]:
    """The fields a dataclass's generated __init__ sets (its annotated class attributes); none for other classes."""
    decorators = {ast.unparse(decorator).split("(")[0] for decorator in cls.decorator_list}
    if not decorators & {"dataclass", "dataclasses.dataclass"}:
        return set()
    return {
        node.target.id for node in cls.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def attributes_set_late(source: str) -> dict[str, set[str]]:
    """For each class of source, the attributes its methods other than __init__ set and __init__ does not (a
    dataclass's __init__ sets its fields)."""
    late = {}
    for cls in (node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)):
        methods = [node for node in cls.body if isinstance(node, ast.FunctionDef)]
        at_init = dataclass_fields(cls).union(*(self_attributes(m) for m in methods if m.name == "__init__"))
        later = set().union(*(self_attributes(m) for m in methods if m.name != "__init__")) - at_init
        if later:
            late[cls.name] = later
    return late


@pytest.mark.parametrize("path", CHECKED, ids=lambda path: str(path.relative_to(ROOT)))
def test_objects_are_complete_when_built(path):
    assert attributes_set_late(path.read_text()) == {}


def test_the_check_sees_an_attribute_first_set_after_construction():
    source = (
        "class Half:\n    def __init__(self):\n        self.a = 1\n    def connect(self):\n        self.model = 2\n"
    )
    assert attributes_set_late(source) == {"Half": {"model"}}


def test_a_dataclass_field_set_later_is_complete_and_an_undeclared_attribute_is_not():
    source = """
@dataclass
class Counted:
    count: int = 0

    def add(self):
        self.count += 1
        self.extra = 1
"""
    assert attributes_set_late(source) == {"Counted": {"extra"}}
