"""The flux-broker command line: --help explains every flag; usage and config errors are clear."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import flux_broker
from flux_broker import cli

FLAGS = (
    "--config",
    "--server-id",
    "--namespace",
    "--data-dir",
    "--host",
    "--port",
    "--listen",
    "--nats-servers",
    "--embedded-nats",
    "--embedded-nats-port",
    "--level",
    "--log-format",
    "--metrics-port",
    "--ready-file",
    "--version",
)


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text, flag
    assert "Liftbridge" in text
    assert "SIGTERM" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--embedded-nats-port", "-1"], "--embedded-nats-port must be between 0 and 65535"),
        (
            ["--embedded-nats", "--nats-servers", "nats://127.0.0.1:4222"],
            "--embedded-nats and --nats-servers cannot be combined",
        ),
        (["--level", "loud"], "invalid choice: 'loud'"),
        (["--log-format", "xml"], "invalid choice: 'xml'"),
        (["--metrics-port", "70000"], "--metrics-port must be between -1 and 65535"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_configuration_errors_exit_1_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "flux.yaml"
    config.write_text("streams.segment.max.byte: 1024\n", encoding="utf-8")
    data_dir = tmp_path / "data"
    assert cli.main(["--config", str(config), "--data-dir", str(data_dir)]) == 1
    assert "unknown configuration key 'streams.segment.max.byte'" in capsys.readouterr().err
    assert not data_dir.exists()  # a broker that cannot start creates nothing


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
