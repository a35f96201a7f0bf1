"""The documentation site keeps up with the code.

- Every public name (each public module's ``__all__``) has a docstring and is rendered by a
  mkdocstrings directive of ``docs/reference.md``: the directive names it, or names its module
  with its members shown (mkdocstrings renders a module's members that are in its ``__all__``
  and have a docstring).
- Every `IssueCode` is in the table of ``docs/validation.md``, and nothing else is.
- The exception tree of ``docs/errors.md`` is the one of ``hospital_bulk._exceptions``.
- The custom-backend guide's skeleton job store runs a job under faults without duplicates.
- (slow) ``mkdocs build --strict`` passes, and the built reference has an anchor for every
  public name.

Docstrings are read from the source (with `ast`), as mkdocstrings reads them: a dataclass's
generated ``__doc__`` or an inherited one does not count.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import hospital_bulk
from hospital_bulk import IssueCode

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Public modules that the API reference leaves to a page of their own.
NOT_IN_REFERENCE = {
    "hospital_bulk.cli": "the hospital-bulk command: documented in docs/cli.md",
    "hospital_bulk.__main__": "python -m hospital_bulk: runs the command",
}

# Public names without a docstring, so mkdocstrings does not render them. Each is an xfail
# (strict): once its docstring is written the test passes unexpectedly, and the entry goes.
UNDOCUMENTED: dict[str, str] = {}


# -- the public API ------------------------------------------------------------------------------


def public_modules() -> list[str]:
    """Every module of the package whose dotted path has no private part."""
    names = ["hospital_bulk"]
    for info in pkgutil.walk_packages(hospital_bulk.__path__, "hospital_bulk."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def import_optional(name: str) -> types.ModuleType:
    """Import a module; skip when an optional extra it needs is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # an extra (fastapi, celery, redis) is missing
        pytest.skip(f"{name} cannot be imported here: {exc}")


def public_names() -> list[str]:
    """``module.name`` for every name in the ``__all__`` of every referenced public module."""
    names = []
    for module_name in public_modules():
        if module_name in NOT_IN_REFERENCE:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # collected anyway; the test itself skips
            continue
        names.extend(f"{module_name}.{name}" for name in getattr(module, "__all__", []))
    return names


def params(names: list[str]) -> list[Any]:
    return [
        pytest.param(name, marks=pytest.mark.xfail(reason=UNDOCUMENTED[name], strict=True), id=name)
        if name in UNDOCUMENTED
        else pytest.param(name, id=name)
        for name in names
    ]


@cache
def module_tree(module_name: str) -> ast.Module:
    spec = importlib.util.find_spec(module_name)
    assert spec is not None, module_name
    assert spec.origin is not None, module_name
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def source_docstring(module_name: str, name: str) -> str | None:
    """The docstring of `name` as written in its module's source, following re-exports.

    A class or function has the docstring of its body; anything else (a constant, a type
    alias) the string literal right after its assignment.
    """
    tree = module_tree(module_name)
    body = tree.body
    for index, node in enumerate(body):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name == name:
                return ast.get_docstring(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                after = body[index + 1] if index + 1 < len(body) else None
                if (
                    isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                ):
                    return inspect.cleandoc(after.value.value)
                return None
    anchor = module_name if is_package(module_name) else module_name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    relative = "." * node.level + (node.module or "")
                    source = importlib.util.resolve_name(relative, anchor)
                    return source_docstring(source, alias.name)
    raise AssertionError(f"{name} is neither defined nor imported in {module_name}")


def is_package(module_name: str) -> bool:
    spec = importlib.util.find_spec(module_name)
    return spec is not None and spec.submodule_search_locations is not None


# -- the reference page --------------------------------------------------------------------------


@dataclass
class Directive:
    """One ``::: identifier`` block of a Markdown page, with its options' text."""

    identifier: str
    options: list[str] = field(default_factory=list)

    def shows_members(self, name: str) -> bool:
        """Whether rendering this object renders its member `name` (by its options)."""
        text = "\n".join(self.options)
        match = re.search(r"^[ \t]*members:[ \t]*(.*)$", text, re.MULTILINE)
        if match is None:
            return True
        value = match.group(1).strip()
        if value.lower() in ("false", "[]", "no", "off"):
            return False
        if value.lower() in ("true", "yes", "on"):
            return True
        if value.startswith("["):
            return name in [item.strip(" '\"") for item in value.strip("[]").split(",")]
        listed = re.findall(r"^[ \t]*-[ \t]*(\S+)[ \t]*$", text[match.end() :], re.MULTILINE)
        return name in [item.strip("'\"") for item in listed]


def directives(page: Path) -> list[Directive]:
    found: list[Directive] = []
    for line in page.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^:::\s+(\S+)\s*$", line)
        if match:
            found.append(Directive(match.group(1)))
        elif found and line.startswith("    ") and (found[-1].options or "options:" in line):
            found[-1].options.append(line)
    return found


REFERENCE = directives(DOCS / "reference.md")


def rendering_directive(dotted: str) -> Directive | None:
    """The directive of the reference that renders `dotted` (``module.name``), if any."""
    module_name, _, name = dotted.rpartition(".")
    for directive in REFERENCE:
        if directive.identifier == dotted:
            return directive
        if directive.identifier == module_name and directive.shows_members(name):
            return directive
    return None


def test_the_reference_has_directives() -> None:
    assert len(REFERENCE) > 40


def resolve(identifier: str) -> object:
    """Import the longest module prefix of `identifier`, then walk its attributes."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:  # a parent is not a package (a class, say)
            found = False
        if found:
            target: object = import_optional(module_name)
            for part in parts[cut:]:
                target = getattr(target, part)
            return target
    raise AssertionError(f"{identifier} is not importable")


@pytest.mark.parametrize("directive", REFERENCE, ids=lambda d: d.identifier)
def test_every_directive_names_something_importable(directive: Directive) -> None:
    assert resolve(directive.identifier) is not None


def test_every_public_module_is_in_the_reference() -> None:
    referenced = {d.identifier for d in REFERENCE}
    for module_name in public_modules():
        if module_name == "hospital_bulk" or module_name in NOT_IN_REFERENCE:
            continue  # the root's names are listed one by one (below)
        # A package with only a docstring (hospital_bulk.backends) exports nothing to show.
        if getattr(import_optional(module_name), "__all__", None):
            assert module_name in referenced, f"{module_name} is not in docs/reference.md"


@pytest.mark.parametrize("dotted", params(public_names()))
def test_every_public_name_is_documented_and_in_the_reference(dotted: str) -> None:
    module_name, _, name = dotted.rpartition(".")
    module = import_optional(module_name)
    assert hasattr(module, name), f"{dotted} is in __all__ but does not exist"
    directive = rendering_directive(dotted)
    assert directive is not None, f"no directive of docs/reference.md renders {dotted}"
    docstring = source_docstring(module_name, name)
    assert docstring, f"{dotted} has no docstring, so the API reference shows nothing for it"


def test_the_root_lists_every_name_one_by_one() -> None:
    # The package root is rendered name by name, grouped by topic, not as one module page.
    listed = {d.identifier for d in REFERENCE}
    missing = [n for n in hospital_bulk.__all__ if f"hospital_bulk.{n}" not in listed]
    assert missing == []


# -- the validation rules ------------------------------------------------------------------------


def test_every_issue_code_is_in_the_validation_rules() -> None:
    page = (DOCS / "validation.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\|\s*`([a-z_]+)`\s*\|\s*(error|warning)\s*\|", page, re.MULTILINE)
    codes = [code for code, _ in listed]
    assert sorted(codes) == sorted(member.value for member in IssueCode)
    assert len(codes) == len(set(codes)), "a code is listed twice"


def test_the_kind_of_every_issue_code_matches_its_docstring() -> None:
    # IssueCode's docstring marks the warnings with *Warning.*; the page's kind column agrees.
    doc = inspect.getdoc(IssueCode) or ""
    warnings = {
        name.lower()
        for name, text in re.findall(r"^\s{4}([A-Z_]+): (.*)$", doc, re.MULTILINE)
        if text.startswith("*Warning.*")
    }
    page = (DOCS / "validation.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\|\s*`([a-z_]+)`\s*\|\s*(error|warning)\s*\|", page, re.MULTILINE))
    assert {code for code, kind in listed.items() if kind == "warning"} == warnings


# -- the errors page -----------------------------------------------------------------------------


def code_block(text: str, start: str) -> str:
    begin = text.index(start)
    return text[begin : text.index("```", begin + len(start))]


def test_the_errors_page_draws_the_exception_tree_of_the_code() -> None:
    import hospital_bulk._exceptions as exceptions

    page = (DOCS / "errors.md").read_text(encoding="utf-8")
    assert code_block(page, "```text") == code_block(exceptions.__doc__ or "", "```text")
    tree = code_block(page, "```text")
    for name in hospital_bulk.__all__:
        member = getattr(hospital_bulk, name)
        if isinstance(member, type) and issubclass(member, BaseException):
            assert re.search(rf"\b{name}\b", tree), f"{name} is not in the tree of errors.md"


# -- the custom backend guide --------------------------------------------------------------------


def python_block(page: Path, title: str) -> str:
    text = page.read_text(encoding="utf-8")
    start = text.index(f'```python title="{title}"\n') + len(f'```python title="{title}"\n')
    return text[start : text.index("\n```", start)]


@pytest.mark.anyio
async def test_the_skeleton_job_store_of_the_guide_runs_jobs_without_duplicates() -> None:
    from hospital_bulk import AsyncBulkProcessor, RetryPolicy
    from hospital_bulk.backends.memory import MemoryIdempotencyStore
    from hospital_bulk.protocols import JobStore
    from hospital_bulk.testing import FakeDirectory, Faults

    namespace: dict[str, Any] = {"__name__": "kv_store"}
    exec(
        compile(python_block(DOCS / "custom-backend.md", "kv_store.py"), "kv_store", "exec"),
        namespace,
    )
    store = namespace["KeyValueJobStore"]()
    assert isinstance(store, JobStore)

    fake = FakeDirectory(
        create_rate=None,
        other_rate=None,
        faults=Faults(error_rate=0.1, timeout_after_commit_rate=0.1),
        seed=11,
    )
    csv = b"name,address\n" + b"".join(b"Hospital %d,%d Main St\n" % (i, i) for i in range(30))
    async with AsyncBulkProcessor(
        "http://fake",
        transport=fake.transport(),
        job_store=store,
        idempotency_store=MemoryIdempotencyStore(store),
        retry=RetryPolicy.testing(),
        create_rate="100000/minute",  # the fake has no limits: never wait for a budget
        other_rate="100000/minute",
        reconcile_after=0.01,
        breaker_recovery_time=0.01,
    ) as processor:
        result = await processor.process(csv, idempotency_key="upload-1")
        for _ in range(5):
            if result.status == "completed":
                break
            result = await processor.resume(result.job_id)
        again = await processor.process(csv, idempotency_key="upload-1")
    assert result.status == "completed", fake.seed
    assert again.job_id == result.job_id
    assert any(r.fault == "timeout_after_commit" for r in fake.creates()), "no fault was drawn"
    assert fake.duplicates() == []
    assert len(fake.hospitals) == 30
    assert all(h.active for h in fake.hospitals)


# -- the site ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_site_builds_strictly_with_every_public_name_in_the_reference(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("the docs extra is not installed")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    html = (site / "reference" / "index.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="(hospital_bulk[\w.]*)"', html))
    missing = [name for name in public_names() if name not in anchors and name not in UNDOCUMENTED]
    assert missing == [], f"not rendered in the API reference: {missing}"
