"""The house's floor plan, checked: no import cycle between modules (type-only imports
included), and nothing outside tests/ imports tests/ (the harness is a package of its
own that tests and benchmarks share)."""

from __future__ import annotations

import ast
from pathlib import Path

from harness.servers import REPO_ROOT

PACKAGES = ("services", "shared", "baton", "harness", "benchmarks")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_round_a_cycle() -> None:
    found = modules()
    graph = {name: {t for t in imported(path) if t in found and t != name} for name, path in found.items()}
    assert sum(len(targets) for targets in graph.values()) > 300  # the graph was read
    assert cycles(graph) == []


def test_nothing_but_tests_imports_tests() -> None:
    offenders = [
        name
        for name, path in modules().items()
        if any(target == "tests" or target.startswith("tests.") for target in imported(path))
    ]
    assert offenders == []


ROUTE_DECORATORS = {"get", "post", "put", "patch", "delete", "api_route", "websocket"}
LONGEST_ROUTE = 60


def routes() -> dict[str, int]:
    """Every route function of every service, by name, with its length in lines."""
    found = {}
    for name, path in modules().items():
        if not name.startswith("services."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in node.decorator_list:
                call = decorator.func if isinstance(decorator, ast.Call) else None
                if isinstance(call, ast.Attribute) and call.attr in ROUTE_DECORATORS:
                    found[f"{name}.{node.name}"] = (node.end_lineno or node.lineno) - node.lineno + 1
    return found


def test_no_route_function_is_over_60_lines() -> None:
    found = routes()
    assert len(found) > 30  # the routes were read
    assert {name: lines for name, lines in found.items() if lines > LONGEST_ROUTE} == {}
