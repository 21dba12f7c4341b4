"""job/'s modules import each other without a cycle, counting the imports inside functions too (a cycle hidden
by an in-function import is still one), and an in-function import of job/ or contracts/ says why in a comment."""
from __future__ import annotations

import ast
from pathlib import Path

JOB = Path(__file__).resolve().parents[1] / "job"
# The memory planner's own imports (job/check.py's fit functions), moving to contracts/ (issue #28, helper costs).
PLANNER = {"full_fit_estimate", "full_disk_gib", "fit_estimate"}


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, list[str]]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("job", "contracts"):
            if node.module == "job":
                out.append((node, [f"job.{a.name}" for a in node.names]))
            else:
                out.append((node, [node.module]))
        elif isinstance(node, ast.Import):
            out.append((node, [a.name for a in node.names if a.name.startswith("job.")]))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {f"job.{p.stem}" for p in JOB.glob("*.py")}
    graph = {}
    for p in JOB.glob("*.py"):
        targets = {t for _, names in _imports(ast.parse(p.read_text())) for t in names}
        graph[f"job.{p.stem}"] = {t for t in targets if t in modules and t != f"job.{p.stem}"}
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


def test_job_modules_import_without_a_cycle():
    graph = _graph()
    assert graph["job.train"] >= {"job.result", "job.full", "job.sft"}  # the in-function ones are counted
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_an_in_function_import_of_job_or_contracts_says_why():
    bare = []
    for p in sorted(JOB.glob("*.py")):
        src = p.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            if fn.name in PLANNER:
                continue
            for node, names in _imports(fn):
                if names and "#" not in lines[node.end_lineno - 1]:
                    bare.append(f"{p.name}:{node.lineno}")
    assert not bare, bare
