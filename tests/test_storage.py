"""Searches kept in an Optuna storage: parallel workers share one study, a SIGKILLed worker loses only its trial,
a worker made for another model, budget or probe is refused, shared pieces are read back, and the in-memory
default is unchanged. SQLite and journal files always; PostgreSQL when ``AUTODAC_TEST_POSTGRES_URL`` names a
server (``.ci/run`` starts one on loopback)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

import autodac
from autodac.cli import main
from autodac.latency import LatencyTable
from autodac.probes import predict, reestimate_batchnorm
from autodac.search import storage as shared_storage
from autodac.testing import SmallConvNet

BUDGET = 0.5
KINDS = ["sqlite", "journal", "postgresql"]


def _model(seed: int = 0) -> torch.nn.Module:
    model = SmallConvNet(seed=seed)
    reestimate_batchnorm(model, torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(21)))
    return model.eval()


def _probe(model: torch.nn.Module, n: int = 80, seed: int = 22) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, predict(model, x).argmax(1)


def _storage(kind: str, folder: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{folder / 'search.db'}"
    if kind == "journal":
        return str(folder / "search.journal")
    url = os.environ.get("AUTODAC_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: AUTODAC_TEST_POSTGRES_URL is unset (.ci/run installs Debian's postgresql and sets it)")
    try:
        shared_storage.open_storage(url)
    except autodac.AutodacError as error:
        pytest.skip(f"the PostgreSQL server in AUTODAC_TEST_POSTGRES_URL cannot be used: {error}")
    return url


@pytest.fixture
def work(tmp_path: Path) -> dict[str, Any]:
    """A model file and a probe file as the command line takes them, and the same objects in Python."""
    model = _model()
    x, y = _probe(model)
    torch.save(model, tmp_path / "model.pt")
    np.savez(tmp_path / "probe.npz", x=x.numpy(), y=y.numpy())
    return {"dir": tmp_path, "model": model, "data": [(x, y)], "model_file": str(tmp_path / "model.pt"),
            "probe_file": str(tmp_path / "probe.npz")}


def _optimize(work: dict[str, Any], url: str, study: str, n_trials: int, **changes: Any) -> autodac.Result:
    """``optimize`` as ``autodac worker`` calls it (the library's defaults, the same probe)."""
    model = changes.pop("model", work["model"])
    return autodac.optimize(model, BUDGET, data=work["data"], n_trials=n_trials, progress=False, storage=url, study_name=study, **changes)


def _worker(work: dict[str, Any], url: str, study: str, n_trials: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "autodac.cli", "worker", "--storage", url, "--study", study, work["model_file"],
               "--flops-budget", str(BUDGET), "--data", work["probe_file"], "--n-trials", str(n_trials), "--quiet", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=shared_storage.open_storage(url))


def _states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def _finished(study: optuna.Study) -> dict[int, float]:
    return {t.number: t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def _same_selection_same_value(study: optuna.Study) -> None:
    values: dict[tuple[int, ...], float] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        assert values.setdefault(tuple(trial.user_attrs["selection"]), trial.value) == trial.value


# ----------------------------------------------------------------------------- several workers, one search


@pytest.mark.parametrize("kind", KINDS)
def test_two_parallel_workers_finish_the_sum_of_their_trials(kind: str, work: dict[str, Any]) -> None:
    url, name = _storage(kind, work["dir"]), f"parallel-{uuid.uuid4().hex[:8]}"
    workers = [_worker(work, url, name, 5) for _ in range(2)]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    reports = [json.loads(out) for out, _ in outputs]
    study = _study(url, name)
    assert _states(study) == {"COMPLETE": 10}
    assert all(r["trials"] >= 5 and r["flops_ratio"] <= BUDGET for r in reports)
    assert sorted(r["trials"] for r in reports)[-1] == 10  # the last to finish saw every trial
    _same_selection_same_value(study)
    published = study.user_attrs["autodac:best_plan"]
    assert published["value"] == max(_finished(study).values())  # the study keeps the best plan of all workers

    joined = _optimize(work, url, name, 1)  # a later worker returns the best plan of all of them
    assert len(joined.trials) == 11 and _states(study) == {"COMPLETE": 11}
    best = max(joined.trials, key=lambda t: (t.value, -t.number))
    assert best.value == max(_finished(study).values())
    assert joined.flops == joined.original_flops - sum(c.flops_before for c in joined.plan.layers.values()) + best.cost
    assert any(f"study {name!r}: 11 finished trials from all workers, 1 run by this one" in n for n in joined.plan.notes)


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_worker_loses_nothing_but_its_running_trial(kind: str, work: dict[str, Any]) -> None:
    url, name = _storage(kind, work["dir"]), f"killed-{uuid.uuid4().hex[:8]}"
    worker = _worker(work, url, name, 10_000)
    deadline = time.monotonic() + 120
    storage = shared_storage.open_storage(url)
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            if name in optuna.study.get_all_study_names(storage) and len(_finished(_study(url, name))) >= 4:
                time.sleep(random.Random(kind).uniform(0.0, 0.3))  # not always just after a trial ended
                break
            time.sleep(0.2)
        assert worker.poll() is None, worker.communicate()[1]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate()
    study = _study(url, name)
    before = _finished(study)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(before) >= 4 and len(running) <= 1
    if running and "worker" not in running[0].user_attrs:  # killed in the milliseconds before it marked its trial:
        time.sleep(2.5)  # that trial is failed once it is older than the grace period (60 s; 2 s here)
    running = [t.number for t in running]

    # a trial marked by a process of this machine that is gone is failed at once, not after the grace period
    resumed = _optimize(work, shared_storage.open_storage(url, heartbeat_interval=1, grace_period=2), name, 3)
    after = _finished(study)
    assert {n: after[n] for n in before} == before  # every finished trial kept, unchanged
    assert len(after) == len(before) + 3 and len(resumed.trials) == len(after)
    assert set(_states(study)) <= {"COMPLETE", "FAIL"}  # nothing left RUNNING (or WAITING) to block the search
    for number in running:  # the dead worker's trial failed, and its parameters run again
        assert study.trials[number].state == TrialState.FAIL
        retried = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == number]
        assert [t.state for t in retried] == [TrialState.COMPLETE]
        assert study.trials[number].params.items() <= retried[0].params.items()  # what it had drawn before it died
    _same_selection_same_value(study)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_heartbeat_stopped_is_failed_and_retried(kind: str, tmp_path: Path) -> None:
    """A worker on another machine cannot be asked whether it is alive: its trial goes stale when its heartbeats stop."""
    storage = shared_storage.open_storage(_storage(kind, tmp_path), heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="beats")
    trial = study.ask({"w0": optuna.distributions.FloatDistribution(0.25, 4.0, log=True)})
    trial.set_user_attr("worker", {"id": "elsewhere/boot:1", "trial": trial.number})  # not this machine: no process to ask
    study._storage.record_heartbeat(trial._trial_id)
    assert shared_storage.fail_dead_trials(study) == 0 and _states(study) == {"RUNNING": 1}
    time.sleep(3.2)
    shared_storage.fail_dead_trials(study)
    assert _states(study) == {"FAIL": 1, "WAITING": 1}
    assert study.get_trials(states=(TrialState.WAITING,))[0].params == trial.params


# ----------------------------------------------------------------------------- one study, one search


@pytest.fixture
def started(work: dict[str, Any]) -> dict[str, Any]:
    """A SQLite study one worker has searched (4 trials)."""
    url = _storage("sqlite", work["dir"])
    result = _optimize(work, url, "search", 4)
    return {**work, "url": url, "name": "search", "first": result}


@pytest.mark.parametrize("change, field", [
    ({"flops_budget": 0.4}, "flops_budget"),
    ({"model": "other"}, "model"),
    ({"data": "other"}, "probe"),
    ({"methods": ("dac",)}, "methods"),
    ({"pareto": True}, "pareto"),
])
def test_a_worker_made_for_something_else_is_refused(started: dict[str, Any], change: dict[str, Any], field: str) -> None:
    first = started["first"]
    stored = _study(started["url"], started["name"]).user_attrs["autodac:fingerprint"][field]
    options: dict[str, Any] = {"data": started["data"], "n_trials": 1, "progress": False, "storage": started["url"],
                               "study_name": started["name"]}
    budget = change.pop("flops_budget", BUDGET)
    model = _model(seed=1) if change.pop("model", None) else started["model"]
    if change.pop("data", None):
        options["data"] = [_probe(model, seed=23)]
    options.update(change)
    with pytest.raises(autodac.AutodacError, match=f"but {field} differs: the study has {field}=") as refused:
        autodac.optimize(model, budget, **options)
    assert repr(stored) in str(refused.value)
    assert len(_finished(_study(started["url"], started["name"]))) == len(first.trials)  # nothing was added


def test_a_file_that_is_not_a_journal_is_refused_naming_the_line(tmp_path: Path) -> None:
    journal = tmp_path / "search.journal"
    journal.write_text('{"op_code": 0}\nthis is not an optuna journal\n')
    with pytest.raises(autodac.AutodacError, match=r"must hold an Optuna journal .* but line 2 of .* is b'this is not an optuna journal'"):
        shared_storage.open_storage(str(journal))


def test_a_study_made_by_other_code_is_refused_not_taken_over(work: dict[str, Any]) -> None:
    url = f"sqlite:///{work['dir']}/shared.db"
    own = optuna.create_study(storage=url, study_name="exp", direction="minimize")  # the user's own experiment
    own.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    optuna.create_study(storage=url, study_name="empty-min", direction="minimize")
    for name, trials in (("exp", 3), ("empty-min", 0)):
        with pytest.raises(autodac.AutodacError, match=rf"study '{name}' in this storage was made by other code \({trials} trial"):
            _optimize(work, url, name, 2)
    assert not _study(url, "exp").user_attrs and len(_study(url, "exp").trials) == 3  # nothing written into it


def test_reading_plans_from_a_storage_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    for storage, name in ((f"sqlite:///{tmp_path}/typo.db", "typo.db"), (str(tmp_path / "typo.journal"), "typo.journal")):
        with pytest.raises(autodac.AutodacError, match=rf"a storage to read plans from must exist, but '.*{name}' does not"):
            shared_storage.study_plans(storage, "s")
    assert not list(tmp_path.iterdir())


def test_widths_off_is_another_search_and_the_order_of_methods_is_not(started: dict[str, Any]) -> None:
    """A worker without widths would read a profile measured over other options (it crashed on a missing key); the
    methods are a set (the same plans in any order)."""
    options: dict[str, Any] = {"data": started["data"], "n_trials": 1, "progress": False, "storage": started["url"],
                               "study_name": started["name"]}
    with pytest.raises(autodac.AutodacError, match=r"but widths differs: the study has widths at its default \(not recorded\), "
                                                   r"this call widths=False"):
        autodac.optimize(started["model"], BUDGET, widths=False, **options)
    joined = autodac.optimize(started["model"], BUDGET, methods=("lowrank", "spatial", "dac"), **options)
    assert len(joined.trials) == len(started["first"].trials) + 1


def test_the_command_line_worker_is_refused_on_one_line(started: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    code = main(["worker", "--storage", started["url"], "--study", started["name"], started["model_file"], "--flops-budget", "0.3",
                 "--data", started["probe_file"], "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("autodac: error: every worker of study 'search' must plan for what the study was made for, but flops_budget differs")


def test_a_joining_worker_reads_the_shared_pieces_and_repeats_no_finished_plan(started: dict[str, Any], monkeypatch) -> None:
    study = _study(started["url"], started["name"])
    assert {"autodac:fingerprint", "autodac:profile", "autodac:use_bn", "autodac:best_plan"} <= set(study.user_attrs)

    def measure_again(*args: Any, **kwargs: Any):
        raise AssertionError("the profile must be read from the study, not measured again")

    monkeypatch.setattr("autodac.api.measure_profile", measure_again)
    second = _optimize(started, started["url"], started["name"], 4)
    assert second.profile.losses == started["first"].profile.losses
    assert len(second.trials) == 8
    by_selection: dict[tuple[int, ...], list[optuna.trial.FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        by_selection.setdefault(tuple(trial.user_attrs["selection"]), []).append(trial)
    for trials in by_selection.values():  # each plan evaluated once, by whoever met it first; read back after that
        assert [t.user_attrs["reused"] for t in trials] == [False] + [True] * (len(trials) - 1)
        assert len({t.value for t in trials}) == 1


def test_a_latency_table_is_kept_per_device(tmp_path: Path) -> None:
    record = shared_storage.fingerprint(_model(), [], {"flops_budget": 0.5})
    search = shared_storage.SharedSearch(_storage("journal", tmp_path), "latency", record, ["maximize"])
    table = LatencyTable(torch.device("cpu"), 2.5e-3, [[1e-3, 4e-4], [2e-4, 1.5e-4, 1e-4]], [["", "grouped"], ["", "", ""]])
    calls = []
    measure = lambda: calls.append(1) or table  # noqa: E731
    assert search.latency(torch.device("cpu"), measure) == table
    joined = shared_storage.SharedSearch(_storage("journal", tmp_path), "latency", record, ["maximize"])
    assert joined.latency(torch.device("cpu"), measure) == table and calls == [1]  # measured once, read back after
    keys = [k for k in joined.study.user_attrs if k.startswith("autodac:latency:")]
    assert len(keys) == 1 and joined.study.user_attrs[keys[0]]["device"].startswith("cpu|")


def test_compare_reads_the_best_plan_from_the_study(started: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    plan_file = started["dir"] / "plan.json"
    started["first"].plan.save(plan_file)
    code = main(["compare", str(plan_file), "--storage", started["url"], "--study", started["name"], "--format", "json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["columns"] == ["plan", "search"]
    assert payload["totals"]["search"]["flops_ratio"] == started["first"].plan.flops_ratio
    clash = started["dir"] / "search.json"  # a file titled like the study's plan: both columns stay, numbered
    started["first"].plan.save(clash)
    assert main(["compare", str(clash), "--storage", started["url"], "--study", started["name"], "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["columns"] == ["search (1)", "search (2)"] and list(payload["totals"]) == payload["columns"]
    assert main(["compare", "--storage", started["url"], "--study", "nothing-here"]) == 1
    assert "must name a study in the storage ('search'), but got 'nothing-here'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the in-memory default


def test_the_in_memory_default_is_unchanged_and_seeded(work: dict[str, Any]) -> None:
    options = {"data": work["data"], "n_trials": 4, "progress": False, "probe_size": 64, "profile_size": 16, "profile_points": 2}
    first = autodac.optimize(work["model"], BUDGET, **options)
    second = autodac.optimize(work["model"], BUDGET, storage=None, study_name=None, **options)
    assert second.trials == first.trials and [t.number for t in first.trials] == [0, 1, 2, 3]
    assert second.plan.to_dict() == first.plan.to_dict()
    assert not any("study" in note for note in first.plan.notes)


@pytest.mark.parametrize("options, message", [
    ({"study_name": "x"}, "`storage` must be given too, but got storage=None"),
    ({"storage": "sqlite:///x.db"}, "`study_name` must be given with `storage`, but got study_name=None"),
    ({"storage": "search.txt", "study_name": "x"}, "or a journal file ending in .journal or .log, but got storage='search.txt'"),
    ({"storage": "nowhere/search.journal", "study_name": "x"}, "must be in an existing folder, but 'nowhere' does not exist"),
])
def test_storage_arguments_are_checked(work: dict[str, Any], options: dict[str, Any], message: str) -> None:
    with pytest.raises(autodac.AutodacError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        autodac.optimize(work["model"], BUDGET, data=work["data"], n_trials=1, progress=False, **options)


def test_data_free_planning_has_no_search_to_share(work: dict[str, Any]) -> None:
    with pytest.raises(autodac.AutodacError, match="runs only with `data`, `synthesize` or `evaluate`"):
        autodac.optimize(work["model"], BUDGET, example_inputs=torch.zeros(1, 3, 8, 8), storage=str(work["dir"] / "s.journal"),
                         study_name="x")


def test_a_worker_naming_the_methods_in_another_order_joins_the_study(started: dict[str, Any]) -> None:
    # the methods are a set: a second worker listing them otherwise measured other profile options and died on a KeyError
    result = autodac.optimize(started["model"], BUDGET, data=started["data"], n_trials=1, progress=False, storage=started["url"],
                              study_name=started["name"], methods=("lowrank", "spatial", "dac"))
    assert result.flops_ratio <= BUDGET
    assert autodac.FitOptions(methods=["lowrank", "dac", "lowrank"]).methods == ("dac", "lowrank")
