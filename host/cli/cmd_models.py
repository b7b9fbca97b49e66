"""``tinyfleet models …``: the registry from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tinyfleet.host.cli import output
from tinyfleet.host.cli.app import JsonOpt, models_app, settings
from tinyfleet.host.errors import ManifestError

RefArg = Annotated[str, typer.Argument(help="MODEL, MODEL@VERSION or MODEL@ALIAS.")]


def _registry() -> Any:
    from tinyfleet.host.registry import Registry

    s = settings()
    return Registry(s.registry_dir, s.database_url)


def _version_row(v: Any) -> tuple[Any, ...]:
    primary = next((a for a in v.artifacts if a.format == "tflite" and a.precision == "int8"), None)
    acc = None
    if primary is not None:
        acc = (primary.metrics or {}).get("accuracy")
    return (
        f"{v.model}@{v.number}",
        v.status,
        ",".join(v.aliases) or "-",
        "-" if acc is None else f"{acc * 100:.2f}%",
        "-" if primary is None else f"{primary.size:,}",
        (v.lineage or {}).get("data_fingerprint", "-")
        and str((v.lineage or {}).get("data_fingerprint"))[:12],
        v.created_at.strftime("%Y-%m-%d %H:%M")
        if hasattr(v.created_at, "strftime")
        else v.created_at,
    )


@models_app.command("list")
def models_list(
    model: Annotated[str | None, typer.Argument(help="Only this model's versions.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List models and their versions."""
    reg = _registry()
    names = [model] if model else [m.name for m in reg.list_models()]
    versions = [v for n in names for v in reg.list_versions(n)]
    if json_out:
        output.emit_json(
            {"versions": [v.model_dump(mode="json", exclude={"manifest"}) for v in versions]}
        )
        return
    output.table(
        None,
        ["version", "status", "aliases", "int8 accuracy", "int8 bytes", "data", "created"],
        [_version_row(v) for v in versions],
    )


@models_app.command("show")
def models_show(ref: RefArg, json_out: JsonOpt = False) -> None:
    """Show one version: lineage, metrics, gates, artifacts."""
    v = _registry().get(ref)
    if json_out:
        output.emit_json({"version": v.model_dump(mode="json")})
        return
    con = output.out()
    con.print(
        f"[bold]{v.model}@{v.number}[/bold]  {v.status}  aliases: {', '.join(v.aliases) or '-'}"
    )
    lin = v.lineage or {}
    for key in (
        "recipe",
        "code_version",
        "data_fingerprint",
        "seed",
        "parent_version",
        "run",
        "source_path",
    ):
        if lin.get(key) is not None:
            con.print(f"  {key:<17} {lin[key]}")
    con.print(f"  {'created':<17} {v.created_at} by {v.created_by}")
    for reason in v.rejection_reasons or []:
        con.print(f"  [red]rejected[/red]: {reason}")
    output.table(
        "Artifacts",
        ["format", "precision", "bytes", "sha256", "accuracy"],
        [
            (
                a.format,
                a.precision,
                f"{a.size:,}",
                a.sha256[:16],
                "-"
                if (a.metrics or {}).get("accuracy") is None
                else f"{a.metrics['accuracy'] * 100:.2f}%",
            )
            for a in v.artifacts
        ],
    )
    if v.gates:
        output.table(
            "Gates",
            ["gate", "result", "detail"],
            [(g.name, "pass" if g.passed else "FAIL", g.reason) for g in v.gates],
        )


@models_app.command("diff")
def models_diff(a: RefArg, b: RefArg, json_out: JsonOpt = False) -> None:
    """What changed between two versions (lineage, metrics, gates, artifacts)."""
    d = _registry().diff(a, b)
    if json_out:
        output.emit_json({"diff": d})
        return
    rows = []
    for section, changes in d.items():
        if isinstance(changes, dict):
            for key, pair in changes.items():
                left, right = (
                    pair if isinstance(pair, (list, tuple)) and len(pair) == 2 else (pair, "")
                )
                rows.append((section, key, left, right))
        else:
            rows.append((section, "", changes, ""))
    output.table(f"{a} → {b}", ["section", "key", a, b], rows)


@models_app.command("promote")
def models_promote(
    ref: RefArg,
    alias: Annotated[
        str, typer.Argument(help="Alias to point at the version, e.g. production, candidate.")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Point an alias at a version (rejected versions are refused)."""
    v = _registry().promote(ref, alias)
    if json_out:
        output.emit_json(
            {"version": v.model_dump(mode="json", exclude={"manifest"}), "alias": alias}
        )
    else:
        output.out().print(f"{v.model}@{alias} → {v.model}@{v.number}")


@models_app.command("verify")
def models_verify(ref: RefArg, json_out: JsonOpt = False) -> None:
    """Re-hash every artifact and check the manifest's signature and expiry with the host key."""
    from tinyfleet.host.keys import load_signing_key

    key = load_signing_key(settings().keys_dir)
    report = _registry().verify(ref, key.public_key)
    if json_out:
        output.emit_json({"verify": report.model_dump(mode="json")})
    else:
        for line in report.checks if hasattr(report, "checks") else []:
            output.out().print(f"  ok  {line}")
        for problem in report.problems:
            output.err().print(f"  [red]FAIL[/red] {problem}", highlight=False)
    if not report.ok:
        raise ManifestError(f"{ref}: verification failed: {'; '.join(report.problems)}")
    if not json_out:
        output.out().print(f"{ref}: signature, expiry and every artifact verified")


@models_app.command("import")
def models_import(
    path: Annotated[
        Path, typer.Argument(help="Keras file (.keras/.h5), SavedModel folder, .tflite or .onnx.")
    ],
    name: Annotated[str, typer.Option("--name", help="Model name in the registry.")],
    calibration: Annotated[
        Path, typer.Option("--calibration", help=".npy of representative inputs (n, *input_shape).")
    ],
    eval_: Annotated[
        tuple[Path, Path] | None,
        typer.Option("--eval", help="X.npy Y.npy held-out inputs and integer labels."),
    ] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names.")] = None,
    preprocess: Annotated[
        str, typer.Option(help="Feature pipeline the device runs first.")
    ] = "identity",
    min_accuracy: Annotated[
        float | None, typer.Option(help="Gate: minimum accuracy (0-1).")
    ] = None,
    max_int8_drop: Annotated[
        float | None, typer.Option(help="Gate: maximum int8 accuracy drop (0-1).")
    ] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Gate: maximum int8 TFLite bytes.")] = None,
    must_fit: Annotated[
        list[str] | None, typer.Option(help="Gate: device profile it must fit.")
    ] = None,
    json_out: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Bring your own model: quantize what can be quantized, evaluate, check fit, register."""
    from tinyfleet.host import pipeline
    from tinyfleet.host.cli.cmd_pipeline import _finish

    gates = {
        "min_accuracy": min_accuracy,
        "max_int8_drop": max_int8_drop,
        "max_bytes": max_bytes,
        "must_fit": must_fit or [],
    }
    with output.reporter(not quiet) as rep:
        result = pipeline.import_model(
            settings(),
            path,
            name=name,
            calibration=calibration,
            eval_data=eval_,
            classes=[c.strip() for c in classes.split(",")] if classes else None,
            preprocess=preprocess,
            gates=gates,
            reporter=rep,
        )
    _finish(result, json_out)
