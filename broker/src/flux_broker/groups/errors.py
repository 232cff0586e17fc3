"""Errors of consumer-group operations; :mod:`flux_broker.api.status` maps each to its row.

Messages are safe to send to clients: ids in them are quoted with
:func:`~flux_broker.nats.subjects.shown` (escaped and shortened).
"""

from __future__ import annotations

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
]


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
