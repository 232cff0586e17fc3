"""Generated code and shared data of the Flux API.

``flux_proto`` is the one Python distribution that holds code generated from ``proto/``; the
broker, the Python SDK, the conformance runner and the test fixtures all import it, so one
process never loads two copies of the ``proto.*`` messages into protobuf's descriptor pool.

Modules:

- :mod:`flux_proto.api_pb2` -- messages and enums of service ``proto.API`` (Liftbridge API
  v1.9.0 compatible), with typed stubs from mypy-protobuf.
- :mod:`flux_proto.api_pb2_grpc` -- ``grpc`` / ``grpc.aio`` client stub and servicer base.
- :mod:`flux_proto.errors` -- the error table shared by the broker and every SDK.

The ``.proto`` source ships inside the package as ``flux_proto/api.proto``.
"""

from importlib.metadata import version as _version

__version__: str = _version("flux-proto")

#: Version of the Liftbridge client API this package is wire-compatible with.
LIFTBRIDGE_API_VERSION = "1.9.0"

__all__ = ["LIFTBRIDGE_API_VERSION", "__version__"]
