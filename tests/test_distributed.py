"""Data-parallel training with 2 CPU processes (Gloo) on tiny synthetic data: sharding, whole-split validation,
one writer, resume.

Each launch starts two fresh Python processes, and importing torch and fastai dominates its time (15-40 s on 2
cores), so all checks share one run: killed after its first epoch, then resumed; the first epoch is a fresh run's.
"""

import errno
import importlib.util
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from sklearn.metrics import balanced_accuracy_score

from cxr_fast import distributed
from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.compare import compare_archs
from cxr_fast.config import resolve_config
from cxr_fast.data.io import ImageReadError
from cxr_fast.data.manifest import read_manifest
from cxr_fast.errors import CxrFastError
from tests.conftest import TINY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="this torch build has no Gloo backend"),
]

# fastai's distributed module needs Accelerate: a user's machine may lack it, CI (CI=true) must have it
if importlib.util.find_spec("accelerate") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI=true but accelerate is not installed: tests/test_distributed.py cannot run")
    pytest.skip("accelerate not installed (pip install accelerate)", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def cpu_processes():
    """These are tests of CPU processes over Gloo. On a machine with a GPU, the launched processes would take NCCL
    and a GPU each (and two processes are refused on one GPU): the GPUs are hidden from them and from this one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")  # the launched processes are started afresh (spawn) and read it
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(torch.cuda, "device_count", lambda: 0)
        yield


class RecordRank(Callback):
    """Writes what this process trained and validated on, one JSON file per rank and epoch.

    Runs in the worker processes (pickled to them by the launcher), so it reports through files.
    """

    order = 55  # after the Recorder has the epoch's metrics

    def __init__(self, folder):
        self.folder = str(folder)

    def after_train(self):
        dl = self.learn.dl
        items = dl.dataset.items["image"]
        self.record = {"shard": items.iloc[dl.shard].tolist(), "seen": items.iloc[dl.items_seen()].tolist(),
                       "callbacks": [type(cb).__name__ for cb in self.learn.cbs], "seed": torch.initial_seed()}

    def after_validate(self):
        metric = next(m for m in self.learn.metrics if m.name == "balanced_accuracy")
        self.record.update(valid_targets=torch.cat(metric.targs).tolist(), valid_preds=torch.cat(metric.preds).tolist())
        path = Path(self.folder) / f"rank{distributed.rank()}-epoch{self.epoch}.json"
        path.write_text(json.dumps(self.record))


class SimulatedKill(Exception):
    pass


class KillAfterFirstEpoch(Callback):
    order = 60  # after rank 0's RunRecorder has written the checkpoint

    def after_epoch(self):
        if self.epoch == 0:
            distributed.barrier()  # no rank dies before rank 0's checkpoint is on disk
            raise SimulatedKill("simulated kill")


def _records(folder: Path, epoch: int) -> list[dict]:
    return [json.loads((folder / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def odd_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data less one train and one valid image: 17 and 5 items, which 2 processes can only share by padding."""
    manifest = read_manifest(tiny_data)  # absolute paths, so the copy works from another folder
    drop = [manifest.index[manifest["split"] == split][0] for split in ("train", "valid")]
    folder = tmp_path_factory.mktemp("odd")
    manifest.drop(drop).to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def resumed_run(odd_data, tmp_path_factory):
    """A 2-epoch, 2-process run killed after epoch 0, then resumed with --resume (two launches in all)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    root = tmp_path_factory.mktemp("ddp")
    out, records = root / "run", root / "records"
    records.mkdir()
    handlers = [{sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}]
    with pytest.raises(ChildFailedError, match="simulated kill"):
        distributed.launch_training(2, odd_data, resolve_config(epochs=2, **TINY), out=out, quiet=True,
                                    extra_cbs=[RecordRank(records), KillAfterFirstEpoch()])
    killed_state = json.loads((out / "checkpoint" / "state.json").read_text())
    killed_files = {p.name for p in out.iterdir()}
    (records / "resumed").mkdir()
    run = distributed.launch_training(2, odd_data, out=out, resume=True,  # not quiet: who shows progress is tested
                                      extra_cbs=[RecordRank(records / "resumed")])
    handlers.append({sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)})
    return run, records, killed_state, killed_files, handlers


def test_the_launches_leave_this_process_signal_handlers_as_they_were(resumed_run):
    # torch's launcher left its own: a notebook's stop button then raised SignalException in every later cell
    before, after = resumed_run[-1]
    assert after == before and before[signal.SIGINT] is signal.default_int_handler


def test_a_killed_run_resumes_with_an_unbroken_history(resumed_run):
    run, records, killed_state, killed_files, _ = resumed_run
    assert killed_state["epochs_done"] == 1 and [row["epoch"] for row in killed_state["history"]] == [0]
    # each process has random generators of its own: rank 0's are not saved for all (a single process's would be)
    assert "rng" not in killed_state
    assert "checkpoint" in killed_files and "config.json" not in killed_files
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0, 1]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert json.loads((run / "metrics.json").read_text())["processes"] == 2
    assert not list((records / "resumed").glob("*epoch0.json")), "the resumed run skips the finished epoch"


def test_one_complete_bundle_written_by_rank_0_only(resumed_run):
    run, records, _, _, _ = resumed_run
    assert {p.name for p in run.iterdir()} == {"model.safetensors", "config.json", "recipe.yaml", "history.csv",
                                                "curves.png", "metrics.json", "seen_images.safetensors"}
    assert load_run(run).config["model"]["arch"] == "cxresnet_tiny"
    for rank0, rank1 in (_records(records, 0), _records(records / "resumed", 1)):
        assert "RunRecorder" in rank0["callbacks"] and "RunRecorder" not in rank1["callbacks"]
    # one epoch table, rank 0's: as plain lines, since the workers' stdout is not a terminal
    rank0, rank1 = _records(records / "resumed", 1)
    assert "EpochLines" in rank0["callbacks"] and "ProgressCallback" not in rank0["callbacks"]
    assert not {"EpochLines", "ProgressCallback"} & set(rank1["callbacks"])


def test_each_process_trains_on_its_own_half(resumed_run, odd_data):
    _, records, _, _, _ = resumed_run
    manifest = read_manifest(odd_data)
    train_paths = set(manifest.loc[manifest["split"] == "train", "path"])
    assert len(train_paths) == 17
    for rank0, rank1 in (_records(records, 0), _records(records / "resumed", 1)):
        # 9 items each: rank 1's ninth repeats rank 0's first, to give both processes the same number of steps
        assert len(rank0["shard"]) == len(rank1["shard"]) == 9
        assert set(rank0["shard"]) | set(rank1["shard"]) == train_paths
        assert set(rank0["shard"]) & set(rank1["shard"]) == {rank1["shard"][-1]} == {rank0["shard"][0]}
        # TINY's bs 16 is the global batch: 8 a process, one full batch from each half (the partial one is dropped)
        assert rank0["seen"] == rank0["shard"][:8] and rank1["seen"] == rank1["shard"][:8]
        assert set(rank0["seen"]).isdisjoint(rank1["seen"])


def test_validation_covers_the_whole_valid_split_and_matches_the_saved_model(resumed_run, odd_data):
    run_dir, records, _, _, _ = resumed_run
    manifest = read_manifest(odd_data)
    valid = manifest[manifest["split"] == "valid"].reset_index(drop=True)
    assert len(valid) == 5  # shards of 3 and 3: the second ends with a repeat of the first item
    run = load_run(run_dir)
    y = valid["label"].map({c: i for i, c in enumerate(run.classes)}).to_numpy()
    logits = predict_logits(run, valid, progress=False)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert abs(metrics["valid_balanced_accuracy"] - balanced_accuracy_score(y, logits.argmax(1))) <= 1e-6
    assert abs(metrics["valid_accuracy"] - (logits.argmax(1) == y).mean()) <= 1e-6
    # The loss is fastai's mean of per-process batch means, so the padding item counts twice (documented). Being
    # continuous, it shows that both processes validated with the saved weights and BatchNorm statistics.
    losses = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(y), reduction="none").numpy()
    assert metrics["valid_loss"] == pytest.approx((losses.sum() + losses[0]) / 6, abs=1e-5)

    # on every rank the metric saw each valid item once (gathered from both), with the saved model's predictions
    best = metrics["best_epoch"]
    expected = Counter(zip(logits.argmax(1).tolist(), y.tolist()))
    for record in _records(records if best == 0 else records / "resumed", best):
        assert len(record["valid_targets"]) == len(valid)
        assert Counter(zip(record["valid_preds"], record["valid_targets"])) == expected


def test_batch_the_processes_cannot_share_is_refused_before_launch(tiny_data, tmp_path):
    with pytest.raises(CxrFastError, match="multiple of the 2 processes"):
        distributed.launch_training(2, tiny_data, resolve_config(epochs=1, **{**TINY, "bs": 15}), out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_ctrl_c_of_a_data_parallel_run_is_one_line_saying_how_to_resume(tiny_data, tmp_path, monkeypatch):
    # the launcher's SignalException came out as a traceback and exit code 1
    import signal

    import torch.distributed.launcher.api
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def interrupted(config, entrypoint):
        def run(*args):
            (tmp_path / "run" / "checkpoint").mkdir(parents=True)
            (tmp_path / "run" / "checkpoint" / "state.json").write_text("{}")  # an epoch was saved
            raise SignalException("Process 1 got signal: 2", sigval=signal.SIGINT)
        return run

    monkeypatch.setattr(torch.distributed.launcher.api, "elastic_launch", interrupted)
    with pytest.raises(KeyboardInterrupt, match=f"training interrupted; {tmp_path / 'run'} holds the finished epochs; "
                                                f"continue with: .* --resume --distributed --nproc 2"):
        distributed.launch_training(2, tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run")


def test_launched_from_a_notebook_rank_0_prints_plain_lines(tiny_data, tmp_path, monkeypatch, capfd):
    # A Jupyter kernel sets FORCE_COLOR and CLICOLOR_FORCE and captures its output through pipes: the workers' rich
    # bars (calibrating) came out there as escape codes. The kernel is simulated as rich recognises one.
    import builtins

    class ZMQInteractiveShell:
        pass

    monkeypatch.setattr(builtins, "get_ipython", ZMQInteractiveShell, raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("CLICOLOR_FORCE", "1")
    distributed.launch_training(2, tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run")
    out, err = capfd.readouterr()
    assert "\x1b" not in out + err
    lines = out.splitlines()
    assert lines[0].startswith("epoch") and [line.split()[0] for line in lines[1:]] == ["0"]  # rank 0's only
    assert "calibrating on" in err and "done" in err


def test_global_batch_is_shared_among_processes(monkeypatch):
    cfg = resolve_config(epochs=1, **TINY)
    assert distributed.per_process_config(cfg) is cfg
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.per_process_config(cfg).bs == 4 and cfg.bs == 16
    with pytest.raises(CxrFastError, match="multiple of the 4"):
        distributed.per_process_config(resolve_config(epochs=1, **{**TINY, "bs": 6}))


def test_user_error_in_a_worker_report_is_found():
    report = ("Traceback (most recent call last):\n  File \"cxr_fast/train.py\", line 1, in _train\n"
              "cxr_fast.errors.CxrFastError: run: an interrupted run is here; add --resume to continue it\n")
    assert distributed.user_error_in(report) == "run: an interrupted run is here; add --resume to continue it"
    # torch's ChildFailedError report indents the worker's traceback
    indented = "  traceback : Traceback (most recent call last):\n  cxr_fast.errors.CxrFastError: bad 'x'\n"
    assert distributed.user_error_in(indented) == "bad 'x'"
    assert distributed.user_error_in("RuntimeError: NCCL error") is None


def test_compare_trains_its_architectures_one_after_another_distributed(tiny_data, tmp_path):
    result = compare_archs(tiny_data, ["cxresnet_tiny", "convnet"], out=tmp_path / "cmp", quiet=True,
                           size=48, epochs=1, bs=16, nproc=2)
    runs = sorted((tmp_path / "cmp" / "runs").iterdir())
    assert [r.name for r in runs] == ["convnet-seed0", "cxresnet_tiny-seed0"]
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["processes"] == 2
        load_run(run)
    assert sorted(result.summary["arch"]) == ["convnet", "cxresnet_tiny"] and len(result.mcnemar) == 1
    with pytest.raises(CxrFastError, match="multiple of the 2 processes"):  # refused before the first run starts
        compare_archs(tiny_data, ["cxresnet_tiny", "convnet"], out=tmp_path / "cmp2", bs=15, epochs=1, nproc=2)
    assert not (tmp_path / "cmp2").exists()


@pytest.mark.parametrize("raised, message", [
    (ImageReadError("/x/Normal_3.png", "unreadable", "file not found"), "/x/Normal_3.png: file not found"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/r/model.safetensors"), "No space left on device"),
])
def test_a_worker_reports_user_errors_as_the_class_the_launcher_looks_for(monkeypatch, raised, message):
    # an ImageReadError (a CxrFastError subclass) or a full disk in a worker came back as torch's whole report
    import cxr_fast.train

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(cxr_fast.train, "train", failing)
    with pytest.raises(CxrFastError) as e:
        distributed._train_worker("data", None, None, False, None, True)
    assert type(e.value) is CxrFastError and message in str(e.value)
    assert distributed.user_error_in(f"  cxr_fast.errors.CxrFastError: {e.value}\n") == str(e.value)


@pytest.fixture
def launches(monkeypatch):
    """The launcher replaced by a recorder: each launch's config, arguments and OMP_NUM_THREADS, and rank 0's folder."""
    import torch.distributed.launcher.api

    calls = []

    def recording(config, entrypoint):
        def run(*args):
            calls.append({"nproc": config.nproc_per_node, "args": args, "threads": os.environ.get("OMP_NUM_THREADS")})
            return {0: "rank0-run", 1: "rank1-run"}
        return run

    monkeypatch.setattr(torch.distributed.launcher.api, "elastic_launch", recording)
    return calls


def test_the_launch_shares_the_cores_and_refuses_what_would_fail_in_every_process(launches, tiny_data, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = resolve_config(epochs=1, **TINY)
    assert distributed.launch_training(2, tiny_data, cfg, out=tmp_path / "run") == Path("rank0-run")
    assert launches[-1]["nproc"] == 2 and launches[-1]["threads"] == "4"  # 8 cores, 2 processes
    assert launches[-1]["args"][:4] == (str(tiny_data), cfg, str(tmp_path / "run"), False)
    assert "OMP_NUM_THREADS" not in os.environ  # this process's own setting is left as it was
    distributed.launch_training(1, tiny_data, cfg)  # one process is a valid launch
    assert launches[-1]["nproc"] == 1 and launches[-1]["threads"] == "8"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
    distributed.launch_training(2, tiny_data, cfg)
    assert launches[-1]["threads"] == "3"
    # a batch the processes cannot share, no process at all, or a launch inside torchrun: refused before any start
    with pytest.raises(CxrFastError, match="multiple of the 2 processes"):
        distributed.launch_training(2, tiny_data, resolve_config(epochs=1, **{**TINY, "bs": 15}))
    with pytest.raises(CxrFastError, match="--nproc must be at least 1, got 0"):
        distributed.launch_training(0, tiny_data, cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CxrFastError, match="already inside a distributed launch"):
        distributed.launch_training(2, tiny_data, cfg)
    assert len(launches) == 3


def test_more_processes_than_gpus_is_refused_before_any_starts(launches, tiny_data, monkeypatch):
    # each process takes the GPU of its LOCAL_RANK: on an H200 machine the second of two failed with
    # "CUDA error: invalid device ordinal" in torch's multi-page report
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CxrFastError, match=r"^--nproc 2 but this machine has 1 GPU, one per process: use --nproc 1, "
                                           r"or hide the GPUs \(CUDA_VISIBLE_DEVICES=\) to train 2 CPU processes$"):
        distributed.launch_training(2, tiny_data, resolve_config(epochs=1, **TINY))
    assert launches == []
    distributed.launch_training(1, tiny_data, resolve_config(epochs=1, **TINY))
    assert launches[-1]["nproc"] == 1


def test_two_cpu_processes_by_default_and_one_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert distributed.default_nproc() == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert distributed.default_nproc() == 3


def test_a_user_error_in_a_worker_comes_back_as_one_line_and_other_signals_as_they_were(monkeypatch, tiny_data,
                                                                                          tmp_path):
    import signal

    import torch.distributed.launcher.api
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    # what torch's @record writes for a worker that raised CxrFastError
    error_file = tmp_path / "error.json"
    error_file.write_text(json.dumps({"message": {
        "message": "CxrFastError: /data/Normal_3.png: file not found",
        "extraInfo": {"py_callstack": "Traceback …\ncxr_fast.errors.CxrFastError: /data/Normal_3.png: file not found\n",
                      "timestamp": "1700000000"}}}))
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=1, error_file=str(error_file))
    raised = [ChildFailedError("_train_worker", {1: failure}), SignalException("got signal: 15", sigval=signal.SIGTERM)]

    def failing(config, entrypoint):
        def run(*args):
            raise raised.pop(0)
        return run

    monkeypatch.setattr(torch.distributed.launcher.api, "elastic_launch", failing)
    cfg = resolve_config(epochs=1, **TINY)
    with pytest.raises(CxrFastError) as e:
        distributed.launch_training(2, tiny_data, cfg, out=tmp_path / "run")
    assert str(e.value) == "/data/Normal_3.png: file not found"
    try:
        distributed.launch_training(2, tiny_data, cfg, out=tmp_path / "run")
    except BaseException as e:  # noqa: BLE001 - a KeyboardInterrupt here would end the test session
        caught = e
    assert type(caught) is SignalException  # a kill by SIGTERM is not a Ctrl-C


def test_ctrl_c_before_the_first_epoch_was_saved_says_only_that_training_was_interrupted(tiny_data, tmp_path):
    (tmp_path / "run").mkdir()  # made, but no epoch saved: nothing to continue
    assert distributed._interrupted(tmp_path / "run", tiny_data, 2) == "training interrupted"
    assert distributed._interrupted(None, tiny_data, 2) == "training interrupted"


def test_the_user_error_found_is_the_last_one_in_the_report():
    report = ("cxr_fast.errors.CxrFastError: raised first, then handled\n"
              "Traceback (most recent call last):\ncxr_fast.errors.CxrFastError: the one that ended the worker\n")
    assert distributed.user_error_in(report) == "the one that ended the worker"


def test_rank_0_s_value_or_its_one_line_error_reaches_every_rank(monkeypatch):
    # a one-process group standing for rank 0 of two: on_main must broadcast, and raise rank 0's CxrFastError
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert distributed.on_main(lambda: {"run": "models/ü-1", "n": [1, 2]}) == {"run": "models/ü-1", "n": [1, 2]}

        def refuses():
            raise CxrFastError("run: already exists")

        with pytest.raises(CxrFastError, match="^run: already exists$"):
            distributed.on_main(refuses)
    finally:
        dist.destroy_process_group()


def test_each_process_draws_its_own_augmentations(resumed_run):
    # the same seed on both ranks would give both halves of every batch the same random flips, zooms and lighting
    _, records, _, _, _ = resumed_run
    for rank0, rank1 in (_records(records, 0), _records(records / "resumed", 1)):
        assert rank0["seed"] != rank1["seed"]
