"""iotoffload: incremental DNN offloading from IoT devices to edge servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iotoffload")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
