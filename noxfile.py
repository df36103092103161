"""Test sessions: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``.

Every session installs the project into its own virtualenv; extra arguments after ``--``
go to the tool (``nox -s tests -- -k pipeline -x``).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

LINT_TOOLS = ["ruff==0.17.6", "mypy==2.4.1"]


def install(session: nox.Session, *extras: str) -> None:
    """Install trioconv (with ``extras``) into the session."""
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install(spec)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite against real qemu-img / qemu-io."""
    install(session, "test")
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff, on the package, tests, benchmarks, docs and this file."""
    session.install(*LINT_TOOLS)
    paths = ["trioconv", "_trioconv_launch.py", "tests", "bench", "docs", "noxfile.py"]
    session.run("ruff", "check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on everything (configured in pyproject.toml)."""
    install(session, "test")
    session.install(*LINT_TOOLS, "nox", "sphinx>=7")
    session.run("mypy", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML docs with warnings as errors."""
    install(session)
    session.install("sphinx>=7")
    session.run("python", "-m", "sphinx", "-W", "-b", "html", "docs", "docs/_build/html")
