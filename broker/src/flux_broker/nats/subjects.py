"""Stream names and NATS subjects: what Flux accepts, and how partitions map to subjects.

Every RPC checks names and subjects with these functions before it changes anything
(DESIGN.md §7). The rules:

- **Stream names** match ``[A-Za-z0-9._-]{1,249}`` and do not start with ``.`` or ``__``. A
  stream name becomes a directory (``<data.dir>/streams/<stream>/``), so the allowlist keeps
  out path separators, ``.``/``..``, control characters, homoglyphs and bidi overrides: a
  name that passes can never leave the data directory. Names starting with ``__`` belong to
  the broker; the internal streams ``__cursors`` and ``__activity`` pass only with
  ``internal_ok=True``.
- **Subjects** are NATS subjects: tokens separated by ``.``, none empty, no whitespace, no
  control or format characters (printable Unicode is allowed, as NATS allows it). ``*`` is a
  wildcard only as a whole token and ``>`` only as the last whole token; Flux rejects them
  inside a token (``fo*``), where NATS would quietly treat them as literal characters. A
  stream subject may hold wildcards, but ``>`` only when the stream has one partition,
  because partition N subscribes to ``<subject>.<N>`` and ``foo.>.1`` is not a subject
  (DESIGN.md §4). ``PublishToSubject`` needs a literal subject: no wildcards at all.
- **Partition subjects**: partition 0 uses the stream's subject, partition N uses
  ``<subject>.<N>``. **Ack inboxes** the broker generates are ``<namespace>.ack.<nuid>``.

Errors are :class:`InvalidNameError` and :class:`InvalidSubjectError`, both ``ValueError``;
their messages name the problem and show the offending value through ``repr`` (so control
characters are escaped, never echoed to a log) cut to :data:`SHOWN_VALUE_MAX_CHARS`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = [
    "ACTIVITY_STREAM",
    "CURSORS_STREAM",
    "INTERNAL_STREAMS",
    "RESERVED_PREFIX",
    "SHOWN_VALUE_MAX_CHARS",
    "STREAM_NAME_MAX_CHARS",
    "SUBJECT_MAX_BYTES",
    "InvalidNameError",
    "InvalidSubjectError",
    "ack_inbox",
    "partition_subject",
    "rejected_character",
    "shown",
    "validate_literal_subject",
    "validate_stream_name",
    "validate_subject",
]

#: Longest stream name. Kafka's topic limit: it stays well under the filesystem's NAME_MAX
#: (255 bytes) for the stream's directory, and names are ASCII, so characters are bytes.
STREAM_NAME_MAX_CHARS: Final = 249
#: Longest subject, in UTF-8 bytes. NATS sets no limit of its own, but a PUB line (subject,
#: reply subject, size) must fit the server's default ``max_control_line`` of 4 KiB; 1 KiB
#: leaves room for the reply and the partition suffix (at most 11 bytes), is far beyond real
#: subjects, and bounds what one bad request can make the broker hold and log.
SUBJECT_MAX_BYTES: Final = 1024
#: How much of an offending value an error message shows.
SHOWN_VALUE_MAX_CHARS: Final = 64

CURSORS_STREAM: Final = "__cursors"
ACTIVITY_STREAM: Final = "__activity"
INTERNAL_STREAMS: Final = frozenset({CURSORS_STREAM, ACTIVITY_STREAM})
RESERVED_PREFIX: Final = "__"

SEPARATOR: Final = "."
SINGLE_WILDCARD: Final = "*"
FULL_WILDCARD: Final = ">"
ACK_SEGMENT: Final = "ack"

_STREAM_NAME: Final = re.compile(r"[A-Za-z0-9._-]+")
# Printable ASCII but space: the fast path for the subjects nearly everyone uses.
_PRINTABLE_ASCII: Final = re.compile(r"[\x21-\x7e]+")
# Control, format (bidi overrides, zero-width characters) and surrogate code points.
_REJECTED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs"})


class InvalidNameError(ValueError):
    """A stream name breaks the name rule or is reserved.

    Attributes:
        name: The offending name, whole.
        problem: What is wrong with it.
    """

    def __init__(self, name: str, problem: str) -> None:
        """Describe the offending name."""
        super().__init__(f"invalid stream name {shown(name)}: {problem}")
        self.name = name
        self.problem = problem


class InvalidSubjectError(ValueError):
    """A string is not a NATS subject Flux accepts where it was given.

    Attributes:
        subject: The offending subject, whole.
        problem: What is wrong with it.
    """

    def __init__(self, subject: str, problem: str) -> None:
        """Describe the offending subject."""
        super().__init__(f"invalid subject {shown(subject)}: {problem}")
        self.subject = subject
        self.problem = problem


def validate_stream_name(name: str, *, internal_ok: bool = False) -> None:
    """Check that ``name`` may name a stream.

    Args:
        name: The stream name from a request.
        internal_ok: Accept the broker's internal streams ``__cursors`` and ``__activity``
            (for reads such as Subscribe and FetchMetadata; never for CreateStream or
            DeleteStream). Other names starting with ``__`` stay reserved.

    Raises:
        InvalidNameError: ``name`` is empty, longer than 249 characters, holds a character
            outside ``[A-Za-z0-9._-]``, starts with ``.``, or starts with ``__`` (reserved).
    """
    if not name:
        raise InvalidNameError(name, "it is empty")
    if len(name) > STREAM_NAME_MAX_CHARS:
        raise InvalidNameError(
            name, f"it is {len(name)} characters, over the limit of {STREAM_NAME_MAX_CHARS}"
        )
    if _STREAM_NAME.fullmatch(name) is None:
        raise InvalidNameError(
            name, "only ASCII letters, digits, '.', '_' and '-' are allowed (no '/' or spaces)"
        )
    if name.startswith(SEPARATOR):
        raise InvalidNameError(name, "it must not start with '.'")
    if name.startswith(RESERVED_PREFIX) and not (internal_ok and name in INTERNAL_STREAMS):
        raise InvalidNameError(name, "stream is reserved: names starting with '__' are internal")


def validate_subject(subject: str, *, partitions: int) -> None:
    """Check that ``subject`` may be the subject of a stream with ``partitions`` partitions.

    Args:
        subject: The stream subject from a request.
        partitions: The stream's partition count once defaults are applied (0 already
            turned into 1).

    Raises:
        InvalidSubjectError: ``subject`` is not a valid NATS subject, has a wildcard inside a
            token or ``>`` before the last token, or has ``>`` while ``partitions`` > 1.
        ValueError: ``partitions`` is below 1 (a caller bug: apply the default first).
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    tokens = _check_tokens(subject)
    for i, token in enumerate(tokens):
        if token == FULL_WILDCARD:
            if i != len(tokens) - 1:
                raise InvalidSubjectError(subject, "'>' is allowed only as the last token")
            if partitions > 1:
                raise InvalidSubjectError(
                    subject,
                    f"'>' is allowed only with a single partition, not {partitions}"
                    " (partition N subscribes to '<subject>.N', and '>' must be last)",
                )


def validate_literal_subject(subject: str) -> None:
    """Check that ``subject`` is a NATS subject without wildcards, one a message can go to.

    Args:
        subject: The subject from a request (e.g. PublishToSubject).

    Raises:
        InvalidSubjectError: ``subject`` is not a valid NATS subject or holds ``*`` or ``>``.
    """
    for token in _check_tokens(subject):
        if token in {SINGLE_WILDCARD, FULL_WILDCARD}:
            raise InvalidSubjectError(
                subject, f"wildcard '{token}' is not allowed here: the subject must be literal"
            )


def partition_subject(subject: str, partition: int) -> str:
    """The NATS subject of partition ``partition`` of a stream on ``subject``.

    Args:
        subject: The stream's (validated) subject.
        partition: The partition id, from 0.

    Returns:
        ``subject`` for partition 0, ``<subject>.<partition>`` otherwise.

    Raises:
        ValueError: ``partition`` is negative.
    """
    if partition < 0:
        raise ValueError(f"partition must not be negative, got {partition}")
    if partition == 0:
        return subject
    return f"{subject}{SEPARATOR}{partition}"


def ack_inbox(namespace: str, nuid: str) -> str:
    """The NATS subject of a broker-generated ack inbox: ``<namespace>.ack.<nuid>``.

    Args:
        namespace: The broker's NATS namespace (Liftbridge's default is
            ``liftbridge-default``).
        nuid: A unique id, e.g. from ``nats.nuid.NUID().next()``.

    Returns:
        The inbox subject.

    Raises:
        InvalidSubjectError: ``namespace`` or ``nuid`` would make it an invalid or wildcard
            subject.
    """
    inbox = SEPARATOR.join((namespace, ACK_SEGMENT, nuid))
    validate_literal_subject(inbox)
    return inbox


def _check_tokens(subject: str) -> list[str]:
    """Check everything but wildcard placement; return the tokens of ``subject``."""
    if not subject:
        raise InvalidSubjectError(subject, "it is empty")
    # Every character is at least one UTF-8 byte, so a count of characters over the limit is
    # over it in bytes too: that cheap check runs before any scan of a huge input. The
    # characters are checked before the UTF-8 length because a lone surrogate cannot be encoded.
    if len(subject) > SUBJECT_MAX_BYTES:
        raise InvalidSubjectError(subject, f"it is over the limit of {SUBJECT_MAX_BYTES} bytes")
    if _PRINTABLE_ASCII.fullmatch(subject) is None:
        _check_characters(subject)
    size_bytes = len(subject.encode("utf-8"))
    if size_bytes > SUBJECT_MAX_BYTES:
        raise InvalidSubjectError(
            subject, f"it is {size_bytes} bytes, over the limit of {SUBJECT_MAX_BYTES}"
        )
    tokens = subject.split(SEPARATOR)
    for i, token in enumerate(tokens):
        if not token:
            where = "first" if i == 0 else "last" if i == len(tokens) - 1 else "middle"
            raise InvalidSubjectError(
                subject, f"empty {where} token: no leading, trailing or doubled '.' allowed"
            )
        if len(token) > 1 and (SINGLE_WILDCARD in token or FULL_WILDCARD in token):
            raise InvalidSubjectError(
                subject,
                f"token {token[:SHOWN_VALUE_MAX_CHARS]!r}: '*' and '>' must be whole tokens",
            )
    return tokens


def _check_characters(subject: str) -> None:
    """Reject whitespace, control, format and surrogate characters anywhere in ``subject``."""
    for i, char in enumerate(subject):
        if char.isspace():
            raise InvalidSubjectError(subject, f"whitespace {char!r} at position {i}")
        if _rejected(char):
            raise InvalidSubjectError(
                subject, f"control or format character {char!r} at position {i}"
            )


def shown(value: str) -> str:
    """``repr`` of ``value``, cut to a readable length (long input is often an attack).

    Every message that quotes client input uses it: the quote is escaped (no control
    character reaches a status or a log line) and at most :data:`SHOWN_VALUE_MAX_CHARS` long.
    """
    if len(value) <= SHOWN_VALUE_MAX_CHARS:
        return repr(value)
    return f"{value[:SHOWN_VALUE_MAX_CHARS]!r}... ({len(value)} characters)"


def _rejected(char: str) -> bool:
    return unicodedata.category(char) in _REJECTED_CATEGORIES


def rejected_character(value: str) -> str | None:
    """The first control, format (bidi override, zero-width) or surrogate character, if any.

    Ids chosen by clients (cursor ids, group and consumer ids) may hold any other character.
    """
    if value.isprintable():  # fast path: no such character (and no other unprintable one)
        return None
    return next((char for char in value if _rejected(char)), None)
