"""Class labels that ship with the project."""

from __future__ import annotations

from importlib import resources


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (see iotoffload/data/NOTICE)."""
    text = resources.files("iotoffload").joinpath("data/imagenet_labels.txt").read_text()
    labels = text.splitlines()
    assert len(labels) == 1000
    return labels
