"""The house stays easy to find one's way in: modules and classes of a size one can read, the
top of pipeline/ showing the architecture, the commands in their package."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.commands import VERBS

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")])
MAX_MODULE_LINES = 420  # "about 400"
MAX_CLASS_LINES = 200


def test_no_module_or_class_outgrows_a_read():
    assert len(CODE) > 50
    big = {}
    for path in CODE:
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            big[str(path.relative_to(ROOT))] = lines
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    big[f"{path.relative_to(ROOT)}:{node.name}"] = size
    assert big == {}, f"split these by role: {big}"


def test_the_top_of_the_package_shows_the_architecture():
    top = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(top) <= 12, top


def test_every_verb_is_a_module_and_the_cli_only_dispatches():
    for verb in VERBS:
        module = ROOT / "pipeline" / "commands" / f"{verb}.py"
        tree = ast.parse(module.read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assigned = {t.id for n in tree.body if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        assert {"arguments", "main"} <= names and {"NAME", "HELP", "EXAMPLE"} <= assigned, verb
    cli = ast.parse((ROOT / "pipeline" / "cli.py").read_text(encoding="utf-8"))
    functions = [n.name for n in cli.body if isinstance(n, ast.FunctionDef)]
    assert not [f for f in functions if f.startswith("cmd_")], functions
