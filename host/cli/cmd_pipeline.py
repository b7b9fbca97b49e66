"""``tinyfleet pipeline|train|quantize|evaluate``, ``recipes`` and ``keys`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tinyfleet.host import pipeline
from tinyfleet.host.cli import output
from tinyfleet.host.cli.app import JsonOpt, app, keys_app, parse_sets, recipes_app, settings
from tinyfleet.host.errors import GateRejectedError, UsageError

SmallOpt = Annotated[
    bool, typer.Option("--small", help="Apply the recipe's [small] overrides (quick runs, tests).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value, e.g. --set train.epochs=5 (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_metrics(metrics: list[Any]) -> None:
    rows = []
    for m in metrics:
        mcu = [f for f in m.fits if f.kind == "mcu"]
        fits = ", ".join(f.profile for f in mcu if f.fits) or "none"
        rows.append(
            (
                f"{m.format} {m.precision}",
                _fmt_pct(m.accuracy),
                f"{m.bytes:,}",
                _fmt_ratio(m.size_ratio_to_float),
                f"{m.invoke_p50_ms * 1000:.1f}",
                _fmt_ratio(m.speedup_over_float),
                f"{m.latency_p50_ms * 1000:.1f} / {m.latency_p99_ms * 1000:.1f}",
                "-" if m.arena_bytes is None else f"{m.arena_bytes:,}",
                fits if m.format == "tflite" and m.precision == "int8" else "-",
            )
        )
    output.table(
        "Artifacts",
        [
            "artifact",
            "accuracy",
            "bytes",
            "size/float",
            "invoke p50 µs",
            "speed-up",
            "end-to-end p50/p99 µs",
            "TFLM arena B",
            "fits (MCU)",
        ],
        rows,
    )


def print_gates(gates: list[Any]) -> None:
    output.table(
        "Gates",
        ["gate", "result", "detail"],
        [(g.name, "pass" if g.passed else "FAIL", g.reason) for g in gates],
    )


def print_result(result: pipeline.PipelineResult) -> None:
    print_metrics(result.metrics)
    print_gates(result.gates)
    con = output.out()
    v = result.version
    if v is None:
        con.print(f"not registered; run folder: {result.run.path}")
    elif result.passed:
        con.print(
            f"registered [bold]{v.model}@{v.number}[/bold] (ready, signed) from {result.run.path.name}"
        )
    else:
        con.print(
            f"registered [bold]{v.model}@{v.number}[/bold] as [red]rejected[/red]: "
            + "; ".join(g.name for g in result.gates if not g.passed)
        )


@app.command("pipeline")
def pipeline_cmd(
    recipe: Annotated[
        str, typer.Argument(help="Recipe name (see `tinyfleet recipes list`) or folder.")
    ],
    small: SmallOpt = False,
    set_: SetOpt = None,
    register: Annotated[bool, typer.Option(help="Register the result in the registry.")] = True,
    parent: Annotated[
        int | None, typer.Option(help="Parent version recorded in the lineage.")
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train, quantize, evaluate, gate and register a recipe."""
    with output.reporter(not quiet) as rep:
        result = pipeline.run_pipeline(
            settings(),
            recipe,
            small=small,
            overrides=parse_sets(set_),
            register=register,
            parent_version=parent,
            reporter=rep,
        )
    _finish(result, json_out)


def _finish(result: pipeline.PipelineResult, json_out: bool) -> None:
    """Print the result; a rejected version ends the command with the gate-rejected code."""
    if json_out:
        output.emit_json(result.to_json())
    else:
        print_result(result)
    if not result.passed:
        raise typer.Exit(GateRejectedError.exit_code)


@app.command("train")
def train_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name or folder.")],
    small: SmallOpt = False,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a recipe's float model into a new run folder."""
    with output.reporter(not quiet) as rep:
        run = pipeline.train_step(
            settings(), recipe, small=small, overrides=parse_sets(set_), reporter=rep
        )
    info = run.info
    if json_out:
        output.emit_json({"run": str(run.path), **info})
    else:
        output.out().print(
            f"trained {info['recipe']} → {run.path}  (data {info['data_fingerprint'][:12]}, "
            f"Keras test accuracy {info['train']['keras_test_accuracy']:.2%})"
        )


def _run_folder(path: Path) -> pipeline.RunFolder:
    if not (path / "run.json").is_file():
        raise UsageError(
            f"{path}: not a run folder (no run.json); create one with `tinyfleet train`"
        )
    return pipeline.RunFolder(path)


@app.command("quantize")
def quantize_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder made by `tinyfleet train`.")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export TFLite float32/int8 and ONNX float32/int8 artifacts of a run."""
    folder = _run_folder(run)
    with output.reporter(not quiet) as rep:
        files = pipeline.quantize_step(folder, reporter=rep)
    rows = [(f.format, f.precision, f.path.stat().st_size, f.path) for f in files]
    if json_out:
        output.emit_json(
            {
                "artifacts": [
                    {"format": r[0], "precision": r[1], "bytes": r[2], "path": str(r[3])}
                    for r in rows
                ]
            }
        )
    else:
        output.table("Artifacts", ["format", "precision", "bytes", "path"], rows)


@app.command("evaluate")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder with artifacts.")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure accuracy, size, latency and MCU fit of a run's artifacts, and apply its gates."""
    folder = _run_folder(run)
    with output.reporter(not quiet) as rep:
        metrics, gates = pipeline.evaluate_step(folder, reporter=rep)
    if json_out:
        output.emit_json(
            {
                "artifacts": [m.model_dump(mode="json") for m in metrics],
                "gates": [g.model_dump(mode="json") for g in gates],
                "passed": all(g.passed for g in gates),
            }
        )
    else:
        print_metrics(metrics)
        print_gates(gates)


@recipes_app.command("list")
def recipes_list(json_out: JsonOpt = False) -> None:
    """List the recipes that ship in models/."""
    from tinyfleet.host.recipes import list_recipes, load_recipe

    recipes = [load_recipe(n) for n in list_recipes()]
    if json_out:
        output.emit_json(
            {
                "recipes": [
                    {"name": r.name, "description": r.description, "path": str(r.path)}
                    for r in recipes
                ]
            }
        )
    else:
        output.table(None, ["recipe", "description"], [(r.name, r.description) for r in recipes])


@keys_app.command("init")
def keys_init(
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create the host's Ed25519 signing key pair (private key mode 0600)."""
    from tinyfleet.host.keys import init_keys

    pair = init_keys(settings().keys_dir, force=force)
    if json_out:
        output.emit_json(
            {
                "key_id": pair.key_id,
                "private_key": str(pair.private_path),
                "public_key": str(pair.public_path),
            }
        )
    else:
        output.out().print(
            f"created key {pair.key_id}\n  private: {pair.private_path} (0600, keep it secret)\n"
            f"  public:  {pair.public_path} (pin this on devices)"
        )


@keys_app.command("show")
def keys_show(json_out: JsonOpt = False) -> None:
    """Show the host key's id and public key."""
    from tinyfleet.host.keys import load_signing_key

    key = load_signing_key(settings().keys_dir)
    if json_out:
        output.emit_json({"key_id": key.key_id, "public_key_pem": key.public_key_pem})
    else:
        output.out().print(f"key {key.key_id}\n{key.public_key_pem}")


@app.command("demo")
def demo_cmd(
    devices: Annotated[int, typer.Option(help="Simulated devices.")] = 20,
    small: SmallOpt = False,
    broker: Annotated[
        str | None, typer.Option(help="Use this broker instead of starting Mosquitto.")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave everything running until Ctrl-C.")
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The loop end to end on embedded defaults: pipeline, broker, service, fleet, rollouts."""
    import signal
    import threading

    from tinyfleet.host.demo import DemoOptions, run_demo

    if not 4 <= devices <= 2000:
        raise UsageError(
            f"--devices {devices}: between 4 and 2000 in one demo process (at least 3 that "
            "drift and 1 that does not)"
        )
    # The demo says what happens; the services' own log shows only errors (--debug: all).
    import logging

    from tinyfleet.host.cli.app import _state

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("    %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if _state.debug else logging.ERROR)
    log = logging.getLogger("tinyfleet")
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.propagate = False  # a library may have configured the root logger
    if _state.debug:
        log.setLevel(logging.DEBUG)
    stop = threading.Event()
    if keep:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    say = (lambda _m: None) if quiet else (lambda m: output.err().print(m, highlight=False))
    try:
        with output.reporter(not quiet) as rep:
            summary = run_demo(
                settings(),
                DemoOptions(devices=devices, small=small, broker_url=broker, keep=keep),
                reporter=rep,
                say=say,
                stop=stop,
            )
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    if json_out:
        output.emit_json({"steps": summary.steps})
        return
    rows = []
    for st in summary.steps:
        figures = {k: v for k, v in st.items() if k not in ("step", "seconds")}
        rows.append(
            (st["step"], f"{st['seconds']:.1f}", ", ".join(f"{k}={v}" for k, v in figures.items()))
        )
    output.table("tinyfleet demo", ["step", "seconds", "figures"], rows)
