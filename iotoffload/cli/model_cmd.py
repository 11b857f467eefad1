"""``iotoffload model …``: prepare, list, show, verify, sign and run model packages."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from iotoffload.cli._console import console, rich_progress, user_errors
from iotoffload.config import ModelSettings
from iotoffload.model.build import prepare_catalog, prepare_pair
from iotoffload.model.cache import ModelCache
from iotoffload.model.catalog import CATALOG
from iotoffload.model.cuts import CUT_POLICIES, CutPolicy
from iotoffload.model.errors import ModelError
from iotoffload.model.package import ModelPackage
from iotoffload.model.preprocess import load_input, top_k
from iotoffload.model.progress import Progress
from iotoffload.model.signing import (
    KEY_NAME,
    SIGNATURE_NAME,
    check_package,
    fingerprint,
    load_private_key,
    sign_package,
    write_keypair,
)
from iotoffload.model.upload_files import with_upload_files
from iotoffload.model.verify import DEFAULT_TOLERANCE, verify_package
from iotoffload.model.weights import (
    AGREEMENT_THRESHOLD,
    DEFAULT_SAMPLES,
    UPLOAD_CHOICES,
    FormChoice,
    UploadChoice,
    choose_form,
)
from iotoffload.runtime.onnx import OnnxExecutor
from iotoffload.runtime.tflite import TFLiteExecutor

app = typer.Typer(
    help="Prepare, inspect, sign and run model packages.",
    no_args_is_help=True,
    add_completion=False,
)

CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Package cache (default ~/.cache/iotoffload/models, or $IOTOFFLOAD_CACHE_DIR).",
    ),
]


UploadOpt = Annotated[
    str | None,
    typer.Option(
        "--upload-weights",
        help="The upload form: float32 | float16 | int8 | auto (int8 if its top-1 agreement "
        "with float32 holds, else float16, else float32). Default: the package as named.",
    ),
]


def _upload_choice(value: str | None) -> UploadChoice | None:
    if value is None:
        return None
    for c in UPLOAD_CHOICES:
        if value == c:
            return c
    raise ModelError(f"--upload-weights must be one of {', '.join(UPLOAD_CHOICES)}")


def _cache(cache_dir: Path | None) -> ModelCache:
    return ModelCache(cache_dir) if cache_dir else ModelCache.from_settings()


def _blocks_table(pkg: ModelPackage, title: str) -> Table:
    t = Table(title=title)
    cols = ("block", "output shape", "output KiB", "params KiB", "ONNX KiB", "upload KiB", "MFLOPs")
    for col in cols:
        t.add_column(col, justify="right")
    for b in pkg.blocks:
        t.add_row(
            str(b.index),
            "×".join(map(str, b.output.shape)),
            f"{b.output_bytes / 1024:.1f}",
            f"{b.param_bytes / 1024:.1f}",
            f"{b.onnx_bytes / 1024:.1f}",
            f"{b.upload_bytes / 1024:.1f}" + ("" if b.upload is None else f" {b.encoding}"),
            f"{b.flops / 1e6:.1f}",
        )
    t.add_section()
    t.add_row(
        "total",
        "",
        "",
        f"{sum(b.param_bytes for b in pkg.blocks) / 1024:.1f}",
        f"{sum(b.onnx_bytes for b in pkg.blocks) / 1024:.1f}",
        f"{sum(b.upload_bytes for b in pkg.blocks) / 1024:.1f}",
        f"{sum(b.flops for b in pkg.blocks) / 1e6:.1f}",
    )
    return t


def _describe(pkg: ModelPackage) -> None:
    m = pkg.manifest
    weights = m.weights + (f" ({m.weights_detail})" if m.weights_detail else "")
    if m.weights == "seeded":
        weights = f"[bold yellow]{weights}: random weights, predictions are meaningless[/]"
    console.print(f"[bold]{m.name}[/]  model_id {m.model_id[:16]}…  source {m.source}")
    console.print(f"input {m.input.dtype}{list(m.input.shape)} {m.input.layout}; weights {weights}")
    if m.verification:
        v = m.verification
        console.print(
            f"verified: worst split k={v.worst_split} differs from the {v.reference} by "
            f"{v.max_rel_error:.2e} relative (tolerance {v.tolerance:g})"
        )
        if v.block_max_rel_error is not None:
            console.print(
                f"          worst block {v.worst_block} differs from its TFLite block by "
                f"{v.block_max_rel_error:.2e} relative (tolerance {v.block_tolerance:g})"
            )
    upload = sum(b.onnx_bytes for b in m.blocks) / 1e6
    sent = sum(b.upload_bytes for b in m.blocks) / 1e6
    if sent < upload:
        console.print(
            f"upload: {sent:.1f} MB sent for {upload:.1f} MB of ONNX blocks (lossless encoding, "
            f"{sum(b.upload is not None for b in m.blocks)} of {m.num_blocks} blocks)"
        )
    if m.agreement is None:
        console.print(f"upload weights float32 ({upload:.1f} MB of ONNX blocks)")
    else:
        a = m.agreement
        console.print(
            f"upload weights [bold]{m.upload_weights}[/] ({upload:.1f} MB of ONNX blocks), "
            f"derived from float32 model_id {(m.derived_from or '')[:16]}…"
        )
        classes = f", float32's top-1 spans {a.distinct_top1} classes" if a.distinct_top1 else ""
        console.print(
            f"agreement: top-1 {a.top1 * 100:.1f} % over {a.samples} samples (required "
            f"{a.threshold * 100:g} %{classes}), max relative error {a.max_rel_error:.2e}; "
            f"samples: {a.sample_set}"
        )
        if m.weights == "seeded":
            console.print(
                "[yellow]seeded weights: their outputs are near ties, so the agreement "
                "measures how often rounding flips a tie[/]"
            )
    state = check_package(pkg)
    if state.signature is None and state.problem is None:
        console.print("unsigned")
    elif state.signature is not None and state.problem is None:
        console.print(f"[green]signed[/] by {state.signature.signer} ({SIGNATURE_NAME})")
    else:
        who = f" by {state.signature.signer}" if state.signature else ""
        console.print(f"[bold red]signature{who} is not valid:[/] {state.problem}")


@app.command()
@user_errors
def prepare(
    name: Annotated[
        str | None, typer.Argument(help="Catalog model to build, e.g. mobilenet.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the package here instead of the cache.")
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="auto (ImageNet if obtainable, else seeded, said loudly) | imagenet (insist) | "
            "seeded | PATH.h5"
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for seeded weights.")] = 0,
    tflite: Annotated[Path | None, typer.Option(help="A user's whole model as .tflite …")] = None,
    onnx: Annotated[Path | None, typer.Option(help="… and the same model as .onnx.")] = None,
    package_name: Annotated[
        str | None, typer.Option("--name", help="Name for --tflite/--onnx.")
    ] = None,
    cuts: Annotated[
        str | None,
        typer.Option(
            help="narrow: cut where the boundary tensor is a local minimum (block outputs) | "
            "blocks: every single-tensor cut, light segments merged (residual nets) | "
            "all: every single-tensor cut point. Default: the catalog entry's, else narrow."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild an existing package.")] = False,
    tolerance: Annotated[
        float, typer.Option(help="Max relative error of any split.")
    ] = DEFAULT_TOLERANCE,
    export_whole: Annotated[
        Path | None,
        typer.Option(
            hidden=True, help="Also write the whole model as model.tflite + model.onnx here."
        ),
    ] = None,
    torch_ref: Annotated[
        str | None,
        typer.Option(
            "--torch", help="A PyTorch module as package.module:factory (exported to ONNX)."
        ),
    ] = None,
    input_shape: Annotated[
        str, typer.Option(help="NCHW input shape for --torch, e.g. 1,3,224,224.")
    ] = "1,3,224,224",
    upload_weights: Annotated[
        str,
        typer.Option(
            help="How the ONNX blocks a device uploads store their weights: float32 | "
            "float16 | int8 | auto (int8 if its top-1 agreement with float32 holds, else "
            "float16, else float32). A float16/int8 variant is derived from the float32 "
            "package (built first if missing) and refused below --min-agreement."
        ),
    ] = "float32",
    min_agreement: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Least top-1 agreement with float32 a float16/int8 variant must hold "
            "(recorded in its manifest).",
        ),
    ] = AGREEMENT_THRESHOLD,
    samples: Annotated[
        int, typer.Option(min=1, max=4096, help="Sample inputs the agreement is measured on.")
    ] = DEFAULT_SAMPLES,
    cache_dir: CacheOpt = None,
) -> None:
    """Build a model package: a catalog model (see `model list --available`), a user's ONNX
    model (--onnx M.onnx --name N: cut in the graph, each block converted by onnx2tf), or a
    user's whole-model .tflite + .onnx pair (cut without TensorFlow; the 'cut' extra); with
    --upload-weights, also its float16/int8 upload variant (`<name>@<form>` beside it)."""
    if cuts is not None and cuts not in CUT_POLICIES:
        raise ModelError(f"--cuts must be one of {', '.join(CUT_POLICIES)}")
    form = _upload_choice(upload_weights) or "float32"
    cache = _cache(cache_dir)
    t0 = time.perf_counter()
    with rich_progress() as progress:
        pkg = _prepare_base(
            cache,
            name=name,
            out=out,
            weights=weights,
            seed=seed,
            tflite=tflite,
            onnx=onnx,
            package_name=package_name,
            cuts=cuts,
            force=force,
            tolerance=tolerance,
            export_whole=export_whole,
            torch_ref=torch_ref,
            input_shape=input_shape,
            reuse=form != "float32",
            progress=progress,
        )
        choice: FormChoice | None = None
        if form != "float32":
            choice = choose_form(
                pkg,
                form,
                force=force,
                threshold=min_agreement,
                samples=samples,
                progress=progress,
            )
            pkg = choice.package
    console.print(_blocks_table(pkg, f"{pkg.name}: {pkg.num_blocks} blocks"))
    _describe(pkg)
    if choice is not None:
        console.print(f"upload weights {form} → [bold]{choice.reason}[/]")
    console.print(f"prepared in {time.perf_counter() - t0:.1f} s → {pkg.root}")


def _prepare_base(
    cache: ModelCache,
    *,
    name: str | None,
    out: Path | None,
    weights: str,
    seed: int,
    tflite: Path | None,
    onnx: Path | None,
    package_name: str | None,
    cuts: CutPolicy | None,
    force: bool,
    tolerance: float,
    export_whole: Path | None,
    torch_ref: str | None,
    input_shape: str,
    reuse: bool,
    progress: Progress,
) -> ModelPackage:
    """The float32 package; ``reuse``: one already at its place is taken as it is (a variant
    is asked for, not a rebuild)."""
    dest_name = package_name if (torch_ref or onnx or tflite) else name
    if reuse and not force and dest_name:
        try:
            pkg = ModelPackage.load(out or cache.path(dest_name))
        except ModelError:
            pass  # not there (or broken): build it
        else:  # built before encoded uploads existed: add them (prepare writes packages)
            return with_upload_files(pkg, progress)
    if torch_ref:
        if not package_name or name or onnx or tflite:
            raise ModelError("a PyTorch module needs --name (and no other source)")
        from iotoffload.model.build import prepare_torch_module

        shape = tuple(int(v) for v in input_shape.split(","))
        pkg = prepare_torch_module(
            torch_ref,
            package_name,
            out or cache.path(package_name),
            input_shape=shape,
            policy=cuts or "narrow",
            force=force,
            tolerance=tolerance,
            progress=progress,
        )
    elif onnx and not tflite:
        if not package_name or name:
            raise ModelError("an ONNX model needs --name (and no catalog NAME)")
        from iotoffload.model.onnx_source import prepare_onnx

        pkg = prepare_onnx(
            onnx,
            package_name,
            out or cache.path(package_name),
            policy=cuts or "narrow",
            force=force,
            tolerance=tolerance,
            progress=progress,
        )
    elif tflite or onnx:
        if not (tflite and onnx and package_name):
            raise ModelError("cutting your own model needs --tflite, --onnx and --name")
        if name:
            raise ModelError("give either a catalog NAME or --tflite/--onnx, not both")
        pkg = prepare_pair(
            tflite,
            onnx,
            package_name,
            out or cache.path(package_name),
            policy=cuts or "narrow",
            force=force,
            tolerance=tolerance,
            progress=progress,
        )
    else:
        if not name:
            raise ModelError(
                "name a catalog model (" + ", ".join(CATALOG) + ") or give --tflite/--onnx/--name"
            )
        entry = CATALOG.get(name)
        if entry is None:
            raise ModelError(f"{name!r} is not in the catalog ({', '.join(CATALOG)})")
        pkg = prepare_catalog(
            entry,
            out or cache.path(name),
            weights=weights,
            seed=seed,
            policy=cuts,
            export_whole=export_whole,
            force=force,
            tolerance=tolerance,
            progress=progress,
        )
    return pkg


@app.command("list")
@user_errors
def list_(
    available: Annotated[bool, typer.Option(help="List what the catalog can prepare.")] = False,
    cache_dir: CacheOpt = None,
) -> None:
    """List prepared packages in the cache (or the catalog with --available)."""
    cache = _cache(cache_dir)
    if available:
        t = Table(title="catalog")
        for col in ("name", "description", "weights", "prepared"):
            t.add_column(col)
        have = set(cache.names())
        for e in CATALOG.values():
            t.add_row(e.name, e.description, e.weights_note, "yes" if e.name in have else "no")
        console.print(t)
        return
    names = cache.names()
    if not names:
        console.print(f"no packages in {cache.root}; try: iotoffload model prepare mobilenet")
        return
    t = Table(title=f"model packages in {cache.root}")
    for col in ("name", "blocks", "weights", "model_id", "MB", "verified", "upload forms"):
        t.add_column(col)
    for n in names:
        try:
            pkg = cache.load(n, check_digests=False)
        except ModelError as e:
            t.add_row(n, "-", "-", "-", "-", f"[red]broken: {str(e)[:60]}[/]", "-")
            continue
        size = sum(f.stat().st_size for f in pkg.root.iterdir() if f.is_file()) / 1e6
        v = pkg.manifest.verification
        t.add_row(
            n,
            str(pkg.num_blocks),
            pkg.manifest.weights,
            pkg.manifest.model_id[:12],
            f"{size:.1f}",
            f"{v.max_rel_error:.1e}" if v else "no",
            _forms_cell(cache, pkg),
        )
    console.print(t)


def _forms_cell(cache: ModelCache, pkg: ModelPackage) -> str:
    """One line per form: ``float32``, ``float16 (100.0 %)``, ``int8 refused (94.5 %)``."""
    parts = []
    for f in cache.forms(pkg):
        figure = f" ({f.agreement.top1 * 100:.1f} %)" if f.agreement else ""
        if f.state == "ready":
            parts.append(f"{f.form}{figure}")
        elif f.state == "refused":
            parts.append(f"[dim]{f.form} refused{figure}[/]")
    return "\n".join(parts)


@app.command()
@user_errors
def show(
    name: Annotated[str, typer.Argument(help="Package name (in the cache) or directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
    upload_weights: UploadOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Show a package's blocks (checks every block file's digest), its upload form and the
    agreement a float16/int8 variant measured."""
    pkg = _cache(cache_dir).resolve(
        name, build=False, upload_weights=_upload_choice(upload_weights)
    )
    if as_json:
        print(pkg.manifest.to_json(), end="")
        return
    console.print(_blocks_table(pkg, f"{pkg.name}: {pkg.num_blocks} blocks ({pkg.root})"))
    _describe(pkg)


@app.command()
@user_errors
def verify(
    name: Annotated[str, typer.Argument(help="Package name or directory.")],
    tolerance: Annotated[
        float | None,
        typer.Option(
            help=f"Max relative error of any split (default {DEFAULT_TOLERANCE:g}; a "
            "float16/int8 variant: its form's, and every block against its TFLite block)."
        ),
    ] = None,
    upload_weights: UploadOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Re-check digests and every split point against the package's reference output."""
    pkg = _cache(cache_dir).resolve(
        name, build=False, upload_weights=_upload_choice(upload_weights)
    )
    v = verify_package(pkg, tolerance=tolerance)
    console.print(
        f"[green]ok[/]: {pkg.num_blocks + 1} splits, worst k={v.worst_split} at "
        f"{v.max_rel_error:.2e} relative (tolerance {v.tolerance:g})"
    )
    if v.block_max_rel_error is not None:
        console.print(
            f"[green]ok[/]: {pkg.manifest.upload_weights} blocks, worst block {v.worst_block} "
            f"at {v.block_max_rel_error:.2e} relative to its TFLite block (tolerance "
            f"{v.block_tolerance:g})"
        )


@app.command()
@user_errors
def keygen(
    out: Annotated[Path, typer.Option(help="Directory for the key pair.")],
    name: Annotated[
        str, typer.Option(help="File name stem: NAME.pem (private) and NAME.pub.pem.")
    ] = KEY_NAME,
    force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """Make an ed25519 key pair for signing packages: NAME.pem is the secret (mode 0600: keep
    it off the edges), NAME.pub.pem goes into each edge's trusted_keys."""
    private, public = write_keypair(out, name, force=force)
    fp = fingerprint(load_private_key(private).public_key())
    console.print(f"private key {private} (keep it secret)")
    console.print(f"public key  {public} (an edge's trusted_keys)")
    console.print(f"fingerprint {fp}")


@app.command()
@user_errors
def sign(
    name: Annotated[str, typer.Argument(help="Package name (in the cache) or directory.")],
    key: Annotated[
        Path, typer.Option(help="The ed25519 private key (PEM) from `iotoffload model keygen`.")
    ],
    cache_dir: CacheOpt = None,
) -> None:
    """Sign a package (checks every block file's digest first): writes signature.json next to
    its manifest, so edges with require_signed that trust the key serve it."""
    private = load_private_key(key)  # a bad key fails before the package is read
    pkg = _cache(cache_dir).resolve(name, build=False)
    sig = sign_package(pkg, private)
    console.print(
        f"signed {pkg.name} (model_id {pkg.manifest.model_id[:16]}…) as {sig.signer} → "
        f"{pkg.root / SIGNATURE_NAME}"
    )


@app.command()
@user_errors
def run(
    name: Annotated[str, typer.Argument(help="Package name (built on first use) or directory.")],
    split: Annotated[
        int | None,
        typer.Option(
            help="Blocks [0,K) on TFLite (device), [K,N) on ONNX Runtime (edge); default N/2."
        ),
    ] = None,
    input: Annotated[
        str, typer.Option("--input", help="synthetic | an image file | a .npy tensor")
    ] = "synthetic",
    repeat: Annotated[int, typer.Option(min=1, max=1000, help="Runs; times are medians.")] = 5,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Threads per runtime (default: IOTOFFLOAD_TFLITE_THREADS / "
            "IOTOFFLOAD_ONNX_THREADS, else 1).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    upload_weights: UploadOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Run one query locally through the mixed chain: top-5 and per-block times."""
    settings = ModelSettings()
    with rich_progress() as progress:
        pkg = _cache(cache_dir).resolve(
            name, progress=progress, upload_weights=_upload_choice(upload_weights)
        )
    n = pkg.num_blocks
    k = n // 2 if split is None else split
    if not 0 <= k <= n:
        raise ModelError(f"--split must be within 0..{n}")
    x = load_input(input, pkg.manifest)
    tfl = TFLiteExecutor.from_package(
        pkg, threads=threads or settings.tflite_threads, backend=settings.tflite_backend
    )
    ort = OnnxExecutor.from_package(pkg, threads=threads or settings.onnx_threads)
    runs: list[list[float]] = []
    y = x
    for _ in range(repeat):
        mid, t_front = tfl.run_timed(0, k, x)
        y, t_rear = ort.run_timed(k, n, mid)
        runs.append(t_front + t_rear)
    med = np.median(np.asarray(runs), axis=0) * 1e3 if n else np.zeros(0)
    top = top_k(y, pkg.manifest.labels)
    if as_json:
        print(
            json.dumps(
                {
                    "model": pkg.name,
                    "split": k,
                    "input": input,
                    "weights": pkg.manifest.weights,
                    "upload_weights": pkg.manifest.upload_weights,
                    "top5": [{"class": c, "label": lab, "score": s} for c, lab, s in top],
                    "block_ms": [round(float(v), 4) for v in med],
                    "total_ms": round(float(med.sum()), 4),
                    "tflite_backend": tfl.backend,
                }
            )
        )
        return
    t = Table(
        title=f"{pkg.name}: split k={k} (TFLite/{tfl.backend} [0,{k}), ONNX Runtime [{k},{n}))"
    )
    t.add_column("block", justify="right")
    t.add_column("runtime")
    t.add_column("ms (median)", justify="right")
    for i, v in enumerate(med):
        t.add_row(str(i), "TFLite" if i < k else "ORT", f"{v:.3f}")
    t.add_section()
    t.add_row("total", "", f"{med.sum():.3f}")
    console.print(t)
    if pkg.manifest.weights == "seeded":
        console.print("[bold yellow]seeded random weights: these classes mean nothing[/]")
    for rank, (c, lab, s) in enumerate(top, 1):
        suffix = f"  (class {c})" if pkg.manifest.labels else ""
        console.print(f"{rank}. {lab:<30} {s:.4f}{suffix}")
