"""Upload forms through the cache and the CLI: ``resolve(name, upload_weights=…)``,
``model prepare NAME --upload-weights``, ``model show`` / ``list`` / ``verify``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iotoffload.cli import app
from iotoffload.model import ModelCache, ModelPackage
from iotoffload.model.errors import ModelError
from iotoffload.model.weights import AgreementError
from tests.model.test_weights import trap_model, write_package

runner = CliRunner()


@pytest.fixture
def cache(tmp_path: Path) -> ModelCache:
    write_package(tmp_path / "trap", trap_model())
    return ModelCache(tmp_path)


def test_plain_resolve_is_unchanged(cache: ModelCache) -> None:
    pkg = cache.resolve("trap")
    assert pkg.root == cache.path("trap") and pkg.manifest.upload_weights == "float32"
    assert not cache.path("trap", "float16").exists()  # nothing derived behind one's back


def test_resolve_by_form(cache: ModelCache) -> None:
    f16 = cache.resolve("trap", upload_weights="float16")
    assert f16.root == cache.path("trap", "float16") == cache.root / "trap@float16"
    assert f16.manifest.upload_weights == "float16"
    assert cache.resolve("trap", upload_weights="float32").root == cache.path("trap")
    with pytest.raises(AgreementError, match=r"int8 upload weights refused: .* below the required"):
        cache.resolve("trap", upload_weights="int8")
    auto = cache.choose("trap", "auto")
    assert auto.form == "float16" and auto.package.root == f16.root
    # the variant's own directory resolves as named, and as its own form
    assert cache.resolve("trap@float16").manifest == f16.manifest
    assert cache.resolve("trap@float16", upload_weights="float16").root == f16.root
    with pytest.raises(ModelError, match="holds float16 weights: name its float32 package"):
        cache.resolve("trap@float16", upload_weights="int8")


def test_names_list_packages_and_forms_tell_their_state(cache: ModelCache) -> None:
    base = cache.load("trap")
    assert [(f.form, f.state) for f in cache.forms(base)] == [
        ("float32", "ready"),
        ("float16", "none"),
        ("int8", "none"),
    ]
    cache.choose("trap", "auto", samples=32)
    assert cache.names() == ["trap"]  # variants are not packages of their own name
    states = {f.form: f for f in cache.forms(base)}
    assert states["float16"].state == "ready" and states["int8"].state == "refused"
    assert states["int8"].agreement is not None and states["int8"].agreement.samples == 32


def test_resolve_without_build_names_the_command(cache: ModelCache) -> None:
    with pytest.raises(ModelError, match="iotoffload model prepare trap --upload-weights auto"):
        cache.resolve("trap", build=False, upload_weights="auto")


def _cli(cache: ModelCache, *args: str) -> str:
    r = runner.invoke(app, ["model", *args, "--cache-dir", str(cache.root)])
    assert r.exit_code == 0, r.output
    return r.output


def test_prepare_show_and_list_report_the_form_and_agreement(cache: ModelCache) -> None:
    out = _cli(cache, "prepare", "trap", "--upload-weights", "auto", "--samples", "64")
    assert "upload weights auto → float16: top-1 agreement 100.0 % over 64 samples (at" in out
    assert "int8 refused (top-1 agreement" in out
    assert "trap@float16" in out
    out = _cli(cache, "show", "trap", "--upload-weights", "float16")
    assert "upload weights float16" in out and "agreement: top-1 100.0 % over 64 samples" in out
    assert "required 99 %" in out
    out = _cli(cache, "show", "trap")
    assert "upload weights float32" in out
    out = _cli(cache, "list")  # the table wraps its last column: look for the pieces
    assert "float16 (100.0 %)" in out and "int8" in out and "refused (" in out
    manifest = json.loads(_cli(cache, "show", "trap", "--upload-weights", "float16", "--json"))
    assert manifest["upload_weights"] == "float16" and manifest["agreement"]["samples"] == 64


def test_prepare_refuses_a_form_below_the_threshold(cache: ModelCache) -> None:
    r = runner.invoke(
        app,
        [
            "model",
            "prepare",
            "trap",
            "--upload-weights",
            "int8",
            "--samples",
            "32",
            "--cache-dir",
            str(cache.root),
        ],
    )
    assert r.exit_code == 2
    assert "int8 upload weights refused: top-1 agreement with float32 is" in r.output
    assert "over 32 samples" in r.output
    assert not cache.path("trap", "int8").exists()


def test_bad_upload_weights_value(cache: ModelCache) -> None:
    r = runner.invoke(
        app, ["model", "show", "trap", "--upload-weights", "int4", "--cache-dir", str(cache.root)]
    )
    assert r.exit_code == 2 and "--upload-weights must be one of" in r.output


def test_verify_a_real_variant_with_its_form_tolerances(
    efficientnet: ModelPackage, tmp_path: Path
) -> None:
    import shutil

    shutil.copytree(efficientnet.root, tmp_path / "efficientnet-lite0")
    c = ModelCache(tmp_path)
    v = c.choose("efficientnet-lite0", "float16", samples=8).package
    assert v.manifest.upload_weights == "float16"
    out = _cli(c, "verify", "efficientnet-lite0", "--upload-weights", "float16")
    assert "tolerance 0.1" in out and "float16 blocks, worst block" in out
    out = _cli(c, "verify", "efficientnet-lite0")  # the float32 package, as before
    assert "tolerance 0.0001" in out and "worst block" not in out
