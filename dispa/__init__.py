"""Dispa: a high-throughput reverse proxy and API gateway.

The public plugin API lives here once it exists; everything else is internal.
"""

__version__ = "0.1.0"
