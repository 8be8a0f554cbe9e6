"""The newcomer's path, README -> run -> test -> docs, checked against the code: every
link lands (a file, and a heading when it names one), every command names a script,
module or subcommand that exists, and every route the docs give is served by a service
(the apps are built in process, not started)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from baton.cli import build_parser
from harness.servers import REPO_ROOT
from shared.openapi import honest_openapi

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
ROUTE = re.compile(r"`((?:GET|POST|DELETE|PATCH|PUT)(?:/(?:GET|POST|DELETE|PATCH|PUT))*) (/[A-Za-z0-9_{}./-]*)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(page: Path) -> set[str]:
    found, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def outside_code(page: Path) -> Iterator[str]:
    fence = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            yield line


def test_the_readme_leads_to_every_page_of_the_docs() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name
    assert len(readme.splitlines()) <= 160


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_lands(page: Path) -> None:
    for line in outside_code(page):
        for target in LINK.findall(line):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            landing = (page.parent / path).resolve() if path else page
            assert landing.exists(), f"{page.name}: {target}"
            if anchor:
                assert anchor in headings(landing), f"{page.name}: {target} (no such heading)"


def commands(page: Path) -> Iterator[str]:
    for line in page.read_text().splitlines():
        yield from re.findall(r"(?:\.venv/bin/python -m|python -m) ([a-z_][a-z0-9_.]*)", line)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_exists(page: Path) -> None:
    text = page.read_text()
    for module in commands(page):
        assert importlib.util.find_spec(module) is not None, f"{page.name}: python -m {module}"
    for script in set(re.findall(r"(?<![\w/])(?:\./)?scripts/([a-z0-9-]+\.sh)", text)):
        assert (REPO_ROOT / "scripts" / script).is_file(), f"{page.name}: scripts/{script}"
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    known = set(subcommands.choices)
    written = re.findall(r"`(?:\.venv/bin/)?baton ([a-z]+)", text)  # in inline code
    written += re.findall(r"(?m)^\s*(?:\.venv/bin/)?baton ([a-z]+)", text)  # at a code line's start
    for sub in set(written):
        assert sub in known, f"{page.name}: baton {sub}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> set[tuple[str, str]]:
    """(method, path with its parameters blanked) of every route of every service."""
    from services.coordinator.app import create_app as coordinator_app
    from services.gateway.app import create_app as gateway_app
    from services.llm.app import create_app as llm_app
    from services.rag.app import create_app as rag_app
    from services.rag.settings import RAGSettings
    from services.transcription.app import create_app as transcription_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JWT_SECRET", secrets.token_urlsafe(48))
        apps: list[FastAPI] = [llm_app(), transcription_app(), coordinator_app(), gateway_app()]
        apps.append(rag_app(RAGSettings(chroma_path=tmp_path_factory.mktemp("chroma"))))
    routes = set()
    for app in apps:
        for path, operations in honest_openapi(app)["paths"].items():
            routes |= {(method.upper(), re.sub(r"\{[^}]*\}", "{}", path)) for method in operations}
    return routes


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_route_the_docs_give_is_served(page: Path, served: set[tuple[str, str]]) -> None:
    for methods, path in ROUTE.findall(page.read_text()):
        path = re.sub(r"\{[^}]*\}", "{}", path.rstrip("/.") or "/")
        for method in re.findall(r"GET|POST|DELETE|PATCH|PUT", methods):
            assert (method, path) in served, f"{page.name}: {method} {path}"
