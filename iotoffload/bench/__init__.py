"""The testbed and benchmark scenarios behind ``iotoffload bench``."""
