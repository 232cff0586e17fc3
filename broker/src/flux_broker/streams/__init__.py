"""Streams and their partitions: what a broker does for the partitions it leads.

Modules:

- :mod:`flux_broker.streams.partition` -- :class:`~flux_broker.streams.partition.Partition`,
  the leader's ingest path: NATS messages on a partition subject are appended to its commit
  log in batches, committed, and acknowledged on their ack inboxes (Liftbridge's envelope
  protocol).
- :mod:`flux_broker.streams.delivery` -- how a stored record becomes the ``Message`` that
  Subscribe sends.

Import what you need from the modules; this package imports nothing on its own.
"""
