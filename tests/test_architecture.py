"""The import rules of issue 23 (acceptance 1), checked from the source of ``proxy/``.

Nothing is imported: ``tests/arch_graph.py`` builds the graph from ``ast``, counting
module-level and function-level imports alike. The rules:

- no import cycle among proxy modules;
- nothing outside ``proxy/routes/`` imports ``proxy.routes`` (routes are the top layer),
  except the app factory (``COMPOSITION_ROOT``), which registers them;
- ``proxy/fold/`` and ``proxy/translate/`` import neither flask, werkzeug, requests nor
  urllib3, directly or through another proxy module; ``proxy/state/`` imports no
  web framework (flask, werkzeug), directly or through another proxy module;
- no module imports another module's private name (``from .manage import _holder``): what
  two modules share is public, in the module that owns it;
- no module adds routes to another module's Blueprint (``from .manage import bp``): each
  route module defines its blueprint and the app factory registers it in one visible call;
- a route module (``proxy/routes/**.py``) holds at most ``ROUTE_CODE_LINES`` lines of code
  (not blank, not only a comment, not a docstring).
- a request's state lives in its record (``models.Record``, ``g.record``): no module keeps
  anything else on Flask's ``g`` (the string-keyed ``g.log``, ``g.client``, ... it replaced).

What breaks a rule today is listed below by name (issue 23: to be removed). A violation
not listed fails the test; a listed one that no longer exists fails it too, so the lists
only shrink.
"""
from __future__ import annotations

from tests import arch_graph
from tests.arch_graph import Import, code_lines, cycle_path, cycles, graph, module_path

ROUTE_CODE_LINES = 120
COMPOSITION_ROOT = "proxy.web"  # create_app registers every blueprint: the one module above routes
PURE_PACKAGES = ("proxy.fold", "proxy.translate")
PURE_FORBIDDEN = ("flask", "werkzeug", "requests", "urllib3")
STATE_PACKAGES = ("proxy.state",)
STATE_FORBIDDEN = ("flask", "werkzeug")

# issue 23: to be removed. Each entry: the modules of one import cycle (a strongly
# connected component, exactly).
KNOWN_CYCLES: dict[str, frozenset[str]] = {
}

# issue 23: to be removed. (importer, imported) pairs reaching up into proxy.routes.
KNOWN_UPWARD: dict[str, tuple[str, str]] = {
}

# issue 23: to be removed. (importer, forbidden library) pairs, where the import may be
# through other proxy modules.
KNOWN_LIBRARY: dict[str, tuple[str, str]] = {
}

# issue 23: to be removed. (importer, module, private name) triples.
KNOWN_PRIVATE: dict[str, tuple[str, str, str]] = {
}

# (importer, module) pairs adding views to another module's Blueprint: none left.
KNOWN_FOREIGN_BLUEPRINT: dict[str, tuple[str, str]] = {}

# issue 23: to be removed. Route modules over ROUTE_CODE_LINES, and what takes them under it:
KNOWN_LONG_ROUTES: dict[str, str] = {
}


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _edges(edges: list[Import]) -> str:
    return "\n".join(f"  {e.source} -> {e.target}   at {e.where()}" for e in edges)


def _check_known(kind: str, found: dict, known: dict) -> None:
    """No violation beyond the named list, and every listed one still there (then remove it)."""
    listed = {value: name for name, value in known.items()}
    new = [value for value in found if value not in listed]
    gone = [name for value, name in listed.items() if value not in found]
    message = []
    if new:
        message.append(f"new {kind} (fix it; do not add it to the list):\n"
                       + "\n".join(str(found[value]) for value in new))
    if gone:
        message.append(f"fixed {kind} still listed as known (remove from the list): {sorted(gone)}")
    assert not message, "\n".join(message)


MODULES, INTERNAL, EXTERNAL = graph()


def test_the_graph_sees_the_package():
    # a sanity floor: a parser that found nothing would pass every rule
    assert "proxy.web" in MODULES and "proxy.fold.sse" in MODULES and "proxy.routes.openai" in MODULES
    assert any(e.source == "proxy.web" and e.target == "proxy.routes.openai" for e in INTERNAL)
    assert any(e.in_function for e in INTERNAL), "function-level imports must be counted"


def test_no_import_cycles():
    found = {}
    for component in cycles(INTERNAL):
        path = cycle_path(component, INTERNAL)
        found[frozenset(component)] = (f"cycle among {component}; one loop:\n{_edges(path)}")
    _check_known("import cycle", found, KNOWN_CYCLES)


def test_nothing_imports_upward_into_routes():
    found: dict[tuple[str, str], str] = {}
    for edge in INTERNAL:
        if _in(edge.target, ("proxy.routes",)) and not _in(edge.source, ("proxy.routes",)) \
                and edge.source != COMPOSITION_ROOT:
            found.setdefault((edge.source, edge.target), "")
            found[(edge.source, edge.target)] += _edges([edge]) + "\n"
    _check_known("import up into proxy.routes", found, KNOWN_UPWARD)


def test_no_module_takes_another_modules_private_name():
    found: dict[tuple[str, str, str], str] = {}
    for importer, source, name, line in arch_graph.names_taken():
        if name.startswith("_") and not name.startswith("__"):
            found[(importer, source, name)] = f"  {module_path(importer)}:{line} imports {name} from {source}"
    _check_known("import of another module's private name", found, KNOWN_PRIVATE)


def test_route_modules_register_only_their_own_blueprint():
    found: dict[tuple[str, str], str] = {}
    for importer, source, name, line in arch_graph.names_taken():
        if name == "bp" and importer != COMPOSITION_ROOT:
            found[(importer, source)] = f"  {module_path(importer)}:{line} adds routes to {source}.bp"
    _check_known("module adding routes to another module's Blueprint", found, KNOWN_FOREIGN_BLUEPRINT)


def _reach(library: str) -> dict[str, list[str]]:
    """For each proxy module that imports the library, itself or through proxy modules: one chain."""
    direct: dict[str, Import] = {}
    for edge in EXTERNAL:
        if edge.target.split(".")[0] == library and edge.source not in direct:
            direct[edge.source] = edge
    succ: dict[str, list[Import]] = {}
    for edge in INTERNAL:
        succ.setdefault(edge.source, []).append(edge)
    chains: dict[str, list[str]] = {}
    for start in MODULES:
        # breadth first: the shortest chain from start to a module importing the library
        previous: dict[str, Import | None] = {start: None}
        frontier = [start]
        while frontier and start not in chains:
            following = []
            for node in frontier:
                if node in direct:
                    last = direct[node]
                    steps = [f"  {last.source} imports {last.target}   at {last.where()}"]
                    while previous[node] is not None:
                        edge = previous[node]
                        steps.insert(0, f"  {edge.source} -> {edge.target}   at {edge.where()}")
                        node = edge.source
                    chains[start] = steps
                    break
                for edge in succ.get(node, []):
                    if edge.target not in previous:
                        previous[edge.target] = edge
                        following.append(edge.target)
            frontier = following
    return chains


def test_pure_packages_import_no_web_or_http_library():
    found: dict[tuple[str, str], str] = {}
    for packages, forbidden in ((PURE_PACKAGES, PURE_FORBIDDEN), (STATE_PACKAGES, STATE_FORBIDDEN)):
        for library in forbidden:
            for module, chain in _reach(library).items():
                if _in(module, packages):
                    found[(module, library)] = f"{module} reaches {library}:\n" + "\n".join(chain)
    _check_known("web/HTTP library import from a pure package", found, KNOWN_LIBRARY)


def test_route_modules_are_short():
    found: dict[str, str] = {}
    lines = {}
    for module, path in MODULES.items():
        if module.startswith("proxy.routes."):  # routes/manage/ and any other route package too
            lines[module] = code_lines(path)
            if lines[module] > ROUTE_CODE_LINES:
                found[module] = f"{module_path(module)}: {lines[module]} code lines (at most {ROUTE_CODE_LINES})"
    _check_known("route module over the line budget", {m: text for m, text in found.items()},
                 {name: name for name in KNOWN_LONG_ROUTES})  # the value says why, the key is the entry


def test_request_state_lives_in_its_record():
    uses = arch_graph.request_globals()
    found = [f"  {module_path(module)}:{line} uses g.{attribute}" for module, attribute, line in uses
             if attribute != "record"]
    assert not found, "request state kept on flask.g beside its record (put it on models.Record):\n" + "\n".join(found)
    assert any(module == "proxy.web" and attribute == "record" for module, attribute, _ in uses)  # the scan sees


def test_code_lines_skip_blanks_comments_and_docstrings(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Module\n\ndocstring."""\n# a comment\n\nimport os  # trailing\n\n\n'
                      'def f():\n    """Doc."""\n    return (1,\n            2)\n\n\nTEXT = """a\nb"""\n')
    # import os; def f():; return (1,; 2); TEXT = """a; b"""
    assert arch_graph.code_lines(sample) == 6


# Acceptance 3: one chat-stream reader. Each rule of reading a chat stream is defined in exactly one module
# (a second definition, by name, is a second reader), and the fold and the bridges' reader both use it.
ONE_DEFINITION = {
    "call_slot": "proxy.fold.tool_calls",              # which tool call a delta belongs to (index rules)
    "ToolCalls": "proxy.fold.tool_calls",              # the one tool-call assembler (late names, arguments)
    "ToolCall": "proxy.fold.tool_calls",               # what a call holds as its deltas arrive
    "Halves": "proxy.fold.guard",                      # surrogate halves split between streamed fragments
    "slow_json": "proxy.fold.base",                    # what orjson refuses, read with the fold's guards
    "refused_data": "proxy.fold.base",                 # a data line orjson refused: blank, [DONE] or slow JSON
    "json_at": "proxy.fold.base",                      # a JSON value at an offset, numbers as slow_json reads them
    "kept_finish": "proxy.fold.base",                  # which finish_reason a choice keeps (the last explicit)
    "repair_surrogates": "proxy.fold.guard",           # UTF-16 halves joined or replaced
    "completion_as_chunk": "proxy.translate.chat_stream",  # a JSON answer to a stream request, as one chunk
    "TextRun": "proxy.translate.chat_reads",           # the fast path's one event
    "read_batches": "proxy.translate.chat_reads",      # upstream reads -> batches (framing + fast path)
    "chat_events": "proxy.translate.chat_reads",       # a batch -> the events every bridge's writer takes
}
# The one module that may parse JSON with the standard library: the slow path (the readers of chat streams,
# a JSON answer, the check of an answer relayed as it came, the repair of a model's tool arguments) and the
# value at an offset (the usage scan of a native Gemini stream's tail) all read numbers with its guards.
STDLIB_JSON = {"proxy.fold.base"}


def _defined_names(path) -> set[str]:
    import ast
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_each_chat_stream_rule_is_defined_once_and_shared():
    where: dict[str, set[str]] = {name: set() for name in ONE_DEFINITION}
    for module, path in MODULES.items():
        for name in _defined_names(path) & set(ONE_DEFINITION):
            where[name].add(module)
    assert {name: sorted(found) for name, found in where.items()} == {
        name: [module] for name, module in ONE_DEFINITION.items()}
    # the fold and the bridges' reader take the tool-call rule from the same place
    users = {edge.source for edge in INTERNAL if edge.target == "proxy.fold.tool_calls"}
    assert {"proxy.fold.chat", "proxy.translate.chat_stream"} <= users
    parsers = {edge.source for edge in EXTERNAL if edge.target == "json"}
    assert parsers <= STDLIB_JSON, f"a second slow JSON path: {sorted(parsers - STDLIB_JSON)}"


def _argument_bookkeeping(path) -> list[int]:
    """Lines of ``path`` that accumulate a tool call's arguments: ``<x>.args.append/extend/insert(...)``,
    ``<x>.args += ...``, ``<x>["arguments"] += ...``, or an import of the index rule ``call_slot``."""
    import ast
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("append", "extend", "insert") \
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "args":
            found.append(node.lineno)
        elif isinstance(node, ast.AugAssign) and (
                (isinstance(node.target, ast.Attribute) and node.target.attr == "args")
                or (isinstance(node.target, ast.Subscript) and isinstance(node.target.slice, ast.Constant)
                    and node.target.slice.value == "arguments")):
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and any(alias.name == "call_slot" for alias in node.names):
            found.append(node.lineno)
    return found


def test_tool_calls_are_assembled_in_one_place():
    # A second tool-call bookkeeping (a reader keeping its own per-call argument fragments, or its own use of
    # the index rule) is a second reader: every reader takes its calls from fold/tool_calls.ToolCalls.
    assembler = ONE_DEFINITION["ToolCalls"]
    elsewhere = {module: lines for module, path in MODULES.items()
                 if module != assembler and (lines := _argument_bookkeeping(path))}
    assert not elsewhere, f"tool-call arguments accumulated outside {assembler}: {elsewhere}"
    assert _argument_bookkeeping(MODULES[assembler])  # the check sees the one place it allows
    users = {edge.source for edge in INTERNAL if edge.target == assembler}
    assert {"proxy.fold.chat", "proxy.fold.choice", "proxy.translate.chat_stream"} <= users
