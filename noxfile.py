"""Every task of the Flux monorepo; the sessions are the CI jobs.

``nox`` alone runs the full test suite (every session but ``generate``, ``lock``, ``bench`` and
``broker``); ``nox -s NAME`` runs one session. Sessions use uv virtual environments and install
the workspace packages editable, under ``constraints.txt`` so every run gets the same versions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = [
    "lint",
    "typecheck",
    "check_generated",
    "tests_proto",
    "tests_broker",
    "tests_sdk_python",
    "tests_sdk_typescript",
    "compat_gufo",
    "conformance",
    "docs",
    "examples",
]

ROOT = Path(__file__).parent
CONSTRAINTS = ROOT / "constraints.txt"
TS_DIR = ROOT / "sdk-typescript"
WORKSPACE_PACKAGES = ("proto", "broker", "sdk-python", "testing")
PYTEST_TIMEOUT_S = "120" if os.environ.get("CI") else "60"


def install(session: nox.Session, *groups: str, workspace: bool = True) -> None:
    """Install dependency groups (and the workspace packages, editable) under the constraints."""
    args = ["-c", str(CONSTRAINTS)]
    for group in groups:
        args += ["--group", group]
    if workspace:
        for package in WORKSPACE_PACKAGES:
            args += ["-e", str(ROOT / package)]
    session.install(*args)


def npm_ci(session: nox.Session) -> None:
    """Install the TypeScript package's locked dependencies (skipped when already current)."""
    marker = TS_DIR / "node_modules" / ".package-lock.json"
    lock = TS_DIR / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return
    session.run("npm", "ci", "--no-audit", "--no-fund", external=True)


def pytest(session: nox.Session, *paths: str) -> None:
    """Run pytest on ``paths``; "no tests ran" (exit 5) fails the session like any failure."""
    session.run("pytest", f"--timeout={PYTEST_TIMEOUT_S}", *paths, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check (Python); ESLint and Prettier check (TypeScript)."""
    install(session, "lint", workspace=False)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.chdir(TS_DIR)
    npm_ci(session)
    session.run("npm", "run", "--silent", "lint", external=True)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over every Python package and test suite; tsc with every strict flag."""
    install(session, "typecheck")
    session.run("mypy")
    session.chdir(TS_DIR)
    npm_ci(session)
    session.run("npm", "run", "--silent", "typecheck", external=True)


@nox.session
def tests_proto(session: nox.Session) -> None:
    """Wire compatibility with Liftbridge v1.9.0, the error table, golden bytes, test fixtures."""
    install(session, "test")
    pytest(session, "proto/tests", "testing/tests")


@nox.session
def tests_broker(session: nox.Session) -> None:
    """The broker's test suite."""
    install(session, "test")
    pytest(session, "broker/tests")


@nox.session
def tests_sdk_python(session: nox.Session) -> None:
    """The Python SDK's test suite."""
    install(session, "test")
    pytest(session, "sdk-python/tests")


@nox.session
def tests_sdk_typescript(session: nox.Session) -> None:
    """Compile the TypeScript SDK with tsc and run its specs with node --test."""
    session.chdir(TS_DIR)
    npm_ci(session)
    session.run("npm", "test", external=True)


@nox.session
def compat_gufo(session: nox.Session) -> None:
    """The gufo-liftbridge client, unchanged, against a real broker (Liftbridge compatibility).

    The tests must not import flux_proto: gufo bundles its own copy of the Liftbridge protobuf
    code. The broker they start runs from this environment too, in its own process.
    """
    install(session, "compat")
    pytest(session, "broker/compat")


@nox.session
def conformance(session: nox.Session) -> None:
    """Placeholder: the conformance suite arrives with the SDK issues."""
    session.log("conformance: placeholder -- no SDK implements the suite yet; nothing to run")


@nox.session
def examples(session: nox.Session) -> None:
    """Type-check the Python examples (mypy --strict) and run them against a real broker."""
    install(session, "test", "typecheck")
    session.run("mypy", "--strict", "examples/python")
    session.run("python", "examples/python/run_examples.py")


@nox.session
def bench(session: nox.Session) -> None:
    """The commit-log, broker-API, data-path and consumer-group benchmarks (``-- --quick``).

    Arguments after -- go to log_bench.py; api_bench.py, data_path_bench.py (Flux against NATS
    JetStream) and groups_bench.py (push against Liftbridge-style polling) get only ``--quick``.
    """
    install(session, "bench")
    quick = ["--quick"] if "--quick" in session.posargs else []
    bench_dir = ROOT / "broker" / "bench"
    session.run("python", str(bench_dir / "log_bench.py"), *session.posargs)
    session.run("python", str(bench_dir / "api_bench.py"), *quick)
    session.run("python", str(bench_dir / "data_path_bench.py"), *quick)
    session.run("python", str(bench_dir / "groups_bench.py"), *quick)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs --strict (offline) into a temporary directory."""
    install(session, "docs", workspace=False)
    with tempfile.TemporaryDirectory(prefix="flux-site-") as site_dir:
        # The variable hides mkdocs-material's notice about mkdocs 2; it does not affect --strict.
        session.run(
            "mkdocs", "build", "--strict", "--site-dir", site_dir,
            env={"NO_MKDOCS_2_WARNING": "1"},
        )  # fmt: skip


def _codegen(session: nox.Session, *args: str) -> None:
    install(session, "codegen")
    session.chdir(TS_DIR)
    npm_ci(session)
    session.chdir(ROOT)
    session.run("python", "proto/codegen/generate.py", *args)


@nox.session
def generate(session: nox.Session) -> None:
    """Regenerate all code and files derived from proto/ (offline)."""
    _codegen(session)


@nox.session
def check_generated(session: nox.Session) -> None:
    """Fail when the committed generated files differ from a fresh generation."""
    _codegen(session, "--check")


@nox.session
def lock(session: nox.Session) -> None:
    """Re-resolve the workspace and rewrite constraints.txt (pass --upgrade to take updates)."""
    install(session, "tasks", workspace=False)
    session.run("uv", "lock", *session.posargs)
    session.run(
        "uv", "export", "--frozen", "--all-packages", "--all-groups", "--no-emit-workspace",
        "--no-header", "--no-annotate", "--no-hashes", "--output-file", str(CONSTRAINTS),
    )  # fmt: skip
    (ROOT / "uv.lock").unlink()


@nox.session
def broker(session: nox.Session) -> None:
    """Install and run flux-broker; arguments after -- go to the broker."""
    session.install("-c", str(CONSTRAINTS), "-e", str(ROOT / "proto"), "-e", str(ROOT / "broker"))
    session.run("flux-broker", *session.posargs)
