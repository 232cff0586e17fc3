"""The broker's gRPC surface: the ``proto.API`` servicer, one module per RPC family.

Modules:

- :mod:`flux_broker.api.status` -- the one place that turns broker errors into gRPC statuses,
  through the shared error table (:mod:`flux_proto.errors`): Liftbridge's code and text plus a
  machine-readable reason in the trailing metadata key ``flux-reason``. Handlers raise typed
  errors (or :class:`~flux_broker.api.status.FluxStatus`) and are wrapped with
  :func:`~flux_broker.api.status.guarded`; none builds a status inline.

Import what you need from the modules; this package imports nothing on its own.
"""
