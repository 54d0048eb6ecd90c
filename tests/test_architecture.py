"""The shape of the tree: layers as packages, no import circles, small modules and classes, and
docs/architecture.md naming only modules that exist (issue 10)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "trisocks"
# the codec twins and the message codec are long by nature: one format, one file
SIZE_EXEMPT = {"wire/_relay_py.py", "wire/protocol.py"}
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300
LAYERS = ("wire", "net", "policy", "tunnel", "management")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ["trisocks", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every trisocks module ``name`` imports, wherever the import is (inside functions and
    TYPE_CHECKING blocks too: a circle through either is still a circle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from pkg import sub" imports the submodule when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_layers_are_packages():
    for layer in LAYERS:
        assert (SRC / layer / "__init__.py").is_file(), f"no package {layer}"
    flat = sorted(p.name for p in SRC.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "_version.py"], f"modules outside the layers: {flat}"
    assert (SRC / "cli" / "__init__.py").is_file(), "the command line is a package of its own"


def test_policy_sits_beside_net():
    """The policy package (rules, pacers, limits) is used by tunnel and management, and
    depends on nothing but itself and wire: the data path may call it, it never calls back."""
    known = modules()
    for name, path in known.items():
        if name.startswith("trisocks.policy"):
            outside = {t for t in imports_of(name, path, known)
                       if not t.startswith(("trisocks.policy", "trisocks.wire"))}
            assert not outside, f"{name} imports {outside}"


def test_no_import_circles():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    # a package's __init__ importing its own submodules is not a circle through the package
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and
                                                      known[t].name == "__init__.py")}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_and_classes_are_small():
    too_big = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        text = path.read_text()
        lines = text.count("\n")
        if rel not in SIZE_EXEMPT and lines > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{rel}: class {node.name}: {size} lines")
    assert not too_big, "\n".join(too_big)


def test_architecture_doc_names_only_modules_that_exist():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"\b([a-z_]+(?:/[a-z_]+)*\.(?:py|pyx))\b", doc))
    assert named, "docs/architecture.md names no module"
    files = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")} | {"wire/_relay.pyx"}
    basenames = {Path(f).name for f in files}
    missing = sorted(n for n in named
                     if n not in files and n not in basenames and not (ROOT / n).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
