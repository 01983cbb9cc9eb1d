"""Which project code decides a stage's numbers, read from the import graph.

A stage names its own module; its code version hashes the source of that module
and of every project module it imports, transitively: module-level and
function-level imports alike (parsed with ``ast``, never executed), plus the
parent packages whose ``__init__`` an import runs. A stage whose graph reaches
the model loader also hashes the versions of the libraries that run models.

Two kinds of module are followed through their module-level imports only
(``LEAVES``): the stage plumbing, whose deferred imports only decide where shards
run (its store, which writes every artifact, is still followed), and a plugin
registry, which imports every plugin by name; a stage that runs a plugin adds that
plugin's module as a root of its own, so editing one plugin re-runs only the
stages that use it.
Imports the parser cannot see (``importlib.import_module`` of a computed name)
are not followed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import sys
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from pathlib import Path

MODEL_LOADER = "alignflow.workers.models"
MODEL_LIBRARIES = ("torch", "transformers", "peft", "vllm", "deepspeed")
LEAVES = frozenset(
    {
        "alignflow.tasks.stage",  # commit, cache and shard plumbing: it moves rows, it does not make them
        "alignflow.genies.interventions",  # the registry: imports every intervention
    }
)


def installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


class CodeGraph:
    """The project's modules, what each imports, and code versions over them.
    ``read_source`` and ``library_version`` are injectable so a test can edit a
    module or bump a library without touching the installation."""

    def __init__(
        self,
        project: str = "alignflow",
        leaves: frozenset[str] = LEAVES,
        read_source: Callable[[Path], str] = Path.read_text,
        library_version: Callable[[str], str] = installed_version,
    ):
        self.project = project
        self.leaves = leaves
        self.read_source = read_source
        self.library_version = library_version
        self._specs: dict[str, ModuleSpec | None] = {}
        self._imports: dict[tuple[str, bool], frozenset[str]] = {}
        self._versions: dict[tuple[str, ...], str] = {}

    def in_project(self, name: str) -> bool:
        return name == self.project or name.startswith(self.project + ".")

    def spec(self, name: str) -> ModuleSpec | None:
        """Where a module's file is, asking the import finders with the parent's
        search path (as the import system does) instead of importing the parent."""
        if name not in self._specs:
            parent = name.rpartition(".")[0]
            path = None
            if parent:
                parent_spec = self.spec(parent)
                if parent_spec is None or parent_spec.submodule_search_locations is None:
                    self._specs[name] = None
                    return None
                path = list(parent_spec.submodule_search_locations)
            self._specs[name] = _find_spec(name, path)
        return self._specs[name]

    def source(self, name: str) -> str:
        """A module's source; a namespace package (no ``__init__``) has none."""
        spec = self.spec(name)
        if spec is not None and spec.origin is None and spec.submodule_search_locations is not None:
            return ""
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise LookupError(f"module '{name}': no Python source file found (is it installed?)")
        return self.read_source(Path(spec.origin))

    def imports(self, name: str, deferred: bool = True) -> frozenset[str]:
        """The project modules that running ``name`` imports directly, with their parent
        packages; ``deferred=False`` leaves out the imports inside its functions."""
        if (name, deferred) not in self._imports:
            is_package = self.spec(name).submodule_search_locations is not None  # type: ignore[union-attr]
            package = name if is_package else name.rpartition(".")[0]
            found = set()
            for candidate in _imported_names(ast.parse(self.source(name)), package, deferred):
                if self.in_project(candidate) and self.spec(candidate) is not None:
                    found.update(_with_parents(candidate))
            found.discard(name)
            self._imports[(name, deferred)] = frozenset(found)
        return self._imports[(name, deferred)]

    def modules(self, *roots: str) -> frozenset[str]:
        """``roots`` and every project module they import, transitively (leaves through their
        module-level imports only)."""
        seen: set[str] = set()
        todo = [parent for root in roots for parent in _with_parents(root) if self.in_project(parent)]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo.extend(self.imports(name, deferred=name not in self.leaves) - seen)
        return frozenset(seen)

    def runs_model(self, *roots: str) -> bool:
        return MODEL_LOADER in self.modules(*roots)

    def code_version(self, *roots: str) -> str:
        """Hash of the source of every module ``roots`` reach, and of the model
        libraries' versions where they reach the model loader."""
        if roots not in self._versions:
            digest = hashlib.sha256()
            modules = self.modules(*roots)
            for name in sorted(modules):
                digest.update(f"{name}\0{self.source(name)}\0".encode())
            if MODEL_LOADER in modules:
                for library in MODEL_LIBRARIES:
                    digest.update(f"{library}=={self.library_version(library)}\0".encode())
            self._versions[roots] = digest.hexdigest()[:16]
        return self._versions[roots]


@functools.cache
def project_graph() -> CodeGraph:
    """This process's graph of the installed project (source files do not change under a run)."""
    return CodeGraph()


def _find_spec(name: str, path: list[str] | None) -> ModuleSpec | None:
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(name, path) if find_spec else None
        if spec is not None:
            return spec
    return None


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b, a.b.c]``: importing a module first runs its packages' ``__init__``."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imported_names(tree: ast.AST, package: str, deferred: bool = True) -> set[str]:
    """Absolute names an ``import`` or ``from ... import`` may load: for ``from x import y``
    both ``x`` and ``x.y`` (y may be a submodule; the caller keeps the names that are modules).
    Imports under ``if TYPE_CHECKING:`` never run and are skipped; so are those inside
    functions unless ``deferred``."""
    names: set[str] = set()
    for node in _runtime_nodes(tree, deferred):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _runtime_nodes(node: ast.AST, deferred: bool = True):
    """Every node below ``node`` except the body of ``if TYPE_CHECKING:``, which never runs,
    and, unless ``deferred``, the bodies of functions (run only when called)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other, deferred)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and not deferred:
            continue
        else:
            yield child
            yield from _runtime_nodes(child, deferred)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str | None, level: int, package: str) -> str:
    if not level:
        return module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{module}" if module else base
