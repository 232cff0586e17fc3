"""Checkpoint files are replaced atomically and read tolerantly."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux_broker.log import checkpoint


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "hw"
    checkpoint.write_int(path, 42)
    assert path.read_bytes() == b"42\n"
    assert checkpoint.read_int(path) == 42
    checkpoint.write_int(path, -1)
    assert checkpoint.read_int(path) == -1
    assert not (tmp_path / "hw.tmp").exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"\n", b"forty-two", b"\xff\xfe", b"12 34", b"1.5"],
    ids=["empty", "newline", "words", "binary", "two-numbers", "float"],
)
def test_garbage_reads_as_missing(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "hw"
    path.write_bytes(content)
    assert checkpoint.read_int(path) is None


def test_missing_reads_as_missing(tmp_path: Path) -> None:
    assert checkpoint.read_int(tmp_path / "absent") is None


def test_a_leftover_temp_file_does_not_disturb_the_next_write(tmp_path: Path) -> None:
    (tmp_path / "hw.tmp").write_bytes(b"half-written")
    checkpoint.write_int(tmp_path / "hw", 7)
    assert checkpoint.read_int(tmp_path / "hw") == 7
