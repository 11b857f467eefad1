"""Built-in models that ``iotoffload model prepare NAME`` knows how to build."""

from __future__ import annotations

from dataclasses import dataclass

from iotoffload.model.manifest import Preprocessing


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    source: str  # "keras:<applications class>"
    input_shape: tuple[int, int, int]  # H, W, C (NHWC, batch 1 added)
    preprocessing: Preprocessing
    weights_note: str  # where real weights come from


CATALOG: dict[str, CatalogEntry] = {
    "mobilenet": CatalogEntry(
        name="mobilenet",
        description="MobileNetV2 1.0/224 (Keras), 18 blocks",
        source="keras:MobileNetV2",
        input_shape=(224, 224, 3),
        preprocessing=Preprocessing(
            size=(224, 224), mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)
        ),
        weights_note=(
            "ImageNet weights through Keras (download or ~/.keras/models cache), a local .h5 "
            "with --weights PATH, else seeded random weights"
        ),
    ),
}


def catalog_entry(name: str) -> CatalogEntry | None:
    return CATALOG.get(name)
