"""flux_client: the Python SDK for Flux.

This foundation release exposes only the package version; the client, producer, consumer and
consumer groups come with their issues. ``__all__`` is the public surface and is checked by a
test: a name is public if and only if it is listed here.
"""

from importlib.metadata import version as _version

__version__: str = _version("flux-client")

__all__ = ["__version__"]
