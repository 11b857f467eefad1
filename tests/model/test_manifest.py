from __future__ import annotations

import json
from typing import Any

import pytest

from iotoffload.model import Manifest, PackageError, compute_model_id
from iotoffload.model.manifest import FORMAT_VERSION


def _block(i: int, shape_in: list[int], shape_out: list[int], digest: str) -> dict[str, Any]:
    n = 4
    for d in shape_out:
        n *= d
    return {
        "index": i,
        "tflite": f"b{i:02d}.tflite",
        "onnx": f"b{i:02d}.onnx",
        "tflite_sha256": "a" * 64,
        "onnx_sha256": digest,
        "input": {"name": f"t{i}", "shape": shape_in, "dtype": "float32"},
        "output": {"name": f"t{i + 1}", "shape": shape_out, "dtype": "float32"},
        "output_bytes": n,
        "param_bytes": 10,
        "onnx_bytes": 100,
        "flops": 1000,
    }


def raw_manifest() -> dict[str, Any]:
    digests = ["b" * 64, "c" * 64]
    return {
        "format": FORMAT_VERSION,
        "name": "tiny",
        "model_id": compute_model_id(digests),
        "weights": "seeded",
        "weights_detail": "seed=0",
        "source": "test",
        "input": {"shape": [1, 8, 8, 3], "dtype": "float32", "layout": "NHWC"},
        "labels": None,
        "blocks": [
            _block(0, [1, 8, 8, 3], [1, 4, 4, 8], digests[0]),
            _block(1, [1, 4, 4, 8], [1, 10], digests[1]),
        ],
    }


def test_round_trip_is_lossless() -> None:
    m = Manifest.model_validate(raw_manifest())
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.num_blocks == 2
    assert json.loads(m.to_json())["blocks"][1]["output"]["shape"] == [1, 10]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(format=99), "format 99 is not supported"),
        (lambda r: r["blocks"].reverse(), "chain order"),
        (lambda r: r["blocks"][1]["input"].update(shape=[1, 4, 4, 9]), "does not match block 0"),
        (lambda r: r.update(model_id="0" * 64), "model_id does not match"),
        (lambda r: r["blocks"][0].update(output_bytes=5), "output_bytes"),
        (lambda r: r["blocks"][0].update(onnx_sha256="xyz"), "onnx_sha256"),
        (lambda r: r.update(surprise=1), "surprise"),
        (lambda r: r.update(blocks=[]), "blocks"),
        (lambda r: r["input"].update(shape=[1, 9, 9, 3]), "block 0 input"),
        (lambda r: r["blocks"][0]["output"].update(shape=[1, 0, 4, 8]), "must be > 0"),
        (lambda r: r.update(name="../evil"), "name"),
    ],
)
def test_schema_errors_are_clear(mutate: Any, message: str) -> None:
    r = raw_manifest()
    mutate(r)
    with pytest.raises(PackageError, match="invalid manifest") as e:
        Manifest.from_json(json.dumps(r), origin="x/manifest.json")
    assert message in str(e.value)
    assert "x/manifest.json" in str(e.value)


def test_not_json_is_a_package_error() -> None:
    with pytest.raises(PackageError, match="not valid JSON"):
        Manifest.from_json(b"{nope", origin="m.json")


def test_model_id_depends_on_every_digest_and_their_order() -> None:
    a, b = "1" * 64, "2" * 64
    assert compute_model_id([a, b]) != compute_model_id([b, a])
    assert compute_model_id([a]) != compute_model_id([a, b])
    assert len(compute_model_id([a])) == 64
