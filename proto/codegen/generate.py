"""Regenerate everything derived from ``proto/`` -- or, with ``--check``, verify it is current.

Run through nox (``nox -s generate`` / ``nox -s check_generated``), which installs the pinned
code generators. Generation is offline: protoc comes from grpcio-tools, the typed stubs from
mypy-protobuf, and the TypeScript code from the locally installed ``protoc-gen-es``.

Outputs (all committed):

- ``proto/src/flux_proto/api_pb2{,_grpc}.py{,i}`` -- Python messages, grpc stubs, typed stubs.
- ``sdk-typescript/src/gen/`` -- TypeScript messages (protobuf-es v2) and the error table.
- ``conformance/golden/`` -- message bytes written by Python, decoded by every other SDK.
- ``docs/reference/api.md`` and ``docs/reference/errors.md`` -- reference pages.

``--check`` generates into a temporary directory and compares file by file (missing, extra
and changed files), so it never touches the working tree.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto" / "src"
PROTO_FILES = ("flux_proto/api.proto",)
ERRORS_JSON = PROTO_ROOT / "flux_proto" / "errors.json"
PROTOC_GEN_ES = ROOT / "sdk-typescript" / "node_modules" / ".bin" / "protoc-gen-es"
CODEGEN_DIR = Path(__file__).resolve().parent

# Paths relative to an output root. Directories are owned whole: any file in them that the
# generators did not write is stale.
PYTHON_OUTPUTS = tuple(
    f"proto/src/flux_proto/api_pb2{suffix}" for suffix in (".py", ".pyi", "_grpc.py", "_grpc.pyi")
)
OWNED_DIRS = ("sdk-typescript/src/gen", "conformance/golden")
DOC_OUTPUTS = ("docs/reference/api.md", "docs/reference/errors.md")


def _run(args: list[str]) -> None:
    result = subprocess.run(args, check=False, capture_output=True, text=True)
    if result.returncode != 0 or result.stderr.strip():
        sys.stderr.write(f"command failed: {' '.join(args)}\n{result.stdout}{result.stderr}")
        raise SystemExit(1)


def _protoc(*args: str) -> None:
    _run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", *args, *PROTO_FILES])


def generate_python(out: Path) -> None:
    """Messages, grpc stubs and their mypy-protobuf typed stubs into ``out/proto/src``."""
    target = out / "proto" / "src"
    target.mkdir(parents=True, exist_ok=True)
    scripts = Path(sysconfig.get_path("scripts"))
    _protoc(
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--python_out={target}",
        f"--grpc_python_out={target}",
        f"--mypy_out={target}",
        f"--mypy_grpc_out={target}",
        "--mypy_opt=quiet",
        "--mypy_grpc_opt=quiet",
    )


def generate_typescript(out: Path) -> None:
    """protobuf-es v2 code into ``out/sdk-typescript/src/gen``."""
    if not PROTOC_GEN_ES.exists():
        sys.stderr.write(f"{PROTOC_GEN_ES} is missing: run `npm ci` in sdk-typescript/\n")
        raise SystemExit(1)
    target = out / "sdk-typescript" / "src" / "gen"
    target.mkdir(parents=True, exist_ok=True)
    _protoc(
        f"--plugin=protoc-gen-es={PROTOC_GEN_ES}",
        f"--es_out={target}",
        "--es_opt=target=ts,import_extension=js",
    )
    _run([sys.executable, str(CODEGEN_DIR / "ts_errors.py"), str(ERRORS_JSON), str(target)])


def generate_golden(out: Path) -> None:
    """Golden message bytes into ``out/conformance/golden``."""
    target = out / "conformance" / "golden"
    target.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, str(CODEGEN_DIR / "golden.py"), str(target)])


def generate_docs(out: Path) -> None:
    """API and error reference pages into ``out/docs/reference``."""
    (out / "docs" / "reference").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        descriptor_set = Path(tmp) / "api.binpb"
        _protoc("--include_source_info", f"--descriptor_set_out={descriptor_set}")
        _run(
            [
                sys.executable,
                str(CODEGEN_DIR / "api_docs.py"),
                "--descriptor-set", str(descriptor_set),
                "--errors", str(ERRORS_JSON),
                "--api-out", str(out / DOC_OUTPUTS[0]),
                "--errors-out", str(out / DOC_OUTPUTS[1]),
            ]
        )  # fmt: skip


def generate_all(out: Path) -> None:
    """Run every generator with ``out`` as the repository root of the outputs."""
    generate_python(out)
    generate_typescript(out)
    generate_golden(out)
    generate_docs(out)


def _files_under(root: Path, directory: str) -> set[str]:
    base = root / directory
    if not base.exists():
        return set()
    return {str(p.relative_to(root)) for p in base.rglob("*") if p.is_file()}


def differences(fresh: Path, tree: Path) -> list[str]:
    """Compare a fresh generation with the working tree; one line per stale file."""
    expected = set(PYTHON_OUTPUTS) | set(DOC_OUTPUTS)
    actual = set(expected)
    for directory in OWNED_DIRS:
        expected |= _files_under(fresh, directory)
        actual |= _files_under(tree, directory)
    problems = [f"stale (not generated any more): {path}" for path in sorted(actual - expected)]
    for path in sorted(expected):
        if not (tree / path).exists():
            problems.append(f"missing: {path}")
        elif not filecmp.cmp(fresh / path, tree / path, shallow=False):
            problems.append(f"differs: {path}")
    return problems


def _clear_owned(root: Path) -> None:
    for directory in OWNED_DIRS:
        for path in _files_under(root, directory):
            (root / path).unlink()


def main() -> int:
    """Generate into the tree, or check the tree with ``--check``; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with a fresh generation; change nothing"
    )
    args = parser.parse_args()
    if not args.check:
        _clear_owned(ROOT)
        generate_all(ROOT)
        sys.stdout.write("generated: Python, TypeScript, golden files, reference docs\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="flux-codegen-") as tmp:
        fresh = Path(tmp)
        generate_all(fresh)
        problems = differences(fresh, ROOT)
    if problems:
        sys.stderr.write(
            "generated files are out of date; run `nox -s generate` and commit:\n  "
            + "\n  ".join(problems)
            + "\n"
        )
        return 1
    sys.stdout.write("generated files are current\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
