"""Stream-name and subject rules (flux_broker.nats.subjects): cases are data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_broker.nats.subjects import (
    STREAM_NAME_MAX_CHARS,
    SUBJECT_MAX_BYTES,
    InvalidNameError,
    InvalidSubjectError,
    ack_inbox,
    partition_subject,
    validate_literal_subject,
    validate_stream_name,
    validate_subject,
)

VALID_NAMES = [
    "a",
    "orders",
    "Orders-2024_v1.0",
    "a.b.c",
    "a..b",  # a single directory name: '..' inside a name is harmless
    "_private",
    "-dash-first",
    "x" * STREAM_NAME_MAX_CHARS,
    "0",
]

# (id, name, words the message must contain)
INVALID_NAMES = [
    ("empty", "", "empty"),
    ("too-long-250", "x" * 250, "250 characters"),
    ("too-long-1MiB", "x" * (1 << 20), "over the limit"),
    ("dot", ".", "start with '.'"),
    ("dot-dot", "..", "start with '.'"),
    ("hidden", ".hidden", "start with '.'"),
    ("parent-traversal", "../x", "only ASCII"),
    ("deep-traversal", "../../etc/x", "only ASCII"),
    ("absolute", "/etc/x", "only ASCII"),
    ("slash", "a/b", "only ASCII"),
    ("backslash", "a\\b", "only ASCII"),
    ("space", "a b", "only ASCII"),
    ("tab", "a\tb", "only ASCII"),
    ("newline", "a\n", "only ASCII"),
    ("nul", "a\x00b", "only ASCII"),
    ("escape", "a\x1b[31m", "only ASCII"),
    ("colon", "a:b", "only ASCII"),
    ("asterisk", "a*", "only ASCII"),
    ("unicode", "größe", "only ASCII"),
    ("homoglyph", "\u043erders", "only ASCII"),  # Cyrillic o
    ("bidi-override", "abc\u202etxt", "only ASCII"),
    ("fullwidth-digit", "\uff11", "only ASCII"),
    ("cursors", "__cursors", "reserved"),
    ("activity", "__activity", "reserved"),
    ("double-underscore", "__mine", "reserved"),
    ("double-underscore-only", "__", "reserved"),
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_stream_names(name: str) -> None:
    validate_stream_name(name)


@pytest.mark.parametrize(
    ("name", "words"), [p[1:] for p in INVALID_NAMES], ids=[p[0] for p in INVALID_NAMES]
)
def test_invalid_stream_names(name: str, words: str) -> None:
    with pytest.raises(InvalidNameError) as caught:
        validate_stream_name(name)
    message = str(caught.value)
    assert words in message
    assert caught.value.name == name
    assert isinstance(caught.value, ValueError)
    # The value is shown escaped and cut short: no raw control bytes, no megabyte messages.
    assert len(message) < 300
    assert not any(ord(c) < 0x20 for c in message)


def test_internal_streams_pass_only_when_asked() -> None:
    for name in ("__cursors", "__activity"):
        with pytest.raises(InvalidNameError, match="reserved"):
            validate_stream_name(name)
        validate_stream_name(name, internal_ok=True)
    with pytest.raises(InvalidNameError, match="reserved"):
        validate_stream_name("__other", internal_ok=True)


@given(st.text(min_size=1, max_size=STREAM_NAME_MAX_CHARS + 5))
def test_an_accepted_name_never_leaves_its_directory(name: str) -> None:
    """Whatever a name is, if it passes it is one plain entry directly under the base."""
    try:
        validate_stream_name(name)
    except InvalidNameError:
        return
    base = Path("/data/streams")
    path = base / name
    assert path.parent == base
    assert path.name == name
    assert name not in {".", ".."}
    assert len(name.encode()) <= 255


# (id, subject) valid for any partition count.
VALID_SUBJECTS = [
    ("one-token", "foo"),
    ("dotted", "foo.bar.baz"),
    ("star-token", "foo.*.baz"),
    ("star-only", "*"),
    ("star-last", "foo.*"),
    ("dash-underscore", "orders-v1.eu_west"),
    ("dollar", "$SYS.x"),
    ("unicode", "größe.注文"),
    ("emoji", "📦.sent"),
    ("digits", "1.2.3"),
    ("max-bytes", "a" * SUBJECT_MAX_BYTES),
]

# (id, subject, words the message must contain)
INVALID_SUBJECTS = [
    ("empty", "", "empty"),
    ("dot-only", ".", "empty"),
    ("leading-dot", ".foo", "empty first token"),
    ("trailing-dot", "foo.", "empty last token"),
    ("double-dot", "a..b", "empty middle token"),
    ("space", "foo bar", "whitespace"),
    ("leading-space", " foo", "whitespace"),
    ("tab", "foo\tbar", "whitespace"),
    ("newline", "foo\n", "whitespace"),
    ("carriage-return", "foo\r\nPUB x 1", "whitespace"),
    ("nbsp", "foo\u00a0bar", "whitespace"),
    ("ideographic-space", "foo\u3000bar", "whitespace"),
    ("nul", "foo\x00", "control"),
    ("escape", "foo\x1b[31m", "control"),
    ("del", "foo\x7f", "control"),
    ("bidi-override", "foo\u202e.bar", "format"),
    ("zero-width-space", "foo\u200b", "format"),
    ("lone-surrogate", "foo\ud800", "control or format"),
    ("star-in-token", "fo*", "whole tokens"),
    ("star-in-middle-token", "foo.b*r", "whole tokens"),
    ("gt-in-token", "foo.>x", "whole tokens"),
    ("gt-in-word", "a>b", "whole tokens"),
    ("gt-not-last", "foo.>.bar", "last token"),
    ("gt-first", ">.foo", "last token"),
    ("too-long", "a" * (SUBJECT_MAX_BYTES + 1), "over the limit"),
    ("too-long-utf8", "é" * (SUBJECT_MAX_BYTES // 2 + 1), "1026 bytes"),
    ("one-MiB", "a." * (1 << 19), "over the limit"),
]


@pytest.mark.parametrize(
    "subject", [p[1] for p in VALID_SUBJECTS], ids=[p[0] for p in VALID_SUBJECTS]
)
@pytest.mark.parametrize("partitions", [1, 2, 100])
def test_valid_subjects(subject: str, partitions: int) -> None:
    validate_subject(subject, partitions=partitions)


@pytest.mark.parametrize(
    ("subject", "words"), [p[1:] for p in INVALID_SUBJECTS], ids=[p[0] for p in INVALID_SUBJECTS]
)
@pytest.mark.parametrize("partitions", [1, 3])
def test_invalid_subjects(subject: str, words: str, partitions: int) -> None:
    with pytest.raises(InvalidSubjectError) as caught:
        validate_subject(subject, partitions=partitions)
    message = str(caught.value)
    assert words in message
    assert caught.value.subject == subject
    assert isinstance(caught.value, ValueError)
    # The value is shown escaped and cut short: no raw control bytes, no megabyte messages.
    assert len(message) < 300
    assert not any(ord(c) < 0x20 for c in message)
    # Not a stream subject is not a literal subject either.
    with pytest.raises(InvalidSubjectError):
        validate_literal_subject(subject)


@pytest.mark.parametrize("subject", [">", "foo.>", "foo.*.>"])
def test_full_wildcard_needs_a_single_partition(subject: str) -> None:
    validate_subject(subject, partitions=1)
    with pytest.raises(InvalidSubjectError, match="single partition, not 2"):
        validate_subject(subject, partitions=2)


def test_partitions_must_be_resolved_first() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        validate_subject("foo", partitions=0)


@pytest.mark.parametrize("subject", ["foo", "foo.bar", "$SYS.x", "größe", "a" * SUBJECT_MAX_BYTES])
def test_valid_literal_subjects(subject: str) -> None:
    validate_literal_subject(subject)


@pytest.mark.parametrize("subject", ["*", ">", "foo.*", "foo.>", "*.foo", "a.*.b"])
def test_literal_subjects_have_no_wildcards(subject: str) -> None:
    with pytest.raises(InvalidSubjectError, match="must be literal"):
        validate_literal_subject(subject)


@pytest.mark.parametrize(
    ("subject", "partition", "expected"),
    [("foo", 0, "foo"), ("foo", 1, "foo.1"), ("foo.*", 12, "foo.*.12"), (">", 0, ">")],
)
def test_partition_subject(subject: str, partition: int, expected: str) -> None:
    assert partition_subject(subject, partition) == expected


def test_partition_subject_rejects_a_negative_partition() -> None:
    with pytest.raises(ValueError, match="negative"):
        partition_subject("foo", -1)


@given(st.integers(1, 10_000))
def test_partition_subjects_of_a_valid_subject_are_literal_subjects(partition: int) -> None:
    subject = "orders.eu"
    validate_subject(subject, partitions=partition)
    validate_literal_subject(partition_subject(subject, partition))


def test_ack_inbox() -> None:
    assert ack_inbox("liftbridge-default", "ABC123") == "liftbridge-default.ack.ABC123"


@pytest.mark.parametrize(("namespace", "nuid"), [("", "x"), ("ns", ""), ("n s", "x"), ("ns", "*")])
def test_ack_inbox_rejects_parts_that_break_the_subject(namespace: str, nuid: str) -> None:
    with pytest.raises(InvalidSubjectError):
        ack_inbox(namespace, nuid)


@given(st.text(max_size=40), st.integers(1, 4))
def test_validation_only_accepts_or_raises_its_error(subject: str, partitions: int) -> None:
    """Any string: a typed error or acceptance, never another exception."""
    try:
        validate_subject(subject, partitions=partitions)
    except InvalidSubjectError:
        pass
    else:
        assert subject
        assert all(subject.split("."))
        assert not any(c.isspace() for c in subject)
    try:
        validate_literal_subject(subject)
    except InvalidSubjectError:
        pass
    else:
        assert "*" not in subject
        assert ">" not in subject
