"""The shape of the code, checked rather than reviewed: small modules, functions that fit a screen.

The import layers and the no-cycles rule are import-linter contracts (pyproject.toml, run by
`make test` before pytest).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "cnnlab"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
WHY = "# Over 60 lines on purpose:"  # the one-line reason a longer function must give near its top


def _long_functions_without_reason(path: Path, root: Path = SRC) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
            head = lines[node.lineno - 1: body[0].lineno]  # the signature, docstring and first statement
            if length > MAX_FUNCTION_LINES and not any(line.strip().startswith(WHY) for line in head):
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_module_over_400_lines():
    sizes = {p.relative_to(SRC): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert len(sizes) > 30  # the package was found
    assert not {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}


def test_long_functions_say_why(tmp_path):
    assert not [f for p in sorted(SRC.rglob("*.py")) for f in _long_functions_without_reason(p)]
    # the check itself finds a long function without its reason, and accepts one with it
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "a.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "b.py").write_text(f"def long():\n    {WHY} a table of cases.\n{body}\n")
    assert _long_functions_without_reason(tmp_path / "a.py", tmp_path) == ["a.py:1 long (61 lines)"]
    assert _long_functions_without_reason(tmp_path / "b.py", tmp_path) == []
