"""flux-broker: durable, replayable message streams for NATS with a Liftbridge-compatible API.

This release is the foundation only: the ``flux-broker`` command is a placeholder that says so.
The commit log, the gRPC API and the embedded NATS server come with the next issues.
"""

from importlib.metadata import version as _version

__version__: str = _version("flux-broker")

__all__ = ["__version__"]
