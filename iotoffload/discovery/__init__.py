"""Finding edges on the local network: zeroconf (mDNS/DNS-SD) advertise and browse.

Interfaces are always explicit: tests, benchmarks and the demo bind to 127.0.0.1.
"""

from iotoffload.discovery.zc import (
    SERVICE_TYPE,
    EdgeAdvertiser,
    EdgeRecord,
    EdgeWatcher,
    browse_edges,
)

__all__ = ["SERVICE_TYPE", "EdgeAdvertiser", "EdgeRecord", "EdgeWatcher", "browse_edges"]
