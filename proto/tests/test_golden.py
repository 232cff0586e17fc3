"""The committed golden files decode and re-encode byte for byte with Python's protobuf.

The TypeScript SDK runs the same check on the same files (``src/golden.spec.ts``), so a message
encoded by one implementation is proven readable by the other. ``nox -s check_generated`` makes
sure the files are what ``proto/codegen/golden.py`` writes today.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from flux_proto import api_pb2

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "conformance" / "golden"
SAMPLES: list[dict[str, Any]] = json.loads((GOLDEN_DIR / "index.json").read_text())["samples"]


def _message_class(full_name: str) -> type[Message]:
    package, _, name = full_name.partition(".")
    assert package == "proto"
    cls = getattr(api_pb2, name)
    assert isinstance(cls, type)
    assert issubclass(cls, Message)
    return cls


def test_golden_set_is_not_empty() -> None:
    assert len(SAMPLES) >= 10
    assert sum(1 for s in SAMPLES if s["byte_exact"]) >= 9
    assert {path.name for path in GOLDEN_DIR.glob("*.binpb")} == {s["file"] for s in SAMPLES}


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["name"] for s in SAMPLES])
def test_golden_round_trip(sample: dict[str, Any]) -> None:
    data = (GOLDEN_DIR / sample["file"]).read_bytes()
    message = _message_class(sample["type"]).FromString(data)
    assert json_format.MessageToDict(message) == sample["json"]
    # Python wrote these bytes, so it reproduces them exactly even where map order is free.
    assert message.SerializeToString(deterministic=True) == data
