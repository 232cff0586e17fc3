"""Flux's side of NATS: the Liftbridge envelope codec and subject and stream-name rules.

Modules:

- :mod:`flux_broker.nats.envelope` -- the byte layout of Liftbridge's NATS envelope (magic
  ``B9 0E 43 B4``) that wraps publishes, acks and internal requests sent over NATS.
- :mod:`flux_broker.nats.subjects` -- validation of stream names and NATS subjects, and the
  mapping from a stream's subject to its partitions' subjects and ack inboxes.
- :mod:`flux_broker.nats.embedded` -- the broker's own ``nats-server``, a supervised child
  process.

Errors of the codec and the rules (all ``ValueError``: the input, not the broker, is wrong)::

    ValueError
    ├── EnvelopeError         bytes with the envelope magic are not a valid envelope
    ├── InvalidNameError      a stream name breaks the name rule (or is reserved)
    └── InvalidSubjectError   a string is not a NATS subject Flux accepts where it was given

Import what you need from the modules; this package imports nothing on its own.
"""
