"""The package layout: no module imports a module that imports it back, and loading a config
imports no part of the running daemon."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from triggers import registry

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "triggers")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports, at module level or in a function; those
    under `if TYPE_CHECKING:` are for the type checker only and do not count."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If)
        and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in block.body
        for node in ast.walk(statement)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return (found & known) - {name}


def import_graph(*, kinds: bool) -> dict[str, set[str]]:
    """Module -> the modules it imports. With `kinds`, a module that imports the registry
    imports every trigger kind's module too: registry.kind() does, by name, on first use."""
    known = modules()
    graph = {name: imports(name, path, set(known)) for name, path in known.items()}
    if kinds:
        plugins = {kind.partition(":")[0] for kind in registry.KINDS.values()}
        for name in graph:
            if name == "triggers.registry" or "triggers.registry" in graph[name]:
                graph[name] |= plugins - {name}
    return graph


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph(kinds=True)
    mutual = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph[b])
    assert mutual == []


def test_import_statements_form_no_cycle():
    # Without the registry's imports by name: those run once every module is loaded, and the
    # webhook kind does reach daemon.config again through the HTTP server and the dispatcher.
    graph = import_graph(kinds=False)
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> None:
        if name in path:
            cycles.append(path[path.index(name) :] + [name])
            return
        if name in done:
            return
        path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert cycles == []


def test_loading_a_config_imports_no_http_stack():
    # Every CLI command loads the config: a webhook trigger's settings must not bring in aiohttp
    # or the parts that serve it (the HTTP listeners, dispatcher, store, pool), which load only
    # when the daemon runs. A fresh interpreter: this one has imported them all already.
    code = (
        "import json, sys\n"
        "from daemon.config import load_config\n"
        f"load_config({str(ROOT / 'config' / 'example.toml')!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=True)
    loaded = json.loads(run.stdout)
    assert "triggers.webhook" in loaded  # the example has a webhook trigger, and its kind loaded
    serving = ("aiohttp", "daemon.http", "daemon.dispatcher", "daemon.store", "daemon.pool")
    assert [m for m in loaded if any(m == s or m.startswith(f"{s}.") for s in serving)] == []
