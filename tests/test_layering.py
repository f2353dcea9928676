"""runphi's layering, checked on its import graph as read statically with ``ast``.

The layers, top to bottom: front ends (``runphi/cli.py``, ``runphi/verbs/``), the core
(``runphi/core/``, the monitor and the shared lower modules), backends
(``runphi/backends/base.py`` the protocol, ``runphi/backends/registry.py`` the one
registry, ``runphi/backends/<name>/`` each backend). The simulator under
``tools/jailhouse_sim/`` stands beside runphi, not inside it.

Every import counts as a dependency, wherever it is written: at module level, under
``if TYPE_CHECKING:``, inside a function. So does ``importlib.import_module(...)`` (or
``__import__``) with a literal argument, or an f-string with a literal prefix: such a
dynamic import is an import of the prefix's package, and it may reach any module under
that package, since the rest of the name is chosen at run time. Each failure lists the
offending edges as ``file:line → module``.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNPHI_DIR = REPO_ROOT / "runphi"
SIMULATOR_DIR = REPO_ROOT / "tools" / "jailhouse_sim"

RUNTIME = "module-level"
TYPE_ONLY = "TYPE_CHECKING"
LAZY = "function-local"

REGISTRY = "runphi.backends.registry"
FRONT_ENDS = ("runphi.verbs", "runphi.cli")
FRONT_END_MODULES = ("runphi.cli", "runphi.__main__")
ABOVE_BACKENDS = ("runphi.verbs", "runphi.cli", "runphi.core", "runphi.monitor",
                  "runphi.monitor_console", "runphi.cell_events", "runphi.context",
                  "runphi.forward", "runphi.store", "runphi.hooks", "runphi.container")

# Edges the walker must see, one per way of importing, so a broken walker cannot pass
# every rule by finding nothing: (file, module, kind, dynamic).
KNOWN_RUNPHI_EDGES = (
    ("runphi/verbs/create.py", "runphi.core.create", RUNTIME, False),
    ("runphi/backends/jailhouse/backend.py", "runphi.backends.base", RUNTIME, False),
    ("runphi/verbs/run.py", "runphi.verbs.create", RUNTIME, False),
    ("runphi/context.py", "runphi.core.node", TYPE_ONLY, False),
    ("runphi/core/start.py", "runphi.hooks", LAZY, False),
    ("runphi/backends/registry.py", "runphi.backends", LAZY, True),
)
KNOWN_SIMULATOR_EDGES = (
    ("tools/jailhouse_sim/cli.py", "tools.jailhouse_sim.spawn", RUNTIME, False),
    ("tools/jailhouse_sim/cli.py", "tools.jailhouse_sim.board", LAZY, False),
)
MIN_RUNPHI_MODULES = 50
MIN_SIMULATOR_MODULES = 15


def under(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or inside it, by dotted parts (``a.bc`` is not under ``a.b``)."""
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` (written at ``path:line``) loads ``target``."""

    source: str
    path: Path
    line: int
    target: str
    kind: str
    call: str | None = None
    """For a dynamic import, the call as written; ``target`` is then its literal package prefix."""

    @property
    def dynamic(self) -> bool:
        return self.call is not None

    def may_reach(self, prefix: str) -> bool:
        """Whether this import can load ``prefix`` or a module under it.

        A static import loads its target; a dynamic one any module under its prefix.
        """
        return under(self.target, prefix) or (self.dynamic and under(prefix, self.target))

    def __str__(self) -> str:
        where = f"{self.path.relative_to(REPO_ROOT).as_posix()}:{self.line} → {self.target}"
        if self.dynamic:
            return f"{where}.<chosen at run time> ({self.kind}, dynamic: {self.call})"
        return f"{where} ({self.kind})"


@dataclass(frozen=True)
class Graph:
    modules: dict[str, Module]
    edges: tuple[Edge, ...]
    unresolved: tuple[str, ...]
    """Dynamic imports whose name has no literal prefix: ``file:line: call``."""

    def owner(self, target: str) -> str | None:
        """The module of this graph that loading ``target`` runs (``pkg.mod.attr`` → ``pkg.mod``)."""
        parts = target.split(".")
        while parts:
            if ".".join(parts) in self.modules:
                return ".".join(parts)
            parts.pop()
        return None


def discover(package_dir: Path, skip: Collection[str] = ()) -> dict[str, Module]:
    """Every module of the package at ``package_dir`` by dotted name, but those under subdirectories ``skip``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        inside = path.relative_to(package_dir).parts
        if "__pycache__" in inside or inside[0] in skip:
            continue
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_call(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr in ("import_module", "__import__")
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def _literal_prefix(node: ast.expr) -> tuple[str, bool] | None:
    """A string expression's literal text up to its first placeholder, and whether that is all of it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value, True
    if not isinstance(node, ast.JoinedStr):
        return None
    text = ""
    for part in node.values:
        if not isinstance(part, ast.Constant):
            return text, False
        text += part.value
    return text, True


def _only_assignment(scope: ast.AST, name: str) -> ast.expr | None:
    """The value bound to ``name`` in ``scope`` when it is bound exactly once by a plain assignment."""
    values = [node.value for node in ast.walk(scope)
              if isinstance(node, ast.Assign)
              and any(isinstance(target, ast.Name) and target.id == name for target in node.targets)]
    values += [node.value for node in ast.walk(scope)
               if isinstance(node, ast.AnnAssign) and node.value is not None
               and isinstance(node.target, ast.Name) and node.target.id == name]
    return values[0] if len(values) == 1 else None


class _ImportCollector(ast.NodeVisitor):
    """The imports of one module, each tagged with whether it runs at load time."""

    def __init__(self, module: Module, known: Collection[str], tree: ast.Module):
        self.module = module
        self.known = known
        self.edges: list[Edge] = []
        self.unresolved: list[str] = []
        self._scopes: list[ast.AST] = [tree]
        self._type_checking = False

    def _kind(self) -> str:
        if len(self._scopes) > 1:
            return LAZY
        return TYPE_ONLY if self._type_checking else RUNTIME

    def _add(self, node: ast.AST, target: str, call: str | None = None) -> None:
        self.edges.append(Edge(self.module.name, self.module.path, node.lineno, target, self._kind(), call))

    def _scope(self, node: ast.AST) -> None:
        self._scopes.append(node)
        self.generic_visit(node)
        self._scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer, self._type_checking = self._type_checking, True
        for statement in node.body:
            self.visit(statement)
        self._type_checking = outer
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node)
        self._add(node, base)
        # ``from pkg import mod`` loads the submodule too, not just the package.
        for alias in node.names:
            if f"{base}.{alias.name}" in self.known:
                self._add(node, f"{base}.{alias.name}")

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = self.module.name if self.module.is_package else self.module.name.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - (node.level - 1)])
        return f"{base}.{node.module}" if node.module else base

    def visit_Call(self, node: ast.Call) -> None:
        if _is_import_call(node) and node.args:
            self._add_dynamic(node)
        self.generic_visit(node)

    def _add_dynamic(self, node: ast.Call) -> None:
        argument = node.args[0]
        if isinstance(argument, ast.Name):
            argument = _only_assignment(self._scopes[-1], argument.id) or argument
        prefix = _literal_prefix(argument)
        text, complete = prefix if prefix else ("", False)
        # An open name ``runphi.backends.{x}`` is a lookup in the package ``runphi.backends``.
        target = text if complete else text.rpartition(".")[0]
        if not target or target.startswith("."):
            where = self.module.path.relative_to(REPO_ROOT).as_posix()
            self.unresolved.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            return
        self._add(node, target, call=ast.unparse(node))


def walk(modules: dict[str, Module]) -> Graph:
    """The import graph of ``modules``: every import they write, to any module, by any means."""
    edges: list[Edge] = []
    unresolved: list[str] = []
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        collector = _ImportCollector(module, modules.keys(), tree)
        collector.visit(tree)
        edges += collector.edges
        unresolved += collector.unresolved
    return Graph(modules, tuple(edges), tuple(unresolved))


@cache
def runphi_graph() -> Graph:
    return walk(discover(RUNPHI_DIR))


@cache
def simulator_graph() -> Graph:
    return walk(discover(SIMULATOR_DIR, skip={"tests"}))


def backend_names() -> list[str]:
    """Each backend: a package directory under ``runphi/backends/``."""
    return sorted(path.name for path in (RUNPHI_DIR / "backends").iterdir()
                  if (path / "__init__.py").is_file())


def report(rule: str, edges: Iterable[Edge]) -> str:
    return rule + ":\n  " + "\n  ".join(sorted(dict.fromkeys(str(edge) for edge in edges)))


def _strongly_connected(nodes: Iterable[str], successors: dict[str, set[str]]) -> Iterator[set[str]]:
    """Tarjan's strongly connected components of the graph ``successors``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> Iterator[set[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in successors.get(node, ()):
            if successor not in index:
                yield from visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            yield component

    for node in nodes:
        if node not in index:
            yield from visit(node)


def import_cycles(graph: Graph, kinds: Collection[str]) -> list[list[Edge]]:
    """Each cycle among the graph's modules through static imports of ``kinds``, as the edges forming it.

    Dynamic imports are left out: which module they load is decided at run time.
    A module naming itself (a package importing from its own ``__init__``) is no cycle.
    """
    inner: list[tuple[str, Edge]] = []
    for edge in graph.edges:
        owner = graph.owner(edge.target)
        if edge.kind in kinds and not edge.dynamic and owner and owner != edge.source:
            inner.append((owner, edge))
    successors: dict[str, set[str]] = {}
    for owner, edge in inner:
        successors.setdefault(edge.source, set()).add(owner)
    return [[edge for owner, edge in inner if edge.source in component and owner in component]
            for component in _strongly_connected(sorted(graph.modules), successors) if len(component) > 1]


def _check_known_edges(graph: Graph, known: Iterable[tuple[str, str, str, bool]], at_least: int) -> None:
    seen = {(edge.path.relative_to(REPO_ROOT).as_posix(), edge.target, edge.kind, edge.dynamic)
            for edge in graph.edges}
    missing = [edge for edge in known if edge not in seen]
    assert not missing, f"the walker misses imports it must see (or the code moved: update the list): {missing}"
    assert len(graph.modules) >= at_least, f"only {len(graph.modules)} modules found: {sorted(graph.modules)}"


def test_the_walker_sees_runphi_imports() -> None:
    """The walker finds runphi's modules and each way of importing (so no rule passes vacuously)."""
    graph = runphi_graph()
    _check_known_edges(graph, KNOWN_RUNPHI_EDGES, MIN_RUNPHI_MODULES)
    assert "jailhouse" in backend_names()


def test_the_walker_sees_simulator_imports() -> None:
    """The walker finds the simulator's modules (not its tests) and resolves its relative imports."""
    graph = simulator_graph()
    _check_known_edges(graph, KNOWN_SIMULATOR_EDGES, MIN_SIMULATOR_MODULES)
    assert not [name for name in graph.modules if under(name, "tools.jailhouse_sim.tests")]


def test_every_dynamic_import_is_resolved() -> None:
    """Every ``import_module``/``__import__`` in runphi and the simulator names a literal package
    prefix, so no import escapes the rules below."""
    unresolved = runphi_graph().unresolved + simulator_graph().unresolved
    assert not unresolved, "dynamic imports the walker cannot place:\n  " + "\n  ".join(unresolved)


def test_only_the_backend_and_the_registry_import_a_backend() -> None:
    """No runphi module but ``runphi/backends/<name>/`` itself and the registry imports
    ``runphi.backends.<name>`` or anything under it (the protocol ``runphi.backends.base``
    and the registry are for everyone)."""
    graph = runphi_graph()
    offending = [edge for name in backend_names() for edge in graph.edges
                 if edge.may_reach(f"runphi.backends.{name}")
                 and not under(edge.source, f"runphi.backends.{name}") and edge.source != REGISTRY]
    assert not offending, report("a backend's modules imported from outside it and the registry", offending)


def test_backends_never_import_upward() -> None:
    """Nothing under ``runphi/backends/`` imports a front end, the core, the monitor or the
    state/hook/forwarding modules above it."""
    graph = runphi_graph()
    offending = [edge for edge in graph.edges if under(edge.source, "runphi.backends")
                 and any(edge.may_reach(upper) for upper in ABOVE_BACKENDS)]
    assert not offending, report("backend modules importing upward", offending)


def test_the_core_never_imports_a_front_end() -> None:
    """Only the front ends (``runphi/verbs/``, ``runphi/cli.py``, ``runphi/__main__.py``) import
    ``runphi.verbs`` or ``runphi.cli``."""
    graph = runphi_graph()
    offending = [edge for edge in graph.edges
                 if not under(edge.source, "runphi.verbs") and edge.source not in FRONT_END_MODULES
                 and any(edge.may_reach(front_end) for front_end in FRONT_ENDS)]
    assert not offending, report("front ends imported from below", offending)


def test_runphi_imports_nothing_from_tools() -> None:
    """runphi ships without ``tools/``: no runphi module imports ``tools`` or anything under it."""
    offending = [edge for edge in runphi_graph().edges if edge.may_reach("tools")]
    assert not offending, report("runphi modules importing tools", offending)


def test_the_simulator_imports_nothing_from_runphi() -> None:
    """The simulator (``tools/jailhouse_sim/`` but its tests) stays independent of runphi, so
    the two cross-check each other: it imports nothing under ``runphi``."""
    offending = [edge for edge in simulator_graph().edges if edge.may_reach("runphi")]
    assert not offending, report("simulator modules importing runphi", offending)


def test_no_import_cycles() -> None:
    """runphi's module-level imports (the ones run at load time) form no cycle.

    Function-local imports run later and cannot deadlock loading. Cycles that only
    ``TYPE_CHECKING`` imports close are listed in the message for information.
    """
    graph = runphi_graph()
    load_time = import_cycles(graph, {RUNTIME})
    closed = {frozenset(edge.source for edge in cycle) for cycle in load_time}
    typing_only = [cycle for cycle in import_cycles(graph, {RUNTIME, TYPE_ONLY})
                   if frozenset(edge.source for edge in cycle) not in closed]
    message = "\n".join(report("import cycle at load time", cycle) for cycle in load_time)
    if typing_only:
        message += "\n(information) cycles closed by TYPE_CHECKING imports:\n" + "\n".join(
            report("cycle", cycle) for cycle in typing_only)
    assert not load_time, message
