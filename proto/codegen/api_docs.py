r"""Generate the API and error reference pages of the docs site from the spec.

Two Markdown pages are written, both committed and rebuilt by ``nox -s generate``:

* the API reference, from a ``FileDescriptorSet`` that ``protoc`` wrote with
  ``--include_source_info`` (so the comments of the ``.proto`` files are available): every
  service with its RPCs, every message with a field table (nested messages and enums under their
  parent, map entries folded into ``map<K, V>``), every enum with a value table;
* the error reference, from the error table ``errors.json`` that the broker and every SDK share:
  the broker rows, then the client-side rows (``client_errors``) that SDKs raise themselves.

Usage::

    python -m grpc_tools.protoc -I proto/src --include_source_info \
        --descriptor_set_out=api.pb flux_proto/api.proto
    python proto/codegen/api_docs.py --descriptor-set api.pb \
        --errors proto/src/flux_proto/errors.json \
        --api-out docs/reference/api.md --errors-out docs/reference/errors.md

The output depends only on the inputs (no timestamps, no absolute paths), so running the script
twice gives byte-identical files and ``nox -s check_generated`` can detect drift. Headings carry
explicit ids (the ``attr_list`` Markdown extension) derived from the protobuf full names, so a
link to a type is ``#`` plus its full name in lower case with dots turned into hyphens:
``proto.PartitionMetadata.Error`` is ``#proto-partitionmetadata-error``.

Only the standard library and ``google.protobuf.descriptor_pb2`` are used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

GENERATE_COMMAND = "nox -s generate"
"""The command that regenerates the pages; named in their header comment."""

SCRIPT_PATH = "proto/codegen/api_docs.py"
"""This script, as the header comment names it (relative to the repository root)."""

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
"""The monorepo's root; input paths are named relative to it so the output is the same anywhere."""

SKIPPED_FILE_PREFIX = "google/protobuf/"
"""Files of protobuf's well-known types, present when ``--include_imports`` was used."""

MAX_HEADING_LEVEL = 6
"""Markdown has six heading levels; deeper nesting reuses the last one."""

MAX_FIELD_NUMBER = 536_870_911
"""The largest protobuf field number (2**29 - 1), shown as ``max`` in reserved ranges."""

MAX_ENUM_NUMBER = 2_147_483_647
"""The largest enum value number (int32), shown as ``max`` in reserved ranges."""

# Field numbers of the descriptor messages, used to build source_code_info location paths.
FILE_PACKAGE = 2
FILE_MESSAGE_TYPE = 4
FILE_ENUM_TYPE = 5
FILE_SERVICE = 6
FILE_SYNTAX = 12
MESSAGE_FIELD = 2
MESSAGE_NESTED_TYPE = 3
MESSAGE_ENUM_TYPE = 4
MESSAGE_RESERVED_RANGE = 9
MESSAGE_RESERVED_NAME = 10
ENUM_VALUE = 2
ENUM_RESERVED_RANGE = 4
ENUM_RESERVED_NAME = 5
SERVICE_METHOD = 2

FDP = descriptor_pb2.FieldDescriptorProto

SCALAR_TYPE_NAMES: dict[int, str] = {
    FDP.TYPE_DOUBLE: "double",
    FDP.TYPE_FLOAT: "float",
    FDP.TYPE_INT64: "int64",
    FDP.TYPE_UINT64: "uint64",
    FDP.TYPE_INT32: "int32",
    FDP.TYPE_FIXED64: "fixed64",
    FDP.TYPE_FIXED32: "fixed32",
    FDP.TYPE_BOOL: "bool",
    FDP.TYPE_STRING: "string",
    FDP.TYPE_BYTES: "bytes",
    FDP.TYPE_UINT32: "uint32",
    FDP.TYPE_SFIXED32: "sfixed32",
    FDP.TYPE_SFIXED64: "sfixed64",
    FDP.TYPE_SINT32: "sint32",
    FDP.TYPE_SINT64: "sint64",
}

ERROR_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "grpc_code": (str,),
    "reason": (str,),
    "liftbridge_message": (str, type(None)),
    "retriable": (bool,),
    "description": (str,),
}
"""The keys every entry of ``errors.json`` must have, with the JSON types allowed for each."""

CLIENT_ERROR_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "reason": (str,),
    "retriable": (bool,),
    "description": (str,),
}
"""The keys every entry of ``client_errors`` in ``errors.json`` must have."""

CODE_SPAN = re.compile(r"(`[^`\n]+`)")
LIST_ITEM = re.compile(r"^(?:[-*+]|\d{1,9}[.)])\s+")
INLINE_ESCAPES = str.maketrans(
    {
        "\\": "\\\\",
        "*": "\\*",
        "_": "\\_",
        "[": "\\[",
        "]": "\\]",
        "{": "\\{",
        "}": "\\}",
        "|": "\\|",
        "<": "&lt;",
        ">": "&gt;",
    }
)


class DocsError(Exception):
    """An input the generator cannot document (unreadable, malformed or inconsistent)."""


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------


def escape_inline(text: str) -> str:
    """Escape Markdown syntax in plain text, keeping backtick code spans as written.

    Comments and descriptions are plain text that may quote code in backticks. Everything outside
    a code span is escaped so that, for example, ``__cursors`` is not read as bold and ``<x>`` is
    not read as an HTML tag; ``|`` is escaped so the text can sit in a table cell.

    Args:
        text: one line of plain text.

    Returns:
        The Markdown for that text.

    """
    parts = CODE_SPAN.split(text)
    out: list[str] = []
    for index, part in enumerate(parts):
        if index % 2 == 1:
            out.append(part)
        else:
            escaped = part.translate(INLINE_ESCAPES)
            if index == 0 and escaped.startswith("#"):
                escaped = "\\" + escaped
            out.append(escaped)
    return "".join(out)


def comment_lines(raw: str) -> list[str]:
    """Normalise a protoc comment: common indentation removed, outer blank lines dropped.

    Args:
        raw: a ``leading_comments`` or ``trailing_comments`` string from ``source_code_info``.

    Returns:
        The comment's lines without trailing whitespace.

    """
    lines = [line.rstrip() for line in textwrap.dedent(raw.expandtabs(4)).split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def cell_text(raw: str) -> str:
    """Render a comment for a table cell: one line, newlines turned into spaces.

    Args:
        raw: the comment as protoc recorded it.

    Returns:
        Escaped Markdown without newlines.

    """
    words = " ".join(line.strip() for line in comment_lines(raw) if line.strip())
    return escape_inline(words)


def paragraph_blocks(raw: str) -> list[str]:
    """Render a comment as Markdown blocks: paragraphs, and lists where lines start with a bullet.

    A blank comment line separates paragraphs. Inside a paragraph, lines are joined with spaces
    unless a line starts with ``-``, ``*``, ``+`` or ``1.``, which starts a list item.

    Args:
        raw: the comment as protoc recorded it.

    Returns:
        Markdown blocks, to be separated by blank lines.

    """
    blocks: list[str] = []
    for paragraph in _split_paragraphs(comment_lines(raw)):
        prose: list[str] = []
        items: list[tuple[str, list[str]]] = []
        for line in paragraph:
            stripped = line.strip()
            match = LIST_ITEM.match(stripped)
            if match:
                marker = "1." if stripped[0].isdigit() else "-"
                items.append((marker, [stripped[match.end() :]]))
            elif items:
                items[-1][1].append(stripped)
            else:
                prose.append(stripped)
        if prose:
            blocks.append(escape_inline(" ".join(prose)))
        if items:
            blocks.append("\n".join(f"{m} {escape_inline(' '.join(w))}" for m, w in items))
    return blocks


def _split_paragraphs(lines: Sequence[str]) -> Iterator[list[str]]:
    """Yield runs of non-blank lines.

    Args:
        lines: comment lines.

    Yields:
        Each paragraph's lines.

    """
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            yield current
            current = []
    if current:
        yield current


def code(text: str) -> str:
    """Wrap text in a code span, choosing a fence longer than any backtick run inside it.

    Args:
        text: literal text.

    Returns:
        A Markdown code span.

    """
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a Markdown table whose cells are already escaped.

    Args:
        header: column titles.
        rows: cell Markdown, one sequence per row, as long as ``header``.

    Returns:
        The table as one block.

    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(cell or " " for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def heading(level: int, title: str, anchor: str) -> str:
    """Render a heading with an explicit id (``attr_list`` syntax).

    Args:
        level: 1 to 6; larger values are clamped to 6.
        title: plain text.
        anchor: the id.

    Returns:
        The heading line.

    """
    hashes = "#" * min(level, MAX_HEADING_LEVEL)
    return f"{hashes} {escape_inline(title)} {{#{anchor}}}"


def header_comment(sources: Sequence[str]) -> str:
    """Build the HTML comment that opens every generated page.

    Args:
        sources: repository-relative paths of the inputs.

    Returns:
        One HTML comment naming the command, the script and the inputs.

    """
    names = ", ".join(sources)
    return (
        f"<!-- Generated by `{GENERATE_COMMAND}` ({SCRIPT_PATH}) from {names}. "
        f"Do not edit: change the source and run `{GENERATE_COMMAND}`. -->"
    )


# --------------------------------------------------------------------------------------------
# Descriptor model
# --------------------------------------------------------------------------------------------

Path_ = tuple[int, ...]


@dataclass(frozen=True)
class Location:
    """The comments and source span protoc recorded for one element of a .proto file."""

    span: tuple[int, int, int, int]
    leading: str
    trailing: str

    def comment(self) -> str:
        """Return the element's documentation: its leading comment, else its trailing one.

        Returns:
            The raw comment text, or an empty string.

        """
        return self.leading if self.leading.strip() else self.trailing

    def contains(self, other: Location) -> bool:
        """Whether ``other``'s span lies inside this one.

        Args:
            other: another location of the same file.

        Returns:
            True if ``other`` starts and ends within this span.

        """
        start, end = self.span[:2], self.span[2:]
        return start <= other.span[:2] and other.span[2:] <= end


class SourceInfo:
    """Lookup of ``source_code_info`` locations of one file by their path."""

    def __init__(self, info: descriptor_pb2.SourceCodeInfo) -> None:
        """Index the locations.

        Args:
            info: the file's source code info (may be empty when protoc ran without
                ``--include_source_info``).

        """
        self._by_path: dict[Path_, list[Location]] = {}
        for loc in info.location:
            span = list(loc.span)
            if len(span) == 3:
                span = [span[0], span[1], span[0], span[2]]
            if len(span) != 4:
                continue
            key = tuple(loc.path)
            location = Location(
                (span[0], span[1], span[2], span[3]), loc.leading_comments, loc.trailing_comments
            )
            self._by_path.setdefault(key, []).append(location)

    @property
    def empty(self) -> bool:
        """True when the file carries no source info at all."""
        return not self._by_path

    def comment(self, path: Path_) -> str:
        """Return the documentation comment of the element at ``path``.

        Args:
            path: the element's location path.

        Returns:
            The raw comment, or an empty string.

        """
        found = self._by_path.get(path)
        return found[0].comment() if found else ""

    def all(self, path: Path_) -> list[Location]:
        """Every location recorded for ``path`` (a repeated statement such as ``reserved``).

        Args:
            path: a location path.

        Returns:
            The locations in file order.

        """
        return list(self._by_path.get(path, []))


def anchor_for(full_name: str) -> str:
    """Return the heading id of a protobuf element.

    Args:
        full_name: the element's full name without a leading dot, e.g. ``proto.Ack.Error``.

    Returns:
        The full name in lower case with dots replaced by hyphens.

    """
    return full_name.lower().replace(".", "-")


@dataclass(frozen=True)
class Symbol:
    """A documented message or enum: where its section is and how to name it."""

    anchor: str
    display: str


class Catalogue:
    """Every message and enum of the documented files, and the map entry messages."""

    def __init__(self, files: Sequence[descriptor_pb2.FileDescriptorProto]) -> None:
        """Collect the symbols of ``files``.

        Args:
            files: the documented files.

        Raises:
            DocsError: if two elements would get the same heading id.

        """
        self.symbols: dict[str, Symbol] = {}
        self.map_entries: dict[str, descriptor_pb2.DescriptorProto] = {}
        self._anchors: dict[str, str] = {}
        for file in files:
            for service in file.service:
                name = _join(file.package, service.name)
                self.claim_anchor(name)
                for method in service.method:
                    self.claim_anchor(f"{name}.{method.name}")
            for message in file.message_type:
                self._add_message(file.package, file.package, message)
            for enum in file.enum_type:
                self._add(file.package, _join(file.package, enum.name))

    def claim_anchor(self, full_name: str) -> str:
        """Reserve the heading id of ``full_name``.

        Args:
            full_name: a protobuf full name.

        Returns:
            The id.

        Raises:
            DocsError: if another element already has that id (names differing only in case).

        """
        anchor = anchor_for(full_name)
        owner = self._anchors.setdefault(anchor, full_name)
        if owner != full_name:
            raise DocsError(f"{owner} and {full_name} would share the heading id #{anchor}")
        return anchor

    def _add(self, package: str, full_name: str) -> None:
        display = full_name[len(package) + 1 :] if package else full_name
        self.symbols[full_name] = Symbol(self.claim_anchor(full_name), display)

    def _add_message(
        self, package: str, scope: str, message: descriptor_pb2.DescriptorProto
    ) -> None:
        full_name = _join(scope, message.name)
        if message.options.map_entry:
            self.map_entries[full_name] = message
            return
        self._add(package, full_name)
        for nested in message.nested_type:
            self._add_message(package, full_name, nested)
        for enum in message.enum_type:
            self._add(package, _join(full_name, enum.name))

    def type_name(self, type_name: str, package: str) -> tuple[str, str | None]:
        """How to show a message or enum type and where to link it.

        Args:
            type_name: a field's ``type_name`` (fully qualified, with a leading dot).
            package: the package of the file being documented.

        Returns:
            The name to show (relative to ``package`` when inside it) and the heading id of the
            type's section, or None when the type is not documented here (e.g. a well-known type).

        """
        full_name = type_name.lstrip(".")
        symbol = self.symbols.get(full_name)
        if symbol is not None:
            return symbol.display, symbol.anchor
        prefix = package + "."
        shown = full_name[len(prefix) :] if package and full_name.startswith(prefix) else full_name
        return shown, None


def _join(scope: str, name: str) -> str:
    """Join a scope and a name into a full name.

    Args:
        scope: a package or message full name, possibly empty.
        name: a simple name.

    Returns:
        ``scope.name``, or ``name`` when the scope is empty.

    """
    return f"{scope}.{name}" if scope else name


# --------------------------------------------------------------------------------------------
# API page
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileContext:
    """What rendering an element needs to know about the file that declares it."""

    package: str
    info: SourceInfo
    proto2: bool


def file_context(file: descriptor_pb2.FileDescriptorProto) -> FileContext:
    """Build the rendering context of one file.

    Args:
        file: a documented file.

    Returns:
        Its package, source info and syntax.

    """
    proto2 = file.syntax in ("", "proto2")
    return FileContext(file.package, SourceInfo(file.source_code_info), proto2)


class ApiPage:
    """Builds the API reference page from the documented files."""

    def __init__(
        self, files: Sequence[descriptor_pb2.FileDescriptorProto], proto_root: str
    ) -> None:
        """Prepare the page.

        Args:
            files: the documented files, in the order protoc wrote them.
            proto_root: the repository-relative include directory the files' names are relative
                to, for naming the sources.

        """
        self.files = files
        self.contexts = [file_context(file) for file in files]
        self.proto_root = proto_root.rstrip("/")
        self.catalogue = Catalogue(files)
        self.blocks: list[str] = []

    def sources(self) -> list[str]:
        """Return the repository-relative paths of the documented .proto files.

        Returns:
            One path per file.

        """
        prefix = f"{self.proto_root}/" if self.proto_root else ""
        return [f"{prefix}{file.name}" for file in self.files]

    def render(self) -> str:
        """Render the whole page.

        Returns:
            The page's Markdown, ending with one newline.

        """
        sources = self.sources()
        self.blocks = [header_comment(sources), heading(1, "API reference", "api-reference")]
        packages = sorted({file.package for file in self.files})
        self.blocks.append(
            "The gRPC API as the protobuf spec defines it, generated from "
            + ", ".join(code(source) for source in sources)
            + " (package "
            + ", ".join(code(package) for package in packages)
            + "). Service `proto.API` is wire-compatible with Liftbridge API v1.9.0; the rules for "
            "Flux's additions are in [Concepts](../concepts.md#liftbridge-compatibility)."
        )
        self._render_overview()
        for file, ctx in zip(self.files, self.contexts, strict=True):
            for index, service in enumerate(file.service):
                self._render_service(ctx, (FILE_SERVICE, index), service)
        self.blocks.append(heading(2, "Messages", "messages"))
        for file, ctx in zip(self.files, self.contexts, strict=True):
            for index, message in enumerate(file.message_type):
                self._render_message(ctx, ctx.package, (FILE_MESSAGE_TYPE, index), message, 3)
        self.blocks.append(heading(2, "Enums", "enums"))
        for file, ctx in zip(self.files, self.contexts, strict=True):
            for index, enum in enumerate(file.enum_type):
                self._render_enum(ctx, ctx.package, (FILE_ENUM_TYPE, index), enum, 3)
        return "\n\n".join(self.blocks) + "\n"

    def _render_overview(self) -> None:
        """Render the files' own comments (on ``syntax`` and ``package``) as an overview."""
        overview: list[str] = []
        for file, ctx in zip(self.files, self.contexts, strict=True):
            blocks = [
                block
                for path in ((FILE_SYNTAX,), (FILE_PACKAGE,))
                for block in paragraph_blocks(ctx.info.comment(path))
            ]
            if blocks and len(self.files) > 1:
                overview.append(f"From {code(file.name)}:")
            overview.extend(blocks)
        if overview:
            self.blocks.append(heading(2, "Overview", "overview"))
            self.blocks.extend(overview)

    def _render_service(
        self, ctx: FileContext, path: Path_, service: descriptor_pb2.ServiceDescriptorProto
    ) -> None:
        full_name = _join(ctx.package, service.name)
        self.blocks.append(heading(2, f"Service {full_name}", anchor_for(full_name)))
        self.blocks.extend(_describe(ctx.info.comment(path), service.options.deprecated))
        rows = [
            [
                f"[{code(method.name)}](#{anchor_for(f'{full_name}.{method.name}')})",
                self._link_type(ctx, method.input_type),
                self._link_type(ctx, method.output_type),
                streaming_kind(method),
            ]
            for method in service.method
        ]
        if rows:
            self.blocks.append(table(["RPC", "Request", "Response", "Kind"], rows))
        else:
            self.blocks.append("This service has no RPCs.")
        for index, method in enumerate(service.method):
            self._render_method(ctx, full_name, (*path, SERVICE_METHOD, index), method)

    def _render_method(
        self,
        ctx: FileContext,
        service_name: str,
        path: Path_,
        method: descriptor_pb2.MethodDescriptorProto,
    ) -> None:
        self.blocks.append(heading(3, method.name, anchor_for(f"{service_name}.{method.name}")))
        request = self._link_type(ctx, method.input_type)
        response = self._link_type(ctx, method.output_type)
        if method.client_streaming:
            request = f"stream {request}"
        if method.server_streaming:
            response = f"stream {response}"
        grpc_path = code(f"/{service_name}/{method.name}")
        self.blocks.append(f"{request} → {response} · {streaming_kind(method)} · {grpc_path}")
        self.blocks.extend(_describe(ctx.info.comment(path), method.options.deprecated))

    def _render_message(
        self,
        ctx: FileContext,
        scope: str,
        path: Path_,
        message: descriptor_pb2.DescriptorProto,
        level: int,
    ) -> None:
        full_name = _join(scope, message.name)
        symbol = self.catalogue.symbols[full_name]
        self.blocks.append(heading(level, symbol.display, symbol.anchor))
        self.blocks.extend(_describe(ctx.info.comment(path), message.options.deprecated))
        rows = [
            self._field_row(ctx, message, (*path, MESSAGE_FIELD, index), field)
            for index, field in enumerate(message.field)
        ]
        if rows:
            self.blocks.append(table(["Field", "Number", "Type", "Description"], rows))
        else:
            self.blocks.append("This message has no fields.")
        reserved = reserved_block(
            ctx.info,
            (path, MESSAGE_RESERVED_RANGE, MESSAGE_RESERVED_NAME),
            [(r.start, r.end - 1) for r in message.reserved_range],  # end is exclusive here
            list(message.reserved_name),
            MAX_FIELD_NUMBER,
        )
        if reserved:
            self.blocks.append(reserved)
        for index, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:
                nested_path = (*path, MESSAGE_NESTED_TYPE, index)
                self._render_message(ctx, full_name, nested_path, nested, level + 1)
        for index, enum in enumerate(message.enum_type):
            self._render_enum(ctx, full_name, (*path, MESSAGE_ENUM_TYPE, index), enum, level + 1)

    def _field_row(
        self,
        ctx: FileContext,
        message: descriptor_pb2.DescriptorProto,
        path: Path_,
        field: descriptor_pb2.FieldDescriptorProto,
    ) -> list[str]:
        notes: list[str] = []
        if field.options.deprecated:
            notes.append("**Deprecated.**")
        if field.HasField("oneof_index") and not field.proto3_optional:
            notes.append(f"Part of oneof {code(message.oneof_decl[field.oneof_index].name)}.")
        text = cell_text(ctx.info.comment(path))
        if text:
            notes.append(text)
        return [code(field.name), str(field.number), self._field_type(ctx, field), " ".join(notes)]

    def _field_type(self, ctx: FileContext, field: descriptor_pb2.FieldDescriptorProto) -> str:
        entry = self.catalogue.map_entries.get(field.type_name.lstrip("."))
        if entry is not None and field.label == FDP.LABEL_REPEATED:
            key_name, _ = self._type_of(ctx, entry.field[0])
            value_name, anchor = self._type_of(ctx, entry.field[1])
            return _maybe_link(code(f"map<{key_name}, {value_name}>"), anchor)
        name, anchor = self._type_of(ctx, field)
        prefix = ""
        if field.label == FDP.LABEL_REPEATED:
            prefix = "repeated "
        elif field.label == FDP.LABEL_REQUIRED:
            prefix = "required "
        elif field.proto3_optional or ctx.proto2:
            prefix = "optional "
        return _maybe_link(code(prefix + name), anchor)

    def _type_of(
        self, ctx: FileContext, field: descriptor_pb2.FieldDescriptorProto
    ) -> tuple[str, str | None]:
        if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM, FDP.TYPE_GROUP):
            return self.catalogue.type_name(field.type_name, ctx.package)
        return SCALAR_TYPE_NAMES.get(field.type, f"type{field.type}"), None

    def _link_type(self, ctx: FileContext, type_name: str) -> str:
        name, anchor = self.catalogue.type_name(type_name, ctx.package)
        return _maybe_link(code(name), anchor)

    def _render_enum(
        self,
        ctx: FileContext,
        scope: str,
        path: Path_,
        enum: descriptor_pb2.EnumDescriptorProto,
        level: int,
    ) -> None:
        symbol = self.catalogue.symbols[_join(scope, enum.name)]
        self.blocks.append(heading(level, symbol.display, symbol.anchor))
        self.blocks.extend(_describe(ctx.info.comment(path), enum.options.deprecated))
        rows: list[list[str]] = []
        for index, value in enumerate(enum.value):
            notes = ["**Deprecated.**"] if value.options.deprecated else []
            text = cell_text(ctx.info.comment((*path, ENUM_VALUE, index)))
            if text:
                notes.append(text)
            rows.append([code(value.name), str(value.number), " ".join(notes)])
        self.blocks.append(table(["Name", "Number", "Description"], rows))
        reserved = reserved_block(
            ctx.info,
            (path, ENUM_RESERVED_RANGE, ENUM_RESERVED_NAME),
            [(r.start, r.end) for r in enum.reserved_range],  # end is inclusive for enums
            list(enum.reserved_name),
            MAX_ENUM_NUMBER,
        )
        if reserved:
            self.blocks.append(reserved)


def streaming_kind(method: descriptor_pb2.MethodDescriptorProto) -> str:
    """Name the streaming kind of an RPC.

    Args:
        method: the method descriptor.

    Returns:
        ``unary``, ``server streaming``, ``client streaming`` or ``bidirectional streaming``.

    """
    if method.client_streaming and method.server_streaming:
        return "bidirectional streaming"
    if method.server_streaming:
        return "server streaming"
    if method.client_streaming:
        return "client streaming"
    return "unary"


def _maybe_link(text: str, anchor: str | None) -> str:
    """Link ``text`` to ``#anchor`` when there is an anchor.

    Args:
        text: Markdown link text.
        anchor: a heading id, or None.

    Returns:
        The link, or ``text`` unchanged.

    """
    return f"[{text}](#{anchor})" if anchor else text


def _describe(comment: str, deprecated: bool) -> list[str]:
    """Build the description blocks of a service, RPC, message or enum.

    Args:
        comment: the element's raw comment.
        deprecated: whether the element is marked deprecated.

    Returns:
        Markdown blocks (possibly none).

    """
    blocks = ["**Deprecated.**"] if deprecated else []
    blocks.extend(paragraph_blocks(comment))
    return blocks


def reserved_block(
    info: SourceInfo,
    where: tuple[Path_, int, int],
    ranges: Sequence[tuple[int, int]],
    names: Sequence[str],
    max_number: int,
) -> str:
    """List the reserved numbers and names of a message or enum, one line per statement.

    Each ``reserved`` statement becomes a list item with its comment. Without source info (or
    when spans cannot be matched) all ranges and all names are listed on one line each.

    Args:
        info: the file's source info.
        where: the message's or enum's location path, and the descriptor field numbers of its
            reserved ranges and of its reserved names.
        ranges: the reserved ranges as inclusive (start, end) pairs.
        names: the reserved names.
        max_number: the largest number, shown as ``max``.

    Returns:
        A Markdown block, or an empty string when nothing is reserved.

    """
    path, range_field, name_field = where
    range_texts = [_range_text(start, end, max_number) for start, end in ranges]
    name_texts = [code(name) for name in names]
    items = _reserved_items(info, (*path, range_field), range_texts, "numbers")
    items += _reserved_items(info, (*path, name_field), name_texts, "names")
    if not items:
        return ""
    return "Reserved:\n\n" + "\n".join(f"- {item}" for item in items)


def _reserved_items(info: SourceInfo, path: Path_, texts: Sequence[str], what: str) -> list[str]:
    """Group reserved entries by the statement that declared them.

    Args:
        info: the file's source info.
        path: the path of the reserved statements (message or enum path plus the field number).
        texts: the rendered entries in declaration order.
        what: ``numbers`` or ``names``.

    Returns:
        One list item text per statement (or one for all entries when spans are unavailable).

    """
    if not texts:
        return []
    statements = info.all(path)
    entries = [info.all((*path, index)) for index in range(len(texts))]
    groups: list[list[str]] = [[] for _ in statements]
    matched = bool(statements) and all(entries)
    if matched:
        for text, locations in zip(texts, entries, strict=True):
            owner = next((i for i, s in enumerate(statements) if s.contains(locations[0])), None)
            if owner is None:
                matched = False
                break
            groups[owner].append(text)
    if not matched:
        return [f"{what} " + ", ".join(texts)]
    items: list[str] = []
    for statement, group in zip(statements, groups, strict=True):
        if not group:
            continue
        item = f"{what} " + ", ".join(group)
        comment = cell_text(statement.comment())
        items.append(f"{item}: {comment}" if comment else item)
    return items


def _range_text(start: int, end: int, max_number: int) -> str:
    """Render an inclusive range of reserved numbers.

    Args:
        start: first reserved number.
        end: last reserved number.
        max_number: the largest possible number, shown as ``max``.

    Returns:
        ``12``, or ``20`` to ``25``, or ``1000`` to max.

    """
    if start == end:
        return code(str(start))
    last = "max" if end >= max_number else code(str(end))
    return f"{code(str(start))} to {last}"


# --------------------------------------------------------------------------------------------
# Errors page
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorEntry:
    """One row of the shared error table."""

    name: str
    grpc_code: str
    reason: str
    liftbridge_message: str | None
    retriable: bool
    description: str


@dataclass(frozen=True)
class ClientErrorEntry:
    """One client-side row of the shared error table: raised by an SDK, no broker status."""

    name: str
    reason: str
    retriable: bool
    description: str


@dataclass(frozen=True)
class ErrorTable:
    """The contents of ``errors.json``."""

    version: int
    reason_metadata_key: str
    errors: tuple[ErrorEntry, ...]
    client_errors: tuple[ClientErrorEntry, ...] = ()


def load_errors(path: Path) -> ErrorTable:
    """Read and check ``errors.json``.

    Args:
        path: the file.

    Returns:
        The table.

    Raises:
        DocsError: if the file is unreadable or does not follow the schema. Extra keys are
            ignored so the table can grow before this page shows the new columns.

    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DocsError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DocsError(f"{path}: the top level must be an object")
    version = data.get("version")
    key = data.get("reason_metadata_key")
    entries = data.get("errors")
    if not isinstance(version, int) or isinstance(version, bool):
        raise DocsError(f"{path}: 'version' must be an integer")
    if not isinstance(key, str) or not key:
        raise DocsError(f"{path}: 'reason_metadata_key' must be a non-empty string")
    if not isinstance(entries, list):
        raise DocsError(f"{path}: 'errors' must be a list")
    client_entries = data.get("client_errors", [])
    if not isinstance(client_entries, list):
        raise DocsError(f"{path}: 'client_errors' must be a list")
    return ErrorTable(
        version,
        key,
        tuple(_error_entry(path, i, e) for i, e in enumerate(entries)),
        tuple(_client_error_entry(path, i, e) for i, e in enumerate(client_entries)),
    )


def _check_fields(
    path: Path, where: str, entry: object, fields: dict[str, tuple[type, ...]]
) -> dict[str, Any]:
    """Check that an entry is an object with every key of ``fields``, each of an allowed type.

    Args:
        path: the file, for messages.
        where: the entry's place in the file, for messages (``errors[3]``).
        entry: the decoded JSON value.
        fields: the required keys and their allowed JSON types.

    Returns:
        The entry.

    Raises:
        DocsError: if the entry is not an object, or a key is missing or has the wrong type.

    """
    if not isinstance(entry, dict):
        raise DocsError(f"{path}: {where} must be an object")
    for key, types in fields.items():
        if key not in entry:
            raise DocsError(f"{path}: {where} has no {key!r}")
        value = entry[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise DocsError(f"{path}: {where}.{key} has the wrong type")
    return entry


def _error_entry(path: Path, index: int, entry: object) -> ErrorEntry:
    """Check and convert one entry of the ``errors`` list.

    Args:
        path: the file, for messages.
        index: the entry's position, for messages.
        entry: the decoded JSON value.

    Returns:
        The entry.

    Raises:
        DocsError: if a key is missing or has the wrong type.

    """
    row = _check_fields(path, f"errors[{index}]", entry, ERROR_FIELDS)
    return ErrorEntry(
        name=row["name"],
        grpc_code=row["grpc_code"],
        reason=row["reason"],
        liftbridge_message=row["liftbridge_message"],
        retriable=row["retriable"],
        description=row["description"],
    )


def _client_error_entry(path: Path, index: int, entry: object) -> ClientErrorEntry:
    """Check and convert one entry of the ``client_errors`` list.

    Args:
        path: the file, for messages.
        index: the entry's position, for messages.
        entry: the decoded JSON value.

    Returns:
        The entry.

    Raises:
        DocsError: if a key is missing or has the wrong type.

    """
    row = _check_fields(path, f"client_errors[{index}]", entry, CLIENT_ERROR_FIELDS)
    return ClientErrorEntry(
        name=row["name"],
        reason=row["reason"],
        retriable=row["retriable"],
        description=row["description"],
    )


def render_errors(errors: ErrorTable, source: str) -> str:
    """Render the error reference page.

    Args:
        errors: the error table.
        source: the repository-relative path of ``errors.json``, named in the header.

    Returns:
        The page's Markdown, ending with one newline.

    """
    key = code(errors.reason_metadata_key)
    key_literal = json.dumps(errors.reason_metadata_key)  # a Python string literal, "..." style
    blocks = [
        header_comment([source]),
        heading(1, "Errors", "errors"),
        "Flux has **one error table**, shared by the broker and every SDK. It is data that lives "
        f"with the spec, in {code(source)} (table version {errors.version}), and it is the "
        "contract in both directions: from a broker error to a gRPC status, and from a gRPC "
        "status back to an SDK's typed error, so no component has to parse error messages. "
        "This page is generated from that file.",
        "Every error status keeps **Liftbridge's gRPC code and text**, so an application written "
        "against a Liftbridge client sees what it expects, and adds a machine-readable "
        f"**reason** in the trailing metadata under the key {key} (for example "
        f"{key}: `stop-reached`).",
        heading(2, "Reading the reason", "reading-the-reason"),
        "With `grpcio` in Python, the reason of a failed call is in the error's trailing metadata:",
        "```python\n"
        "try:\n"
        "    stub.CreateStream(request)\n"
        "except grpc.RpcError as err:\n"
        f"    reason = dict(err.trailing_metadata() or ()).get({key_literal})\n"
        "```",
        "A client that does not know the key ignores it, as gRPC clients ignore unknown metadata.",
        heading(2, "Error table", "error-table"),
        "**Liftbridge text** is Liftbridge's fixed status message for the condition; — means "
        "the text varies or Liftbridge has no such condition. **Retriable** says whether the "
        "same request may succeed when retried (after refreshing metadata or backing off, as "
        "the meaning says).",
    ]
    rows = [
        [
            code(entry.name),
            code(entry.grpc_code),
            code(entry.reason),
            code(entry.liftbridge_message) if entry.liftbridge_message is not None else "—",
            "yes" if entry.retriable else "no",
            escape_inline(" ".join(entry.description.split())),
        ]
        for entry in errors.errors
    ]
    blocks.append(
        table(["Name", "gRPC code", "Reason", "Liftbridge text", "Retriable", "Meaning"], rows)
    )
    if errors.client_errors:
        blocks += [
            heading(2, "Client-side errors", "client-side-errors"),
            "SDKs raise these errors themselves, without any broker status (so they have no gRPC "
            "code or Liftbridge text), and the `code` of every SDK error is one of the names on "
            "this page.",
            table(
                ["Name", "Reason", "Retriable", "Meaning"],
                [
                    [
                        code(entry.name),
                        code(entry.reason),
                        "yes" if entry.retriable else "no",
                        escape_inline(" ".join(entry.description.split())),
                    ]
                    for entry in errors.client_errors
                ],
            ),
        ]
    return "\n\n".join(blocks) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def load_files(path: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    """Read a FileDescriptorSet and keep the files to document.

    Args:
        path: the descriptor set written by ``protoc --descriptor_set_out``.

    Returns:
        Its files except protobuf's well-known types, in the set's order.

    Raises:
        DocsError: if the file cannot be read or parsed, has no file to document, or was
            written without ``--include_source_info``.

    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocsError(f"cannot read {path}: {exc}") from exc
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    try:
        descriptor_set.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError; any failure is fatal here.
        raise DocsError(f"{path} is not a FileDescriptorSet: {exc}") from exc
    files = [f for f in descriptor_set.file if not f.name.startswith(SKIPPED_FILE_PREFIX)]
    if not files:
        raise DocsError(f"{path} describes no .proto file to document")
    for file in files:
        if SourceInfo(file.source_code_info).empty:
            raise DocsError(
                f"{path}: {file.name} has no source info; run protoc with --include_source_info"
            )
    return files


def repository_path(path: Path) -> str:
    """Name an input file relative to the repository root, whatever the working directory.

    Args:
        path: the file as given on the command line (absolute or relative).

    Returns:
        The POSIX path relative to the repository root, or ``path`` as given when the file is
        outside the repository.

    """
    try:
        return path.resolve().relative_to(REPOSITORY_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8, LF) unless the file already holds exactly that.

    Args:
        path: the output file; its directory is created if needed.
        text: the content.

    """
    data = text.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: the arguments without the program name; None reads ``sys.argv``.

    Returns:
        The parsed options.

    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--descriptor-set",
        type=Path,
        required=True,
        help="FileDescriptorSet written by protoc with --include_source_info",
    )
    parser.add_argument("--errors", type=Path, required=True, help="the errors.json table")
    parser.add_argument("--api-out", type=Path, required=True, help="API page to write")
    parser.add_argument("--errors-out", type=Path, required=True, help="errors page to write")
    parser.add_argument(
        "--proto-root",
        default="proto/src",
        help="include directory the .proto names are relative to, as named in "
        "the page header (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate both pages.

    Args:
        argv: the arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 1 when an input cannot be documented.

    """
    args = parse_args(argv)
    try:
        files = load_files(args.descriptor_set)
        api = ApiPage(files, args.proto_root).render()
        errors = render_errors(load_errors(args.errors), repository_path(args.errors))
    except DocsError as exc:
        sys.stderr.write(f"api_docs: error: {exc}\n")
        return 1
    write_if_changed(args.api_out, api)
    write_if_changed(args.errors_out, errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
