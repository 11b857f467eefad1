"""Model packages: a DNN cut into a chain of blocks, each as ``.tflite`` and ``.onnx``."""

from iotoffload.model.build import prepare_catalog, prepare_pair
from iotoffload.model.cache import ModelCache
from iotoffload.model.catalog import CATALOG, CatalogEntry
from iotoffload.model.errors import (
    BuildError,
    CutError,
    MissingDependencyError,
    ModelError,
    PackageError,
    VerificationError,
)
from iotoffload.model.manifest import (
    FORMAT_VERSION,
    BlockSpec,
    InputSpec,
    Manifest,
    Preprocessing,
    TensorSpec,
    compute_model_id,
)
from iotoffload.model.package import ModelPackage

__all__ = [
    "CATALOG",
    "FORMAT_VERSION",
    "BlockSpec",
    "BuildError",
    "CatalogEntry",
    "CutError",
    "InputSpec",
    "Manifest",
    "MissingDependencyError",
    "ModelCache",
    "ModelError",
    "ModelPackage",
    "PackageError",
    "Preprocessing",
    "TensorSpec",
    "VerificationError",
    "compute_model_id",
    "prepare_catalog",
    "prepare_pair",
]
