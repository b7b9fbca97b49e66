"""Federated retraining runs, from a request to a registered (and optionally rolled out) version.

A run is a row of ``fl_runs``; its ``state`` moves::

    requested → enabling → training → evaluating → registered | rejected
          └──────────┴───────────┴────────────┴──→ failed (with a reason)

``FLCoordinator.request`` (the CLI, the retrain policy, the API) validates the
request, resolves the cohort (``tag:X``, ``group:X``, device ids, ``all``) to the
devices that are eligible — online, serving the parent model, not MCU-class, an
agent that speaks protocol revision 2, enough labelled samples when the device
reports its count, not in another active run — and fails fast with
``FLCohortError`` (exit 45), naming why each device is out, when fewer than
``min_clients`` remain.  Otherwise it stores the run as ``requested``.

The fleet service runs ``FLCoordinator.start()``: one thread that executes
requested runs one at a time:

1. ``enabling``: find the parent's float model (``lineage.run`` →
   ``<runs_dir>/<run>/model.keras`` and ``data.npz``; ``FLParentError`` if gone),
   start a SuperLink, set ``fl`` (enabled, SuperLink address, run id, minimum
   samples) in the desired state of each chosen device and wait until enough of them
   report their SuperNode running (``ReportedState.fl``); refusals are recorded;
2. ``training``: ``run_federated`` from the parent's weights with the host's
   validation split (``tinyfleet.host.fl.run``);
3. ``evaluating``: the parent's Keras model with the new weights is written to a new
   run folder (``model.keras``, the parent's ``data.npz``, ``run.json`` with source
   ``federated``) and goes through ``quantize_step`` → ``evaluate_step`` →
   ``register_step`` with ``parent_version`` and ``lineage.federated`` = run id,
   cohort, rounds, strategy, nodes, devices, dropped, per-round metrics;
4. ``registered`` (gates passed; with ``auto_rollout`` a rollout of the new version
   to the cohort is created, which the orchestrator runs) or ``rejected``.

Whatever happens, ``fl`` is cleared again on every device it was set on and the
SuperLink is stopped.  A run found in ``enabling``/``training``/``evaluating`` when
the coordinator starts was interrupted by a host restart: it is marked ``failed``
with that reason (and ``fl`` is cleared on its devices).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tinyfleet.agent.profiles import PROFILES
from tinyfleet.agent.protocol.messages import PROTOCOL_REVISION_FL, FLSettings
from tinyfleet.host.db.engine import writer
from tinyfleet.host.db.tables import DeviceRow, FLRunRow
from tinyfleet.host.errors import (
    FLCohortError,
    FLParentError,
    NotFoundError,
    TinyfleetError,
    UsageError,
)
from tinyfleet.host.registry import Registry, VersionInfo
from tinyfleet.host.settings import HostSettings

__all__ = [
    "ACTIVE_STATES",
    "STRATEGIES",
    "TERMINAL_STATES",
    "CoordinatorOptions",
    "FLCoordinator",
    "FLRequest",
    "check_cohort",
]

STRATEGIES = ("fedavg", "fedprox", "fedmedian", "krum")
ACTIVE_STATES = ("requested", "enabling", "training", "evaluating")
RUNNING_STATES = ("enabling", "training", "evaluating")
TERMINAL_STATES = ("registered", "rejected", "failed")
DEFAULT_MIN_SAMPLES = 32

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_TARGET = re.compile(rf"^(?:all|(?:tag|group|device):{_NAME}|{_NAME})$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def check_cohort(targets: Sequence[str]) -> list[str]:
    """Cohort targets as given, or ``UsageError`` naming the first malformed one."""
    out = []
    for t in targets:
        t = t.strip()
        if not _TARGET.match(t):
            raise UsageError(
                f"cohort {t!r}: use tag:NAME, group:NAME, a device id (or device:ID) or all"
            )
        out.append(t)
    if not out:
        raise UsageError("cohort: name at least one target (tag:NAME, group:NAME, device id)")
    return out


class FLRequest(BaseModel):
    """What a federated run is asked to do (``tinyfleet fl run``, the retrain policy)."""

    model_config = ConfigDict(extra="forbid")

    cohort: list[str] = Field(min_length=1, max_length=100)
    model: str | None = Field(
        default=None,
        description="Parent as MODEL@VERSION or MODEL@ALIAS; None: the model the cohort serves.",
    )
    rounds: int = Field(3, ge=1, le=100)
    strategy: Literal["fedavg", "fedprox", "fedmedian", "krum"] = "fedavg"
    min_clients: int = Field(2, ge=1, le=10_000)
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    round_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(0.003, gt=0.0, le=1.0)
    proximal_mu: float = Field(0.0, ge=0.0, le=100.0)
    min_samples: int = Field(DEFAULT_MIN_SAMPLES, ge=1, le=10_000_000)
    max_samples: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Train on each device's newest samples."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    auto_rollout: bool = False
    rollout: dict[str, Any] = Field(
        default_factory=dict,
        description="RolloutSpec fields for the automatic rollout (waves, soak_s, …).",
    )
    enable_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="How long devices may take to start a SuperNode."
    )

    @model_validator(mode="after")
    def _strategy_needs(self) -> FLRequest:
        if self.strategy == "fedprox" and self.proximal_mu == 0.0:
            raise ValueError("strategy fedprox needs a proximal term: set proximal_mu > 0")
        return self

    @field_validator("cohort")
    @classmethod
    def _cohort(cls, v: list[str]) -> list[str]:
        try:
            return check_cohort(v)
        except UsageError as exc:
            raise ValueError(str(exc)) from None

    def flower_config(self) -> dict[str, Any]:
        """The fields that go to ``FLRunConfig``."""
        return self.model_dump(
            include={
                "strategy",
                "rounds",
                "min_clients",
                "fraction_fit",
                "round_timeout_s",
                "local_epochs",
                "batch_size",
                "learning_rate",
                "proximal_mu",
                "min_samples",
                "max_samples",
                "seed",
            }
        )


class CoordinatorOptions(BaseModel):
    """Where the SuperLink listens, how devices reach it, how it is secured."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> CoordinatorOptions:
        """Options from ``TINYFLEET_FL_<OPTION>`` (``SUPERLINK_HOST``, ``ADVERTISE_HOST``,
        ``TLS``, ``NODE_AUTH``); ``ConfigError`` for a bad value."""
        import os

        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in ("superlink_host", "advertise_host", "tls", "node_auth"):
            raw = env.get(f"TINYFLEET_FL_{name.upper()}")
            if raw is not None:
                values[name] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            from tinyfleet.host.errors import ConfigError

            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "node_auth"
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"TINYFLEET_FL_{where.upper()}: {msg}") from None

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> CoordinatorOptions:
        if self.node_auth and not self.tls:
            raise ValueError("node_auth needs tls")
        return self

    superlink_host: str = Field("127.0.0.1", description="Address the SuperLink binds to.")
    advertise_host: str | None = Field(
        None, description="Host name devices use for the SuperLink (default: superlink_host)."
    )
    poll_s: float = Field(1.0, gt=0.0, description="How often the thread looks for new runs.")
    workdir: Path | None = Field(
        None, description="SuperLink state and run files (default <home>/fl)."
    )
    tls: bool = Field(
        False,
        description="Serve the SuperLink over TLS with a private CA made for each run; "
        "devices get the CA in FLSettings.root_certificates.",
    )
    node_auth: bool = Field(
        False,
        description="SuperNode authentication (needs tls): each device's own key pair, "
        "registered with the SuperLink before the device is enabled.",
    )
    retrain: dict[str, Any] = Field(
        default_factory=dict,
        description="Request settings of runs the retrain policy starts (rounds, strategy, "
        "min_clients, auto_rollout, …).",
    )


def _first_error(exc: ValidationError) -> UsageError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return UsageError(f"{where}: {msg}" if where and not msg.startswith(where) else msg)


def _jsonable(value: Any) -> Any:
    """Dataclasses, pydantic models, numpy scalars and arrays as plain JSON values."""
    if isinstance(value, BaseModel):
        return _jsonable(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class _RunFailed(Exception):
    """A step failed for a reason the run row records."""


class FLCoordinator:
    """Federated runs as database rows, executed one at a time by ``start()``'s thread."""

    def __init__(
        self,
        settings: HostSettings,
        registry: Registry,
        *,
        desired: Any = None,
        orchestrator: Any = None,
        options: CoordinatorOptions | None = None,
        logger: logging.Logger | None = None,
        superlink_factory: Callable[[Path], Any] | None = None,
        runner: Callable[..., Any] | None = None,
        connected: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.engine: Engine = registry.engine
        self.fleet = settings.fleet
        self.desired = desired
        self.orchestrator = orchestrator
        self.options = options or CoordinatorOptions.from_env()
        self.log = logger or logging.getLogger("tinyfleet.host.fl")
        self._superlink_factory = superlink_factory
        self._runner = runner
        self._connected = connected or (lambda: True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: str | None = None
        self._timings: dict[str, float] = {}
        self._superlink: Any = None
        self._node_ids: dict[str, int] = {}

    @property
    def workdir(self) -> Path:
        return self.options.workdir or self.settings.home / "fl"

    # ------------------------------------------------------------------ requests

    def request(
        self,
        cohort: Sequence[str] | str,
        rounds: int = 3,
        strategy: str = "fedavg",
        *,
        model: str | None = None,
        created_by: str | None = None,
        trigger: str = "manual",
        **options: Any,
    ) -> str:
        """Validate, check the cohort and store a requested run; its id.

        ``UsageError`` for a bad request, ``NotFoundError`` for an unknown parent,
        ``FLCohortError`` when fewer than ``min_clients`` devices are eligible.
        """
        targets = [cohort] if isinstance(cohort, str) else list(cohort)
        try:
            req = FLRequest(
                cohort=targets, rounds=rounds, strategy=strategy, model=model, **options
            )  # type: ignore[arg-type]
        except ValidationError as exc:
            raise _first_error(exc) from None
        if req.auto_rollout:
            from tinyfleet.host.fleet.rollout import RolloutSpec

            try:
                RolloutSpec(ref="x@1", targets=req.cohort, **req.rollout)
            except (ValidationError, TypeError) as exc:
                raise UsageError(f"rollout settings: {exc}".splitlines()[0]) from None
        with Session(writer(self.engine)) as s, s.begin():
            parent = self._parent(s, req)
            devices, excluded = self.eligible(s, req.cohort, parent, req.min_samples)
            self._enough(devices, excluded, req.min_clients, req.cohort)
            rid = f"fl-{utcnow():%Y%m%d}-{secrets.token_hex(3)}"
            now = utcnow()
            s.add(
                FLRunRow(
                    id=rid,
                    fleet=self.fleet,
                    state="requested",
                    model=parent.model,
                    parent_version=parent.number,
                    cohort=list(req.cohort),
                    devices=devices,
                    excluded=excluded,
                    config=req.model_dump(mode="json", exclude={"cohort", "model"}),
                    auto_rollout=req.auto_rollout,
                    trigger=trigger[:32],
                    created_by=(created_by or self.settings.user)[:128],
                    created_at=now,
                    updated_at=now,
                )
            )
        self.log.info("fl run %s requested: %s@%s on %s", rid, parent.model, parent.number, devices)
        return rid

    def on_retrain(self, cohort: Any, devices: Sequence[str]) -> str | None:
        """The retrain policy's trigger (``RetrainPolicy.trigger``): a run on a drifted cohort.

        ``cohort`` is the policy's ``CohortKey`` (``tag``, ``model``, ``version``), its
        key ``TAG|MODEL@VERSION``, or a target (``tag:X``…).  The run covers the whole
        cohort (``tag:TAG``, or ``all`` for ``*``) from the version it serves, with
        ``options.retrain`` as the request's settings; ``devices`` (the drifted ones)
        are used only when the cohort names no tag.  Never raises: a cohort too small
        or a bad request is logged and gives None.
        """
        tag = getattr(cohort, "tag", None)
        model = getattr(cohort, "model_ref", None)
        if tag is None and isinstance(cohort, str) and "|" in cohort:
            tag, _, model = cohort.rpartition("|")
        if tag is not None:
            targets = ["all"] if tag == "*" else [f"tag:{tag}"]
        elif isinstance(cohort, str) and cohort:
            targets = [cohort]
        else:
            targets = list(devices)
        try:
            settings = dict(self.options.retrain)
            rounds = int(settings.pop("rounds", 3))
            strategy = str(settings.pop("strategy", "fedavg"))
            return self.request(
                targets,
                rounds,
                strategy,
                model=model,
                created_by="retrain-policy",
                trigger="policy",
                **settings,
            )
        except TinyfleetError as exc:
            self.log.warning("retrain of %s not started: %s", cohort, exc)
            return None

    def _parent(self, s: Session, req: FLRequest) -> VersionInfo:
        if req.model is not None:
            version = self.registry.get(req.model)
        else:
            from tinyfleet.host.fleet.rollout import resolve_targets

            devices = resolve_targets(s, self.fleet, req.cohort)
            served = Counter(
                (r.active_model, r.active_version)
                for r in s.scalars(
                    select(DeviceRow).where(
                        DeviceRow.fleet == self.fleet,
                        DeviceRow.device.in_(devices),
                        DeviceRow.online.is_(True),
                        DeviceRow.active_model.is_not(None),
                    )
                )
            )
            if not served:
                raise FLCohortError(
                    f"no online device of {', '.join(req.cohort)} serves a model to retrain"
                )
            (name, number), _ = served.most_common(1)[0]
            version = self.registry.get(f"{name}@{number}")
        if version.status != "ready":
            raise UsageError(f"{version.ref} is {version.status}; retrain from a ready version")
        return version

    def eligible(
        self, s: Session, cohort: Sequence[str], parent: VersionInfo, min_samples: int
    ) -> tuple[list[str], dict[str, str]]:
        """The cohort's eligible devices (sorted) and, for the others, why not."""
        from tinyfleet.host.fleet.rollout import resolve_targets

        ids = resolve_targets(s, self.fleet, cohort)
        rows = {
            r.device: r
            for r in s.scalars(
                select(DeviceRow).where(DeviceRow.fleet == self.fleet, DeviceRow.device.in_(ids))
            )
        }
        busy: dict[str, str] = {}
        for run in s.scalars(
            select(FLRunRow).where(FLRunRow.fleet == self.fleet, FLRunRow.state.in_(ACTIVE_STATES))
        ):
            for d in run.devices:
                busy[d] = run.id
        ok: list[str] = []
        excluded: dict[str, str] = {}
        for d in ids:
            reason = self._exclusion(rows[d], parent, min_samples, busy.get(d))
            if reason is None:
                ok.append(d)
            else:
                excluded[d] = reason
        return ok, excluded

    @staticmethod
    def _exclusion(
        row: DeviceRow, parent: VersionInfo, min_samples: int, busy_run: str | None
    ) -> str | None:
        profile = PROFILES.get(row.profile or "")
        if profile is not None and profile.kind == "mcu":
            return f"MCU-class device ({profile.name}) cannot train"
        if not row.online:
            return "offline"
        served = f"{row.active_model}@{row.active_version}" if row.active_model else "no model"
        if (row.active_model, row.active_version) != (parent.model, parent.number):
            return f"serves {served}, not {parent.ref}"
        revision = int((row.capabilities or {}).get("protocol_revision") or 1)
        if revision < PROTOCOL_REVISION_FL:
            return f"agent speaks protocol revision {revision}; federated retraining needs {PROTOCOL_REVISION_FL}"
        if row.desired is None:
            return "has no desired state from this host"
        fl = (row.reported or {}).get("fl") or {}
        samples = fl.get("samples")
        if isinstance(samples, int) and samples < min_samples:
            return f"{samples} labelled samples < {min_samples}"
        reason = str(fl.get("reason") or "")
        if fl.get("state") == "refused" and "not installed" in reason:
            return reason
        if busy_run is not None:
            return f"in federated run {busy_run}"
        return None

    @staticmethod
    def _enough(
        devices: list[str], excluded: dict[str, str], min_clients: int, cohort: Sequence[str]
    ) -> None:
        if len(devices) >= min_clients:
            return
        why = "; ".join(f"{d}: {r}" for d, r in sorted(excluded.items())[:10])
        more = f" (and {len(excluded) - 10} more)" if len(excluded) > 10 else ""
        raise FLCohortError(
            f"cohort {', '.join(cohort)}: {len(devices)} eligible device(s), the run needs "
            f"at least {min_clients}" + (f"; excluded: {why}{more}" if why else "")
        )

    # ------------------------------------------------------------------ views

    def view(self, run_id: str) -> dict[str, Any]:
        with Session(self.engine) as s:
            row = s.get(FLRunRow, run_id)
            if row is None or row.fleet != self.fleet:
                raise NotFoundError(f"no federated run {run_id}")
            return self._row(row)

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            rows = s.scalars(
                select(FLRunRow)
                .where(FLRunRow.fleet == self.fleet)
                .order_by(FLRunRow.created_at.desc(), FLRunRow.id.desc())
                .limit(limit)
            ).all()
            return [self._row(r) for r in rows]

    @staticmethod
    def _row(row: FLRunRow) -> dict[str, Any]:
        return {c.name: getattr(row, c.name) for c in FLRunRow.__table__.columns}

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        """Mark runs interrupted by a restart failed, then execute requested runs."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="fl-coordinator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; a run in progress fails ("the fleet service stopped"), fl cleared."""
        self._stop.set()
        link = self._superlink
        if link is not None:  # ends run_federated at once instead of after its rounds
            self._stop_superlink(link)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        recovered = False
        while not self._stop.is_set():
            try:
                if not self._connected():
                    self._stop.wait(self.options.poll_s)
                    continue
                if not recovered:
                    self.recover()
                    recovered = True
                rid = self._next_requested()
                if rid is not None:
                    self.execute(rid)
                    continue
            except Exception:  # the thread must survive anything one run does
                self.log.exception("federated coordinator step failed")
            self._stop.wait(self.options.poll_s)

    def recover(self) -> list[str]:
        """Runs left running by an earlier host process: failed, ``fl`` cleared on their devices."""
        with Session(writer(self.engine)) as s, s.begin():
            rows = s.scalars(
                select(FLRunRow).where(
                    FLRunRow.fleet == self.fleet, FLRunRow.state.in_(RUNNING_STATES)
                )
            ).all()
            ids = []
            for row in rows:
                self._finish(row, "failed", f"interrupted by a host restart while {row.state}")
                ids.append(row.id)
            devices = [d for row in rows for d in row.devices]
        if devices:
            self._set_fl(devices, None, only_run=set(ids))
        for rid in ids:
            self.log.warning("fl run %s: interrupted by a host restart; marked failed", rid)
        return ids

    def _next_requested(self) -> str | None:
        with Session(self.engine) as s:
            return s.scalars(
                select(FLRunRow.id)
                .where(FLRunRow.fleet == self.fleet, FLRunRow.state == "requested")
                .order_by(FLRunRow.created_at, FLRunRow.id)
                .limit(1)
            ).first()

    # ------------------------------------------------------------------ one run

    def execute(self, run_id: str) -> str:
        """Carry one requested run to its end; the final state."""
        self.current = run_id
        superlink: Any = None
        enabled: list[str] = []
        try:
            with Session(self.engine) as s:
                row = s.get(FLRunRow, run_id)
                if row is None or row.state != "requested":
                    return "missing" if row is None else row.state
                req = FLRequest.model_validate(
                    {
                        **row.config,
                        "cohort": row.cohort,
                        "model": f"{row.model}@{row.parent_version}",
                    }
                )
                devices = list(row.devices)
            self._update(run_id, state="enabling", started_at=utcnow())
            t0 = time.monotonic()
            self._timings = {}
            self._node_ids = {}
            parent = self.registry.get(f"{req.model}")
            parent_run, weights = self._parent_model(parent)
            superlink = self._superlink = self._start_superlink(run_id)
            address = self._advertised(superlink)
            self._update(run_id, superlink=address)
            root = getattr(superlink, "root_certificates", None)
            fl = FLSettings(
                enabled=True,
                superlink=address,
                run=run_id,
                min_samples=req.min_samples,
                root_certificates=None if root is None else Path(root).read_text(),
            )
            if getattr(superlink, "supernode_auth", False):
                fl = fl.model_copy(update={"node_auth": True})
                announced = fl.model_copy(update={"enabled": False})
                enabled = self._set_fl(devices, announced)
                _, unregistered = self._register_nodes(superlink, run_id, enabled, req)
                self._update(run_id, excluded_add=unregistered)
                devices = sorted(self._node_ids)
            enabled = sorted({*enabled, *self._set_fl(devices, fl)})
            running, refused = self._wait_running(run_id, devices, req)
            self._timings["enabling"] = round(time.monotonic() - t0, 2)
            self._update(run_id, state="training", devices=running, excluded_add=refused)
            data = self._parent_data(parent_run)
            result = self._train(superlink, req, weights, data, run_id, parent.preprocess)
            self._timings["training"] = round(time.monotonic() - t0 - self._timings["enabling"], 2)
            t1 = time.monotonic()
            self._update(run_id, state="evaluating", result=self._result_json(result, running))
            self._stop_superlink(superlink)
            superlink = self._superlink = None
            self._set_fl(enabled, None)
            enabled = []
            state = self._register(run_id, req, parent, parent_run, data, result, running)
            self._timings["evaluating"] = round(time.monotonic() - t1, 2)
            self._update(run_id, timings=self._timings)
            return state
        except (TinyfleetError, _RunFailed) as exc:
            self._fail(run_id, str(exc))
            return "failed"
        except Exception as exc:
            self.log.exception("fl run %s failed", run_id)
            self._fail(run_id, f"internal error: {type(exc).__name__}: {exc}")
            return "failed"
        finally:
            if enabled:
                try:
                    self._set_fl(enabled, None)
                except Exception:
                    self.log.exception("fl run %s: clearing fl on the devices failed", run_id)
            if superlink is not None:
                self._stop_superlink(superlink)
            self._superlink = None
            self.current = None

    # -- steps

    def _parent_model(self, parent: VersionInfo) -> tuple[Path, list[np.ndarray]]:
        run_name = (parent.lineage or {}).get("run")
        if not run_name:
            raise FLParentError(f"{parent.ref} names no run folder in its lineage")
        run = self.settings.runs_dir / str(run_name)
        keras_file = run / "model.keras"
        if not keras_file.is_file() or not (run / "data.npz").is_file():
            raise FLParentError(
                f"{parent.ref}: its float model or data is gone ({run}/model.keras, data.npz)"
            )
        model = self._load_keras(keras_file)
        return run, [np.asarray(w) for w in model.get_weights()]

    @staticmethod
    def _load_keras(path: Path) -> Any:
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras  # type: ignore[import-untyped]

        try:
            return keras.models.load_model(path, compile=False)
        except Exception as exc:
            raise FLParentError(f"{path}: cannot load the parent's float model: {exc}") from None

    @staticmethod
    def _parent_data(run: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(run / "data.npz") as npz:
                data = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise FLParentError(f"{run}/data.npz: cannot read ({exc})") from None
        if "x_val" not in data or "y_val" not in data:
            raise FLParentError(f"{run}/data.npz has no validation split (x_val, y_val)")
        return data

    def _start_superlink(self, run_id: str) -> Any:
        workdir = self.workdir / "superlink" / run_id
        workdir.mkdir(parents=True, exist_ok=True)
        if self._superlink_factory is not None:
            link = self._superlink_factory(workdir)
        else:
            from tinyfleet.host.fl.superlink import SuperLink, generate_tls_files

            opts = self.options
            tls = None
            if opts.tls:
                hosts = {opts.superlink_host, opts.advertise_host or opts.superlink_host}
                hosts.discard("0.0.0.0")
                tls = generate_tls_files(workdir / "pki", hosts=(*sorted(hosts), "localhost"))
            link = SuperLink(
                workdir, host=opts.superlink_host, tls=tls, supernode_auth=opts.node_auth
            )
        link.start()
        return link

    def _advertised(self, superlink: Any) -> str:
        address = str(getattr(superlink, "fleet_address", None) or superlink.address)
        host, _, port = address.rpartition(":")
        advertise = self.options.advertise_host
        if advertise is not None or host in ("0.0.0.0", "[::]", "::", ""):
            host = advertise or "127.0.0.1"
        return f"{host}:{port}"

    def _stop_superlink(self, superlink: Any) -> None:
        try:
            superlink.stop()
        except Exception:
            self.log.exception("stopping the SuperLink failed")

    def _set_fl(
        self, devices: Sequence[str], fl: FLSettings | None, *, only_run: set[str] | None = None
    ) -> list[str]:
        """Set (or clear) ``fl`` on ``devices``; the devices whose desired state changed.

        Clearing skips devices whose stored ``fl`` is already absent or, with
        ``only_run``, belongs to another run.
        """
        if self.desired is None:
            return []
        from tinyfleet.host.fleet.publish import stored_fl

        changed: list[tuple[str, bytes]] = []
        with Session(writer(self.engine)) as s, s.begin():
            for d in devices:
                row = s.get(DeviceRow, (self.fleet, d), with_for_update=True)
                if row is None or row.desired is None:
                    continue
                current = stored_fl(row)
                if fl is None:
                    if current is None:
                        continue
                    if only_run is not None and current.run not in only_run:
                        continue
                try:
                    _, payload = self.desired.set_fl(s, d, fl)
                except ValueError as exc:
                    self.log.warning("fl on %s: %s", d, exc)
                    continue
                changed.append((d, payload))
        for d, payload in changed:
            self.desired.publish(d, payload)
        return [d for d, _ in changed]

    def _register_nodes(
        self, superlink: Any, run_id: str, devices: list[str], req: FLRequest
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Node authentication: register each device's reported public key; device → node id."""
        deadline = time.monotonic() + req.enable_timeout_s
        keys: dict[str, str] = {}
        while not self._stop.is_set():
            with Session(self.engine) as s:
                for r in s.scalars(
                    select(DeviceRow).where(
                        DeviceRow.fleet == self.fleet, DeviceRow.device.in_(devices)
                    )
                ):
                    fl = (r.reported or {}).get("fl") or {}
                    if fl.get("run") == run_id and fl.get("public_key"):
                        keys[r.device] = str(fl["public_key"])
            if len(keys) == len(devices) or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        folder = self.workdir / "keys" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        node_ids: dict[str, int] = {}
        missing: dict[str, str] = {}

        def register(d: str) -> None:  # one `flwr supernode register` each, in parallel
            path = folder / f"{d}.pub"
            path.write_text(keys[d] + "\n")
            try:
                node_ids[d] = int(superlink.register_node(path, name=d))
            except TinyfleetError as exc:
                missing[d] = f"public key not registered: {exc}"[:500]

        for d in devices:
            if d not in keys:
                missing[d] = f"no SuperNode public key reported within {req.enable_timeout_s:g} s"
        with ThreadPoolExecutor(min(8, max(1, len(keys)))) as pool:
            list(pool.map(register, [d for d in devices if d in keys]))
        if len(node_ids) < req.min_clients:
            why = "; ".join(f"{d}: {r}" for d, r in sorted(missing.items())[:10])
            raise _RunFailed(
                f"{len(node_ids)} device(s) registered a SuperNode key, the run needs "
                f"{req.min_clients}" + (f"; {why}" if why else "")
            )
        self._node_ids = node_ids
        return node_ids, missing

    def _wait_running(
        self, run_id: str, devices: list[str], req: FLRequest
    ) -> tuple[list[str], dict[str, str]]:
        """Until every device reports running or refused for this run (or the timeout)."""
        deadline = time.monotonic() + req.enable_timeout_s
        running: list[str] = []
        refused: dict[str, str] = {}
        while True:
            running, refused = [], {}
            with Session(self.engine) as s:
                for r in s.scalars(
                    select(DeviceRow).where(
                        DeviceRow.fleet == self.fleet, DeviceRow.device.in_(devices)
                    )
                ):
                    fl = (r.reported or {}).get("fl") or {}
                    if fl.get("run") != run_id:
                        continue
                    if fl.get("state") == "running":
                        running.append(r.device)
                    elif fl.get("state") == "refused":
                        refused[r.device] = str(fl.get("reason") or "refused")
            if len(running) + len(refused) >= len(devices) or self._stop.is_set():
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        for d in devices:
            if d not in running and d not in refused:
                refused[d] = f"no running SuperNode reported within {req.enable_timeout_s:g} s"
        if len(running) < req.min_clients:
            why = "; ".join(f"{d}: {r}" for d, r in sorted(refused.items())[:10])
            raise _RunFailed(
                f"{len(running)} device(s) started a SuperNode, the run needs "
                f"{req.min_clients}" + (f"; {why}" if why else "")
            )
        return sorted(running), refused

    def _train(
        self,
        superlink: Any,
        req: FLRequest,
        weights: list[np.ndarray],
        data: dict[str, np.ndarray],
        run_id: str,
        preprocess: str | None = None,
    ) -> Any:
        """``run_federated``; devices train only on samples of the parent's feature pipeline."""
        workdir = self.workdir / "runs" / run_id
        workdir.mkdir(parents=True, exist_ok=True)
        validation = (data["x_val"], data["y_val"])
        settings = {**req.flower_config(), "preprocess": preprocess}
        if self._runner is not None:
            return self._runner(superlink, settings, weights, validation, workdir)
        from tinyfleet.host.fl.run import FLRunConfig, run_federated

        fields = set(FLRunConfig.model_fields)
        config = FLRunConfig(**{k: v for k, v in settings.items() if k in fields})
        return run_federated(superlink, config, weights, validation, workdir)

    def _result_json(self, result: Any, devices: list[str]) -> dict[str, Any]:
        return {
            "flower_run_id": _jsonable(getattr(result, "run_id", None)),
            "nodes": _jsonable(getattr(result, "nodes", [])),
            "devices": devices,
            "dropped": _jsonable(getattr(result, "dropped", [])),
            "round_metrics": _jsonable(getattr(result, "rounds", [])),
            "initial_val_acc": _jsonable(getattr(result, "initial_val_acc", None)),
            "final_val_acc": _jsonable(getattr(result, "final_val_acc", None)),
            "seconds": _jsonable(getattr(result, "seconds", None)),
            "node_devices": {str(n): d for d, n in sorted(self._node_ids.items())},
        }

    def _register(
        self,
        run_id: str,
        req: FLRequest,
        parent: VersionInfo,
        parent_run: Path,
        data: dict[str, np.ndarray],
        result: Any,
        devices: list[str],
    ) -> str:
        from tinyfleet.host.pipeline import (
            RunFolder,
            code_version,
            evaluate_step,
            quantize_step,
            register_step,
        )

        weights = [np.asarray(w) for w in result.weights]
        model = self._load_keras(parent_run / "model.keras")
        try:
            model.set_weights(weights)
        except ValueError as exc:
            raise _RunFailed(f"the federated weights do not fit {parent.ref}: {exc}") from None
        try:
            info = json.loads((parent_run / "run.json").read_text())
        except (OSError, ValueError) as exc:
            raise FLParentError(f"{parent_run}/run.json: cannot read ({exc})") from None
        run = RunFolder.create(self.settings.runs_dir, f"{parent.model}-fl")
        model_path = run.path / "model.keras"
        model.save(model_path)
        shutil.copyfile(parent_run / "data.npz", run.path / "data.npz")
        result_json = self._result_json(result, devices)
        federated = {
            "run_id": run_id,
            "flower_run_id": result_json["flower_run_id"],
            "cohort": list(req.cohort),
            "rounds": req.rounds,
            "strategy": req.strategy,
            "nodes": result_json["nodes"],
            "devices": devices,
            "node_devices": result_json["node_devices"],
            "dropped": result_json["dropped"],
            "round_metrics": result_json["round_metrics"],
            "initial_val_acc": result_json["initial_val_acc"],
            "final_val_acc": result_json["final_val_acc"],
        }
        info.update(
            source="federated",
            source_path=str(model_path.resolve()),
            code_version=code_version(),
            parent_run=parent_run.name,
            federated={k: federated[k] for k in ("run_id", "cohort", "rounds", "strategy")},
            created_at=utcnow().isoformat(timespec="seconds"),
            created_by=self.settings.user,
        )
        run.write_info(info)
        quantize_step(run)
        metrics, gates = evaluate_step(run)
        version = register_step(
            self.settings,
            run,
            metrics,
            gates,
            parent_version=parent.number,
            extra_lineage={"federated": federated},
        )
        state = "registered" if version.status == "ready" else "rejected"
        rollout_id = None
        reason = None
        if state == "rejected":
            reason = "; ".join(str(r) for r in (version.rejection_reasons or []))[:1000] or None
        elif req.auto_rollout:
            rollout_id, reason = self._rollout(version, req, parent, devices)
        with Session(writer(self.engine)) as s, s.begin():
            row = s.get(FLRunRow, run_id)
            assert row is not None
            row.new_version = version.number
            row.rollout_id = rollout_id
            self._finish(row, state, reason)
        self.log.info("fl run %s: %s as %s", run_id, state, version.ref)
        return state

    def _rollout(
        self, version: VersionInfo, req: FLRequest, parent: VersionInfo, devices: list[str]
    ) -> tuple[str | None, str | None]:
        if self.orchestrator is None:
            return None, "no orchestrator to start the rollout; use `tinyfleet rollout start`"
        from tinyfleet.host.fleet.rollout import RolloutSpec

        spec_fields = dict(req.rollout)
        spec_fields.setdefault("artifact", self._served_artifact(parent, devices))
        try:
            spec = RolloutSpec(ref=version.ref, targets=list(req.cohort), **spec_fields)
            return self.orchestrator.create(spec, "fl-coordinator"), None
        except (TinyfleetError, ValidationError) as exc:
            self.log.warning("fl rollout of %s not started: %s", version.ref, exc)
            return None, f"rollout not started: {exc}"[:1000]

    def _served_artifact(self, parent: VersionInfo, devices: list[str]) -> str:
        """FORMAT-PRECISION of the parent artifact the cohort runs (default tflite-int8)."""
        with Session(self.engine) as s:
            shas = Counter(
                s.scalars(
                    select(DeviceRow.active_sha256).where(
                        DeviceRow.fleet == self.fleet, DeviceRow.device.in_(devices)
                    )
                ).all()
            )
        for sha, _ in shas.most_common():
            for a in parent.artifacts:
                if a.sha256 == sha:
                    return f"{a.format}-{a.precision}"
        return "tflite-int8"

    # -- rows

    def _update(
        self,
        run_id: str,
        *,
        excluded_add: dict[str, str] | None = None,
        timings: dict[str, float] | None = None,
        **values: Any,
    ) -> None:
        with Session(writer(self.engine)) as s, s.begin():
            row = s.get(FLRunRow, run_id)
            if row is None:
                raise _RunFailed(f"run {run_id} disappeared")
            for k, v in values.items():
                setattr(row, k, v)
            if values.get("result"):
                row.flower_run_id = (
                    None
                    if values["result"].get("flower_run_id") is None
                    else str(values["result"]["flower_run_id"])[:64]
                )
            if excluded_add:
                row.excluded = {**(row.excluded or {}), **excluded_add}
            if timings is not None:
                row.result = {**(row.result or {}), "timings_s": dict(timings)}
            row.updated_at = utcnow()
        if "state" in values:
            self.log.info("fl run %s: %s", run_id, values["state"])

    def _fail(self, run_id: str, reason: str) -> None:
        if self._stop.is_set():
            reason = f"the fleet service stopped ({reason})"
        self.log.warning("fl run %s failed: %s", run_id, reason)
        with Session(writer(self.engine)) as s, s.begin():
            row = s.get(FLRunRow, run_id)
            if row is not None and row.state not in TERMINAL_STATES:
                self._finish(row, "failed", f"{row.state}: {reason}")

    @staticmethod
    def _finish(row: FLRunRow, state: str, reason: str | None) -> None:
        now = utcnow()
        row.state = state
        row.reason = None if reason is None else reason[:1000]
        row.finished_at = now
        row.updated_at = now
