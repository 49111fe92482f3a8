"""``edgeherd build`` and ``edgeherd bundle verify|inspect``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from toolchain.validate import ValidationReport

bundle_app = typer.Typer(help="Check and read signed bundles.", no_args_is_help=True)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

RECIPES = ("digits", "tabular", "torch", "onnx")


class _Step:
    def __init__(self, progress: Progress, task: Any, title: str) -> None:
        self.progress, self.task, self.title = progress, task, title

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def note(self, text: str) -> None:
        self.progress.update(self.task, description=f"{self.title} [dim]({text})[/]")


class RichReporter:
    """Draws one line per build step: a spinner while it runs, a bar when its length is known."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    @contextmanager
    def step(self, title: str, total: int | None = None) -> Iterator[_Step]:
        task = self.progress.add_task(title, total=total)
        step = _Step(self.progress, task, title)
        try:
            yield step
        except BaseException:
            self.progress.update(task, description=f"[red]✗[/] {self.progress.tasks[task].description}")
            raise
        done = self.progress.tasks[task]
        self.progress.update(task, total=done.total or 1, completed=done.total or 1,
                             description=f"[green]✓[/] {done.description}")

    def info(self, text: str) -> None:
        self.progress.console.print(text)


def _print_validation(report: ValidationReport) -> None:
    table = Table(title="data validation", show_lines=False)
    for col in ("rule", "result", "detail"):
        table.add_column(col)
    colour = {"ok": "green", "warning": "yellow", "fatal": "red"}
    for f in report.findings:
        table.add_row(f.rule, f"[{colour[f.severity]}]{f.severity}[/]", f.message)
    err_console.print(table)


def build_command(
    recipe: Annotated[str, typer.Argument(help=f"What to build from: {', '.join(RECIPES)}.")] = "digits",
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create (must not exist).")] = Path(
        "bundles/model"),
    key: Annotated[Path, typer.Option("--key", "-k", envvar="EDGEHERD_SIGNING_KEY",
                                      help="Ed25519 signing key (edgeherd keys generate).")] = Path(
        "data/keys/signing.key"),
    data: Annotated[Path | None, typer.Option("--data", help="Dataset: .csv or .parquet (with --schema), .npz "
                                              "(arrays x, y), or a folder of images, DIR/<class>/*.jpg|png "
                                              "(with --model: trained on it).")] = None,
    schema: Annotated[Path | None, typer.Option("--schema", help="TOML schema of a table: label, features, "
                                                "types, ranges.")] = None,
    sql: Annotated[str | None, typer.Option("--sql", metavar="URL", show_default=False, help=(
        "Read the table from this database instead of --data: a SQLAlchemy URL (postgresql+psycopg://user@host/db, "
        "sqlite:///file.db); with --query and --schema. Keep the password out of it: PGPASSWORD or ~/.pgpass."))
    ] = None,
    query: Annotated[str | None, typer.Option("--query", metavar="SELECT", help=(
        "The one SELECT that yields the table from --sql, run read-only and rolled back; give it an ORDER BY for "
        "a reproducible build."))] = None,
    model: Annotated[str | None, typer.Option("--model", help="A torch model as module:Class or module:function "
                                              "(torch recipe), e.g. toolchain.models:mobilenet_v3_small.")
                     ] = None,
    model_arg: Annotated[list[str] | None, typer.Option("--model-arg", metavar="KEY=VALUE", help=(
        "A keyword argument for --model, repeated (values read as int, float, true/false or text), e.g. "
        "--model-arg width_mult=0.5; num_classes defaults to the image folder's class count."))] = None,
    image_size: Annotated[str | None, typer.Option("--image-size", metavar="HxW", help=(
        "With an image folder: the capture size every image is brought to, the pixels a device sends "
        "(default: the most common size in the folder)."))] = None,
    input_size: Annotated[str | None, typer.Option("--input-size", metavar="HxW", help=(
        "With an image folder: the network's input resolution, at least 96x96; the graph resizes the capture to "
        "it (default: the capture size)."))] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="state_dict file for --model.")] = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="An existing ONNX model to quantize and bundle.")
                    ] = None,
    output: Annotated[str | None, typer.Option("--output", help="With --onnx: the output to evaluate and ship "
                                               "(default: the per-class scores, e.g. skl2onnx's probabilities; "
                                               "a label output is served as one-hot labels).")
                      ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: the dataset's).")] = None,
    version: Annotated[str, typer.Option("--version", help="Semantic version of this build.")] = "1.0.0",
    description: Annotated[str, typer.Option("--description", help="Intended use, for the model card.")] = "",
    parent: Annotated[str | None, typer.Option("--parent", help="Version this one replaces (lineage).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for splits and training.")] = 0,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Training epochs (recipe default).")] = None,
    max_drop: Annotated[float, typer.Option("--max-drop", min=0.0, help="Largest drop against fp32 for an "
                                            "artifact to enter the bundle: accuracy in percentage points for a "
                                            "classifier; for a regression model (task = \"regression\" in the "
                                            "schema), the rise in MAE in the target's own units.")] = 1.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted training run from its last "
                                         "checkpoint.")] = False,
    tar: Annotated[bool, typer.Option("--tar/--no-tar", help="Also write OUT.tar for transport.")] = True,
    device: Annotated[str, typer.Option("--device", help="Train on: auto (a CUDA GPU when one is visible), cpu "
                                        "or cuda.")] = "auto",
    features: Annotated[Path | None, typer.Option("--features", help="Feature definitions (TOML file or "
                                                  "directory) for a schema naming registry_features.")] = None,
    min_slice_metric: Annotated[float | None, typer.Option(
        "--min-slice-metric", min=0.0, max=1.0, help="Fail the build when the worst slice (a value of a segment "
        "column declared in the schema, with at least 20 test rows) has a lower fp32 accuracy than this (0-1).")
    ] = None,
) -> None:
    """Validate data, train, export, quantize, evaluate and sign a bundle."""
    if onnx is not None and recipe == "digits":
        recipe = "onnx"
    if model is not None and recipe == "digits":
        recipe = "torch"
    if sql is not None or query is not None:
        _check_sql_options(data, sql, query, schema)
        if recipe == "digits":
            recipe = "tabular"
    if recipe not in RECIPES:
        err_console.print(f"error: unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        raise typer.Exit(2)
    from toolchain.errors import ToolchainError
    from toolchain.pipeline import BuildSpec, ValidationFailed, build

    try:
        vision = _vision_options(model, model_arg or [], image_size, input_size, data)
    except ToolchainError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    spec = BuildSpec(recipe=recipe, out=out, key=key, data=data, schema=schema, sql=sql, query=query,  # type: ignore[arg-type]
                     model=model,
                     weights=weights, onnx=onnx, name=name, version=version, description=description,
                     parent=parent, seed=seed, epochs=epochs, max_drop=max_drop, resume=resume, tar=tar,
                     min_slice_metric=min_slice_metric, device=device, features=features, output=output,
                     model_args=vision.get("model_args", {}), image_size=vision.get("image_size"),
                     input_size=vision.get("input_size"))
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=err_console, transient=False) as progress:
            result = build(spec, RichReporter(progress))
    except ValidationFailed as exc:
        _print_validation(exc.report)
        err_console.print(f"[red]error:[/] {exc}; nothing was written")
        raise typer.Exit(1) from None
    except ToolchainError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    _print_artifacts(result.manifest)
    for art_name, why in result.rejected.items():
        console.print(f"[yellow]left out[/] {art_name}: {why}")
    skipped = result.report.get("skipped") if isinstance(result.report, dict) else None
    for target, why in (skipped or {}).items():
        console.print(f"[yellow]not built[/] {target}: {why}")
    console.print(f"bundle written to {result.out}" + (f" and {result.tar}" if result.tar else ""))


def _vision_options(model: str | None, model_arg: list[str], image_size: str | None, input_size: str | None,
                    data: Path | None) -> dict[str, Any]:
    """BuildSpec fields of --model-arg, --image-size and --input-size; a ToolchainError names a bad one."""
    from toolchain.errors import DataError, ModelError
    from toolchain.images import parse_size
    from toolchain.models import parse_model_args

    out: dict[str, Any] = {}
    if model_arg:
        if model is None:
            raise ModelError("--model-arg gives keyword arguments to --model; name the model with --model "
                             "module:callable")
        out["model_args"] = parse_model_args(model_arg)
    for flag, text, field in (("--image-size", image_size, "image_size"), ("--input-size", input_size,
                                                                             "input_size")):
        if text is None:
            continue
        if data is None or not data.is_dir():
            raise DataError(f"{flag} applies to an image folder (--data DIR); "
                            + ("no --data was given" if data is None else f"{data} is not a folder"))
        out[field] = parse_size(text, flag)
    return out


def _check_sql_options(data: Path | None, sql: str | None, query: str | None, schema: Path | None) -> None:
    """Usage errors of --sql/--query, before anything runs."""
    problem = None
    if data is not None:
        problem = "--data and --sql/--query are two sources for the same dataset; give one of them"
    elif sql is None or query is None:
        problem = "--sql URL and --query \"SELECT ...\" go together: the database and what to read from it"
    elif schema is None:
        problem = "--sql needs --schema FILE.toml (label, features, ranges), as a CSV file does"
    if problem:
        err_console.print(f"error: {problem}")
        raise typer.Exit(2)


def _print_artifacts(manifest: Any) -> None:
    table = Table(title=f"{manifest.model} {manifest.version}")
    for col in ("artifact", "target", "precision", "size", "accuracy", "p50 ms"):
        table.add_column(col, justify="right" if col in ("size", "accuracy", "p50 ms") else "left")
    for a in manifest.artifacts:
        acc, lat = a.metrics.get("accuracy"), a.metrics.get("latency_ms_p50")
        table.add_row(a.name, a.target.value, a.precision.value, f"{a.size:,}",
                      f"{acc:.4f}" if acc is not None else "—", f"{lat:.3f}" if lat is not None else "—")
    console.print(table)


def _public_key(key: Path) -> Any:
    from protocol import KeyFormatError, load_private_key, load_public_key

    text = str(key)
    try:
        if text.startswith("ed25519:"):
            return load_public_key(text)
        data = key.read_bytes()
        return load_private_key(data).public_key() if b"PRIVATE KEY" in data else load_public_key(data)
    except OSError as exc:
        err_console.print(f"error: cannot read key {key}: {exc.strerror}")
        raise typer.Exit(2) from None
    except KeyFormatError as exc:
        err_console.print(f"error: {key}: {exc}")
        raise typer.Exit(2) from None


KeyOption = Annotated[Path, typer.Option("--key", "-k", envvar="EDGEHERD_PUBLIC_KEY",
                                         help="Server public key: signing.pub, or 'ed25519:<base64>'.")]


@bundle_app.command("verify")
def bundle_verify(
    path: Annotated[Path, typer.Argument(help="Bundle directory or .tar.")],
    key: KeyOption = Path("data/keys/signing.pub"),
) -> None:
    """Check the signature and every artifact's sha256 and size, as a device would."""
    from toolchain.bundle import verify_bundle
    from toolchain.errors import BundleError

    pub = _public_key(key)
    try:
        manifest = verify_bundle(path, pub)
    except BundleError as exc:
        err_console.print(f"[red]FAILED[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"[green]OK[/] {manifest.model} {manifest.version}: signature and "
                  f"{len(manifest.artifacts)} artifacts verified")


@bundle_app.command("inspect")
def bundle_inspect(
    path: Annotated[Path, typer.Argument(help="Bundle directory or .tar.")],
    key: Annotated[Path | None, typer.Option("--key", "-k", help="Also check the signature with this key.")] = None,
) -> None:
    """Show a bundle's manifest, artifacts and metrics, and check its files."""
    from protocol import manifest_digest
    from toolchain.bundle import inspect_bundle
    from toolchain.errors import BundleError

    pub = _public_key(key) if key is not None else None
    try:
        ins = inspect_bundle(path, pub)
    except BundleError as exc:
        err_console.print(f"error: {exc}")
        raise typer.Exit(1) from None
    m = ins.manifest
    console.print(f"[bold]{m.model} {m.version}[/]  {m.task}, created {m.created_at:%Y-%m-%d %H:%M} UTC")
    console.print(f"digest {manifest_digest(m)}  signed by key {ins.signed_by}"
                  + ("" if pub is None else ("  [green]signature OK[/]" if ins.verified else "  [red]signature "
                                             "does NOT verify[/]")))
    _print_artifacts(m)
    bad = [n for n, ok in ins.files_ok.items() if not ok]
    if bad:
        console.print(f"[red]files missing or altered:[/] {', '.join(bad)}")
    for k, v in sorted(m.lineage.items()):
        console.print(f"  {k}: {v}")
    if bad or (pub is not None and not ins.verified):
        raise typer.Exit(1)
