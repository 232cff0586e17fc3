"""The flux-broker command: --help explains the flags and the placeholder says what it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import flux_broker
from flux_broker import cli


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data-dir", "--host", "--port", "--version"):
        assert flag in text
    assert "Liftbridge" in text


def test_placeholder_says_so_and_names_the_address(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    assert cli.main(["--data-dir", str(data_dir), "--host", "127.0.0.1"]) == 0
    out = capsys.readouterr().out
    assert "placeholder" in out
    assert "127.0.0.1:9292" in out
    assert str(data_dir) in out
    assert not data_dir.exists()  # a placeholder must not create state


def test_bad_port_is_a_clear_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--port", "70000"])
    assert exit_info.value.code == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


@pytest.mark.integration
def test_console_script_runs_as_a_process() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flux_broker", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"flux-broker {flux_broker.__version__}"
