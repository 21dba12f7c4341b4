"""The modules of job/, launcher/ and contracts/ import each other without a cycle, counting the imports inside
functions too (a cycle hidden by an in-function import is still one), and an in-function import of one of them
says why in a comment (keeping `--help` light, or torch off the launcher)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("job", "launcher", "contracts")


def _files() -> dict[str, Path]:
    """Module name -> file, for every module of the three packages (a package's __init__ is the package)."""
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = p.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, list[str]]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            # `from pkg import mod` names the module; `from pkg.mod import name` the module it comes from
            out.append((node, [f"{node.module}.{a.name}" for a in node.names] + [node.module]))
        elif isinstance(node, ast.Import):
            out.append((node, [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]))
    return out


def _graph() -> dict[str, set[str]]:
    files = _files()
    graph = {}
    for name, p in files.items():
        targets = {t for _, names in _imports(ast.parse(p.read_text())) for t in names}
        # a package's __init__ is not an edge back from its own modules (`from job import env` loads job first)
        graph[name] = {t for t in targets if t in files and t != name and not name.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_hidden_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_job_launcher_and_contracts_import_without_a_cycle():
    graph = _graph()
    assert graph["job.train"] >= {"job.result", "job.full", "job.sft"}  # the in-function ones are counted
    assert "launcher.cost.estimate" in graph["launcher.verbs.estimate"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_an_in_function_import_of_ours_says_why():
    bare = []
    for p in sorted(_files().values()):
        src = p.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node, names in _imports(fn):
                if names and "#" not in lines[node.end_lineno - 1]:
                    bare.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert not bare, bare
