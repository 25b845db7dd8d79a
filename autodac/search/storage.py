"""Searches kept in an Optuna storage: many workers share one study, and a killed worker loses only its trial.

``optimize(..., storage=..., study_name=...)`` puts its Optuna study in a storage (SQLite,
PostgreSQL or any SQLAlchemy URL, a journal file, or an Optuna storage object) instead of memory.
Every worker that names the same study adds its trials to the same search:

- the study records what it was made for (``fingerprint``: the model's weights, the budgets,
  the input shapes, the methods, the probe) and refuses a worker whose fingerprint differs;
- what every worker would otherwise compute alike (the sensitivity profile, the latency table
  of a device, the BatchNorm re-estimation decision) is computed by the first and read back
  by the others, so all workers score plans alike;
- a trial left RUNNING by a dead worker is failed and queued again: at once when the worker ran
  on this machine (its process is gone), otherwise once its heartbeat is older than the grace
  period (Optuna's heartbeats for RDB storages; the same mechanism for journal files here).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import inspect
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autodac._logging import get_logger
from autodac.errors import AutodacError

__all__ = [
    "STORAGE_VERSION", "HEARTBEAT_INTERVAL", "GRACE_PERIOD", "open_storage", "fingerprint", "tensor_digest", "SharedSearch",
    "open_search", "study_plans", "fail_dead_trials", "worker_identity", "stamping_sampler",
]

logger = get_logger(__name__)

STORAGE_VERSION = 1  # what autodac keeps in a study's attributes; a study of another version is refused
HEARTBEAT_INTERVAL = 10  # seconds between the heartbeats of a running trial
GRACE_PERIOD = 60  # a running trial whose last heartbeat is older than this is taken for dead, failed and queued again
_RETRIES = 3  # how many times a dead worker's trial is queued again
_LOCK_GRACE = 10  # seconds after which a journal file's lock, left by a killed writer, is broken
_OPEN_ATTEMPTS = 4  # tries at opening a database (workers creating its tables at once collide)
_PREFIX = "autodac:"
_JOURNAL_SUFFIXES = (".journal", ".log")


# ----------------------------------------------------------------------------- storages


def _describe(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: say it as given
        return url


def _retry_callback():
    import optuna

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return retry(max_retry=_RETRIES)


def _heartbeat_journal(path: Path, heartbeat_interval: int, grace_period: int):
    """An Optuna journal-file storage with heartbeats, which Optuna itself offers only for RDB storages."""
    grace_period_seconds = grace_period
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        """Heartbeats as trial system attributes; a RUNNING trial whose last one is stale is failed by Optuna."""

        def record_heartbeat(self, trial_id: int) -> None:
            # with the trial's id: a retry copies the dead trial's attributes, and its old beat must not count
            self.set_trial_system_attr(trial_id, _PREFIX + "heartbeat", [trial_id, time.time()])

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            stale = []
            for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                owner, beat = trial.system_attrs.get(_PREFIX + "heartbeat", (None, None))
                if owner != trial._trial_id:  # killed before its first heartbeat: count from its start
                    beat = trial.datetime_start.timestamp() if trial.datetime_start is not None else None
                if beat is not None and now - float(beat) > self.grace_period:
                    stale.append(trial._trial_id)
            return stale

        grace_period = grace_period_seconds

        def get_heartbeat_interval(self) -> int | None:
            return heartbeat_interval

        def get_heartbeat_stale_trial_callback(self):
            return _retry_callback()

        def get_failed_trial_callback(self):  # the name Optuna 4 asks for
            return _retry_callback()

    # A write holds the lock for milliseconds (an append and an fsync); one left by a killed writer is broken after
    # _LOCK_GRACE seconds (Optuna's default, 30 s, kept every other worker waiting that long)
    return HeartbeatJournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path), grace_period=_LOCK_GRACE)))


def _check_journal(path: Path) -> None:
    """A journal file that exists holds one JSON object per line (the last may be half written by a worker still writing):
    anything else is named here, not as a JSONDecodeError from deep in Optuna when the first trial is written."""
    if not path.is_file():
        return
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # after the last newline: a record being written, as Optuna allows
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise AutodacError(
                f"a journal file must hold an Optuna journal (one JSON record per line, as autodac writes it), but line {number} "
                f"of {str(path)!r} is {line[:60]!r}"
            )


def open_storage(storage: Any, *, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD):
    """The Optuna storage ``storage`` names, with heartbeats so a dead worker's trial is failed and retried.

    ``storage`` is an SQLAlchemy URL (``sqlite:///search.db``, ``postgresql://user@host/db``;
    PostgreSQL needs ``pip install autodac[distributed]``), a path ending in ``.journal`` or
    ``.log`` (an Optuna journal file, for several processes on one machine or a shared file
    system), or an Optuna storage object, used as it is (give it heartbeats yourself).
    """
    import optuna

    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if isinstance(storage, os.PathLike) or (isinstance(storage, str) and "://" not in storage):
        path = Path(storage)
        if path.suffix not in _JOURNAL_SUFFIXES:
            raise AutodacError(
                f"`storage` must be an Optuna storage, a database URL like sqlite:///search.db or postgresql://host/db, "
                f"or a journal file ending in {' or '.join(_JOURNAL_SUFFIXES)}, but got storage={str(storage)!r}"
            )
        if not path.parent.is_dir():
            raise AutodacError(f"a journal file must be in an existing folder, but {str(path.parent)!r} does not exist")
        _check_journal(path)
        return _heartbeat_journal(path, heartbeat_interval, grace_period)
    if not isinstance(storage, str):
        raise AutodacError(f"`storage` must be a URL, a journal file path or an Optuna storage, but got {type(storage).__name__}")
    storage = _with_driver(storage)
    engine_kwargs: dict[str, Any] = {}
    if storage.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # writers queue on SQLite's file lock rather than fail
    parameters = inspect.signature(optuna.storages.RDBStorage).parameters
    callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters else "failed_trial_callback"
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                opened = optuna.storages.RDBStorage(
                    storage, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                    **{callback: _retry_callback()},
                )
            if storage.startswith("sqlite"):
                _write_ahead(opened)
            return opened
        except ModuleNotFoundError as missing:
            raise AutodacError(
                f"`storage` {_describe(storage)} needs the database driver {missing.name!r}: install it "
                f"(for PostgreSQL, pip install autodac[distributed])"
            ) from None
        except Exception as error:  # SQLAlchemy raises many types for a URL it cannot open
            # workers that open a new database together race to create its tables ("table ... already exists"): once
            # one has, the others find them, so try again; an unreachable database fails every attempt
            if attempt + 1 == _OPEN_ATTEMPTS:
                raise AutodacError(
                    f"`storage` must be a database autodac can open, but opening {_describe(storage)} failed: {error}"
                ) from None
            time.sleep(0.5 * (attempt + 1))


def _write_ahead(opened) -> None:
    """SQLite in WAL mode with ``synchronous=NORMAL``: a commit (Optuna makes about 30 per trial) no longer waits
    for the disk, readers no longer block the writer, and a killed process still loses nothing it committed
    (only a power cut can lose the last commits). Measured: SQLite's cost per trial falls from ~0.6 s to ~0.1 s."""
    import sqlalchemy

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(opened.engine, "connect", pragmas)
    opened.engine.dispose()  # connections made while the tables were created reconnect with the pragmas


def _with_driver(url: str) -> str:
    """A ``postgresql://`` URL with the driver that is installed (SQLAlchemy 2.0 defaults to psycopg2, 2.1 to psycopg 3)."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://" + url[len("postgresql://"):]
    return url  # SQLAlchemy names the missing driver


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = f"{uuid.getnode():x}"
    return f"{socket.gethostname()}/{boot}"


def worker_identity() -> str:
    """``host/boot:pid``: which machine (and boot of it) and which process runs a trial."""
    return f"{_machine()}:{os.getpid()}"


def stamping_sampler(**options: Any):
    """Optuna's TPE sampler, marking each trial as run by this process the moment the trial is created.

    The mark (user attribute ``worker``, with the trial's number: a retry copies the attributes of the
    trial it redoes) is what lets ``fail_dead_trials`` fail a dead local worker's trial at once.
    """
    import optuna

    class StampingTPESampler(optuna.samplers.TPESampler):
        def before_trial(self, study, trial) -> None:
            study._storage.set_trial_user_attr(trial._trial_id, "worker", {"id": worker_identity(), "trial": trial.number})
            super().before_trial(study, trial)

    return StampingTPESampler(**options)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _grace_period(storage) -> float:
    """Seconds after which a running trial with no sign of life is taken for dead (the storage's heartbeat grace)."""
    inner = getattr(storage, "_backend", storage)  # Optuna wraps RDB storages in a cache
    grace = getattr(inner, "grace_period", None)
    if grace is None and getattr(inner, "heartbeat_interval", None):
        grace = 2 * inner.heartbeat_interval  # Optuna's own default
    return float(grace or GRACE_PERIOD)


def fail_dead_trials(study) -> int:
    """Fail (and queue again) the RUNNING trials of workers that are gone; returns how many.

    A trial whose mark (see ``stamping_sampler``) names a process of this machine that no
    longer exists is failed at once; a trial with no mark (its worker died between creating it
    and marking it, a few milliseconds) once it is older than the grace period; any other is
    left to Optuna's heartbeat check (``optuna.storages.fail_stale_trials``), run here too.
    """
    import optuna
    from optuna.trial import TrialState

    host = worker_identity().rpartition(":")[0]
    grace = _grace_period(study._storage)
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stamp = trial.user_attrs.get("worker")
        if not isinstance(stamp, dict) or stamp.get("trial") != trial.number:  # never marked (or a retry's copy of a mark)
            started = trial.datetime_start
            if started is None or (datetime.datetime.now() - started).total_seconds() <= grace:
                continue
        else:
            where, _, pid = str(stamp.get("id", "")).rpartition(":")
            if where != host or not pid.isdigit() or _alive(int(pid)):
                continue
        try:
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed += 1
                _retry_callback()(study, study._storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if failed:
        logger.info("failed and re-queued %d trials of dead workers", failed)
    return failed


# ----------------------------------------------------------------------------- fingerprints


def tensor_digest(tensors: Mapping[str, torch.Tensor] | list[torch.Tensor | None]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), independent of their device."""
    digest = hashlib.sha256()
    items = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors)
    for name, tensor in items:
        digest.update(str(name).encode())
        if tensor is None:
            digest.update(b"none")
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: nn.Module, probe_tensors: list[torch.Tensor | None], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a study is made for: the model (class and weights), the probe, and the planning ``settings``."""
    record = {
        "version": STORAGE_VERSION,
        "model": f"{type(model).__qualname__} sha256:{tensor_digest(model.state_dict())[:16]}",
        "probe": f"sha256:{tensor_digest(probe_tensors)[:16]}" if probe_tensors else "none",
        **settings,
    }
    return json.loads(json.dumps(record))  # as the storage gives it back: tuples become lists


# ----------------------------------------------------------------------------- the shared search


def _shown(record: Mapping[str, Any], field: str) -> str:
    """``field=value`` as a fingerprint holds it; a field it does not record was at its default there."""
    return f"{field}={record[field]!r}" if field in record else f"{field} at its default (not recorded)"


class SharedSearch:
    """One study in a storage: the fingerprint check, the pieces all workers share, the published plans."""

    def __init__(self, storage: Any, study_name: str, record: dict[str, Any], directions: list[str]) -> None:
        import optuna

        if not isinstance(study_name, str) or not study_name:
            raise AutodacError(f"`study_name` must be a non-empty string naming the shared study, but got study_name={study_name!r}")
        self.storage = open_storage(storage)
        self.name = study_name
        logging_level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            self.study = optuna.create_study(storage=self.storage, study_name=study_name, directions=directions, load_if_exists=True)
        finally:
            optuna.logging.set_verbosity(logging_level)
        self._check_own(directions)
        self._check(record)
        self.trials_before = len(self.study.get_trials(deepcopy=False))
        fail_dead_trials(self.study)

    def _check_own(self, directions: list[str]) -> None:
        """Refuse a study autodac did not make: one of other directions, or holding trials but no fingerprint."""
        if _PREFIX + "fingerprint" in self.study.user_attrs:  # autodac's: the fingerprint check says whether it is this search's
            return
        have = [d.name.lower() for d in self.study.directions]
        trials = len(self.study.get_trials(deepcopy=False))
        if trials or have != [d.lower() for d in directions]:
            raise AutodacError(
                f"`study_name` must name a study autodac made or a new one, but study {self.name!r} in this storage was made "
                f"by other code ({trials} trial(s), no autodac fingerprint, direction(s) {have}; autodac's search needs "
                f"{list(directions)}): give another study_name"
            )

    def _check(self, record: dict[str, Any]) -> None:
        key = _PREFIX + "fingerprint"
        stored = self.study.user_attrs.get(key)
        if stored is None:
            self.study.set_user_attr(key, record)
            stored = self.study.user_attrs.get(key, record)
        for field in sorted(set(stored) | set(record), key=lambda f: (f != "version", f)):
            if stored.get(field) != record.get(field):
                raise AutodacError(
                    f"every worker of study {self.name!r} must plan for what the study was made for, but {field} differs: "
                    f"the study has {_shown(stored, field)}, this call {_shown(record, field)} "
                    f"(a study holds one search: give another study_name for another model, budget or probe)"
                )

    def piece(self, name: str, compute: Callable[[], Any], encode: Callable[[Any], Any] = lambda v: v,
              decode: Callable[[Any], Any] = lambda v: v) -> Any:
        """The shared value ``name``: read from the study, or computed by ``compute`` and stored for the others."""
        key = _PREFIX + name
        attrs = self.study.user_attrs
        if key in attrs:
            logger.info("study %r: read %s computed by another worker", self.name, name)
            return decode(attrs[key])
        value = compute()
        attrs = self.study.user_attrs
        if key not in attrs:  # another worker may have finished first: then everyone uses its value
            self.study.set_user_attr(key, encode(value))
            attrs = self.study.user_attrs
        return decode(attrs[key])

    def profile(self, compute: Callable[[], Any]):
        """The sensitivity profile (per-layer measured losses)."""
        from autodac.search.sensitivity import SensitivityProfile

        def decode(data: dict) -> SensitivityProfile:
            losses = {layer: {(str(m), int(r)): float(v) for m, r, v in rows} for layer, rows in data["losses"].items()}
            return SensitivityProfile(losses=losses, samples=int(data["samples"]), seconds=float(data["seconds"]))

        return self.piece("profile", compute, lambda p: p.to_dict(), decode)

    def latency(self, device: torch.device, compute: Callable[[], Any], runtime: Any = None):
        """The latency table of ``device`` (keyed by what timings depend on: device model, threads, torch build, runtime)."""
        from autodac.latency import LatencyTable, device_key
        from autodac.runtimes import TORCH

        runtime = runtime or TORCH
        described = device_key(device, runtime)
        name = "latency:" + hashlib.sha1(described.encode()).hexdigest()[:16]

        def encode(table: LatencyTable) -> dict:
            return {"device": described, "original": table.original, "seconds": table.seconds, "impls": table.impls}

        def decode(data: dict) -> LatencyTable:
            return LatencyTable(device, float(data["original"]), [[float(s) for s in row] for row in data["seconds"]],
                                [[str(i) for i in row] for row in data["impls"]], runtime.name)

        return self.piece(name, compute, encode, decode)

    def publish(self, plan, value: float, trial: int, front: list | None = None) -> None:
        """Keep ``plan`` as the study's best plan unless a better one is already there."""
        key = _PREFIX + "best_plan"
        stored = self.study.user_attrs.get(key)
        if stored is None or float(stored.get("value", float("-inf"))) <= value:
            self.study.set_user_attr(key, {"value": value, "trial": trial, "plan": plan.to_dict()})
        if front:
            self.study.set_user_attr(_PREFIX + "pareto", [p.to_dict() for p in front])

    def note(self, trials: int) -> str:
        from optuna.trial import TrialState

        finished = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        return f"search shared in study {self.name!r}: {finished} finished trials from all workers, {trials} run by this one"


def open_search(
    storage: Any, study_name: str | None, model: nn.Module, probe: Any, searches: bool, settings: Mapping[str, Any], pareto: bool
) -> SharedSearch | None:
    """The shared search ``optimize(storage=..., study_name=...)`` asks for, or None without a storage."""
    if storage is None:
        if study_name is not None:
            raise AutodacError(f"`study_name` names a study in a storage, so `storage` must be given too, but got storage=None (study_name={study_name!r})")
        return None
    if study_name is None:
        raise AutodacError("a shared search needs a name every worker gives, so `study_name` must be given with `storage`, but got study_name=None")
    if not searches:
        raise AutodacError(
            "`storage` keeps the Optuna search, which runs only with `data`, `synthesize` or `evaluate`, but none was given "
            "(data-free planning is one exact knapsack: there is nothing to share)"
        )
    tensors = [] if probe is None else [probe.inputs, probe.labels]
    record = fingerprint(model, tensors, dict(settings, pareto=pareto))
    return SharedSearch(storage, study_name, record, ["maximize", "minimize"] if pareto else ["maximize"])


def _missing_file(storage: Any) -> str | None:
    """The file a journal path or an SQLite URL names, when it does not exist; None otherwise (servers, storage objects)."""
    if isinstance(storage, os.PathLike) or (isinstance(storage, str) and "://" not in storage):
        return None if Path(storage).exists() else str(storage)
    if isinstance(storage, str) and storage.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        try:
            database = make_url(storage).database
        except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot read: open_storage names it
            return None
        if database and database != ":memory:" and not database.startswith("file:") and not Path(database).exists():
            return database
    return None


def study_plans(storage: Any, study_name: str, front: bool = False) -> dict[str, Any]:
    """The plans published in study ``study_name``: ``{name: best plan}`` (and ``{name/front-k: plan}`` with ``front``)."""
    import optuna

    from autodac.plan import Plan

    missing = _missing_file(storage)
    if missing is not None:  # reading must not create an empty database or journal where a path was mistyped
        raise AutodacError(f"a storage to read plans from must exist, but {missing!r} does not")
    opened = open_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        names = optuna.study.get_all_study_names(opened)
        raise AutodacError(f"`study` must name a study in the storage ({', '.join(map(repr, names)) or 'none'}), but got {study_name!r}") from None
    attrs = study.user_attrs
    if _PREFIX + "best_plan" not in attrs:
        raise AutodacError(
            f"study {study_name!r} must hold a finished autodac search (each worker publishes its plan when it ends), but it holds none yet"
        )
    plans = {study_name: Plan.from_dict(attrs[_PREFIX + "best_plan"]["plan"])}
    if front:
        for k, data in enumerate(attrs.get(_PREFIX + "pareto", []), 1):
            plans[f"{study_name}/front-{k}"] = Plan.from_dict(data)
    return plans
