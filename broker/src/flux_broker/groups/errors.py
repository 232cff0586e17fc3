"""Errors of consumer-group operations; :mod:`flux_broker.api.status` maps each to its row.

Messages are safe to send to clients: ids in them are shown with ``repr`` and shortened.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "GroupAssignorMismatchError",
    "GroupEpochMismatchError",
    "GroupError",
    "GroupFencedError",
    "GroupNotEmptyError",
    "GroupNotFoundError",
    "GroupsFullError",
    "NotCoordinatorError",
    "NotGroupMemberError",
    "NotPartitionOwnerError",
    "shown",
]

#: Longest part of an id quoted in a message.
_SHOWN_MAX_CHARS: Final = 64


def shown(value: str) -> str:
    """``value`` quoted for a message, shortened if long."""
    if len(value) <= _SHOWN_MAX_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_MAX_CHARS]!r}..."


class GroupError(Exception):
    """A consumer-group request that cannot be served; nothing was changed."""


class GroupNotFoundError(GroupError):
    """No group has this id (for assignment calls: or it has no members)."""


class NotGroupMemberError(GroupError):
    """The consumer is not a member of the group."""


class GroupEpochMismatchError(GroupError):
    """The request's epoch is not the group's current epoch."""


class NotCoordinatorError(GroupError):
    """This broker is not the coordinator, or a report names a stale coordinator or epoch."""


class NotPartitionOwnerError(GroupError):
    """A member-checked commit from a member that does not own the partition."""


class GroupFencedError(GroupError):
    """A group subscription with a newer epoch holds the partition."""


class GroupNotEmptyError(GroupError):
    """The operation needs a group without members."""


class GroupAssignorMismatchError(GroupError):
    """A join names another assignor than the group's."""


class GroupsFullError(GroupError):
    """The broker keeps its limit of groups; a new one cannot be created."""
