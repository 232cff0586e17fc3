"""Streams and their partitions: what a broker does for the partitions it leads.

Modules:

- :mod:`flux_broker.streams.partition` -- :class:`~flux_broker.streams.partition.Partition`,
  the leader's ingest path: NATS messages on a partition subject are appended to its commit
  log in batches, committed, and acknowledged on their ack inboxes (Liftbridge's envelope
  protocol).
- :mod:`flux_broker.streams.delivery` -- how a stored record becomes the ``Message`` that
  Subscribe sends.
- :mod:`flux_broker.streams.manager` -- :class:`~flux_broker.streams.manager.StreamManager`:
  creates, recovers, pauses, resumes, makes read-only and deletes streams, command first.
- :mod:`flux_broker.streams.live` -- the live partitions and streams the handlers look up,
  with their state (active, paused, deleted, closed).
- :mod:`flux_broker.streams.runner` -- opening and closing partitions' logs and leaders.
- :mod:`flux_broker.streams.auto_pause` -- the timer that pauses idle partitions.
- :mod:`flux_broker.streams.storage` -- where streams live on disk.

Import what you need from the modules; this package imports nothing on its own.
"""
