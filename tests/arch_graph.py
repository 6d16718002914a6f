"""The import graph of ``proxy/``, read from the source with ``ast`` (nothing is imported).

Used by tests/test_architecture.py (issue 23, acceptance 1). Every ``import`` and
``from ... import`` counts, at module level or inside a function (a function-level import
still ties the two modules together; it only hides the cycle from Python). An edge goes
to the most specific proxy module named: ``from proxy.fold import sse`` is an edge to
``proxy.fold.sse``, ``from proxy.fold import Fold`` an edge to ``proxy.fold``.
"""
from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "proxy"


@dataclass(frozen=True)
class Import:
    """One import statement's arrow: ``source`` imports ``target`` (a dotted module name)."""

    source: str
    target: str
    line: int
    in_function: bool

    def where(self) -> str:
        kind = "function-level" if self.in_function else "module-level"
        return f"{module_path(self.source)}:{self.line} ({kind})"


def module_path(module: str) -> str:
    """The file a module name lives in, relative to the repository (for messages)."""
    base = ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return str((base / "__init__.py").relative_to(ROOT))
    return str(base.with_suffix(".py").relative_to(ROOT))


def source_modules(package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (``proxy.fold.sse``; a package is its ``__init__``)."""
    found: dict[str, Path] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return module in modules and modules[module].name == "__init__.py"


def _resolve_relative(module: str, level: int, name: str | None, modules: dict[str, Path]) -> str:
    # The package a relative import is relative to: a package's own name for its __init__,
    # else the module's parent; each extra dot goes one package up.
    base = module.split(".") if _is_package(module, modules) else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, modules: dict[str, Path]):
        self.module = module
        self.modules = modules
        self.depth = 0  # > 0 inside a function (or lambda) body
        self.imports: list[tuple[str, int, bool]] = []  # (dotted name, line, in_function)
        self.names: list[tuple[str, str, int]] = []  # (module, name taken from it, line) of "from m import name"

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.append((alias.name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = _resolve_relative(self.module, node.level, node.module, self.modules)
        else:
            base = node.module or ""
        for alias in node.names:
            # "from pkg import sub" names the submodule when there is one, else pkg itself.
            candidate = f"{base}.{alias.name}"
            target = candidate if candidate in self.modules else base
            self.imports.append((target, node.lineno, self.depth > 0))
            if target == base:
                self.names.append((base, alias.name, node.lineno))


_PARSED: dict[tuple[str, Path], _Collector] = {}


def _collect(module: str, modules: dict[str, Path]) -> _Collector:
    key = (module, modules[module])
    if key in _PARSED:
        return _PARSED[key]
    tree = ast.parse(modules[module].read_text(encoding="utf-8"), filename=str(modules[module]))
    collector = _Collector(module, modules)
    collector.visit(tree)
    _PARSED[key] = collector
    return collector


def imports_of(module: str, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """Every dotted name ``module`` imports (proxy modules and third-party ones alike)."""
    return _collect(module, modules).imports


def names_taken(package: str = PACKAGE) -> list[tuple[str, str, str, int]]:
    """(importer, proxy module, name, line) for every ``from <proxy module> import <name>`` of a
    name that is not a module (a function, class, constant)."""
    modules = source_modules(package)
    found = []
    for module in modules:
        for source, name, line in _collect(module, modules).names:
            if source in modules:
                found.append((module, source, name, line))
    return found


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific proxy module a dotted import name refers to (None if not ours)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def graph(package: str = PACKAGE) -> tuple[dict[str, Path], list[Import], list[Import]]:
    """(modules, arrows between proxy modules, imports of anything else)."""
    modules = source_modules(package)
    internal: list[Import] = []
    external: list[Import] = []
    for module in modules:
        for name, line, in_function in imports_of(module, modules):
            owner = _owning_module(name, modules) if name.split(".")[0] == package else None
            if owner is None:
                external.append(Import(module, name, line, in_function))
            elif owner != module:
                internal.append(Import(module, owner, line, in_function))
    return modules, internal, external


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    succ: dict[str, set[str]] = {}
    for edge in edges:
        succ.setdefault(edge.source, set()).add(edge.target)
        succ.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    for root in sorted(succ):
        if root in index:
            continue
        # iterative Tarjan: (node, iterator over its successors)
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def cycle_path(component: list[str], edges: list[Import]) -> list[Import]:
    """One concrete loop through a component, as the import statements that make it."""
    members = set(component)
    by_source: dict[str, list[Import]] = {}
    for edge in sorted(edges, key=lambda e: (e.source, e.target, e.line)):
        if edge.source in members and edge.target in members:
            by_source.setdefault(edge.source, []).append(edge)
    start = component[0]
    # breadth-first from start back to start: the shortest loop through it
    previous: dict[str, Import] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        following = []
        for node in frontier:
            for edge in by_source.get(node, []):
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, previous[path[0].source])
                    return path
                if edge.target not in seen:
                    seen.add(edge.target)
                    previous[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    return []


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    text = path.read_text(encoding="utf-8")
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstring_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in skip:
            continue
        for line in range(token.start[0], token.end[0] + 1):
            if line not in docstring_lines:
                lines.add(line)
    return len(lines)


def request_globals(package: str = PACKAGE) -> list[tuple[str, str, int]]:
    """(module, attribute, line) for every ``g.<attribute>`` of a module that takes Flask's ``g``."""
    modules = source_modules(package)
    found = []
    for module, path in modules.items():
        if ("flask", "g") not in {(source, name) for source, name, _ in _collect(module, modules).names}:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "g":
                found.append((module, node.attr, node.lineno))
    return found
