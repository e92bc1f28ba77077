"""Data-parallel training over several processes: GPUs on one or several machines, or CPU processes.

The engine is PyTorch's DistributedDataParallel as fastai drives it (`fastai.distributed`, which wraps the model
through Hugging Face Accelerate): every process holds a copy of the model, trains on its own share of each epoch's
shuffled training items, and DDP averages the gradients before every optimizer step, so all copies stay equal.
Two things in fastai 2.8's version assume CUDA; `ShardedDL` and `DataParallelTrainer` below fix them so the same
code runs on CPU processes (Gloo) as on GPUs (NCCL).

Processes are described by the environment variables torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR`, `MASTER_PORT`); `launch_training` starts them on one machine for `cxrfast train --distributed`.
Rank 0 is the only process that writes: the run folder, checkpoints, history and bundle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

from cxr_fast.errors import CxrFastError, storage_problem


def world_size() -> int:
    """Number of training processes, all machines together (1 when not launched by torchrun/launch_training)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def backend() -> str:
    """NCCL between GPUs, Gloo between CPU processes."""
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group():
    """Join the process group the environment describes (a no-op in a single process); leave it afterwards.

    Nested use is fine: only the outermost call that actually joined leaves.
    """
    joined = False
    if is_distributed() and not dist.is_initialized():
        if torch.cuda.is_available():
            if "LOCAL_RANK" not in os.environ:  # Accelerate would then not wrap the model: no gradient averaging
                raise CxrFastError("WORLD_SIZE is set but LOCAL_RANK is not: start the processes with torchrun, or "
                                   "set LOCAL_RANK (the GPU index on its machine) for every process")
            # one GPU per process; set before fastai picks its default device for the model and the batches
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend())
        joined = True
    try:
        yield
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    if is_distributed() and dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; Gloo moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_bytes(payload: bytes) -> bytes:
    """Rank 0's bytes on every rank (length first, so the receivers can size their buffer)."""
    device = _comm_device()
    length = torch.tensor([len(payload)], dtype=torch.long, device=device)
    dist.broadcast(length, 0)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if is_main():
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist())


def on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and give every rank its JSON-able result.

    A CxrFastError on rank 0 is raised on every rank, so no process is left waiting for the others. JSON, not
    pickle, crosses between processes.
    """
    if not is_distributed():
        return fn()
    reply: dict[str, Any] = {}
    if is_main():
        try:
            reply = {"value": fn()}
        except CxrFastError as e:
            reply = {"error": str(e)}
    reply = json.loads(_broadcast_bytes(json.dumps(reply).encode()))
    if "error" in reply:
        raise CxrFastError(reply["error"])
    return reply["value"]


def per_process_config(cfg, n: int | None = None):
    """The config each process builds its DataLoaders with: `bs` is the global batch, shared among processes.

    So a recipe means the same optimisation (batch size, steps per epoch, learning-rate schedule) on any number of
    processes; to use more GPUs for a larger batch, raise --bs.
    """
    n = n or world_size()
    if n == 1:
        return cfg
    if cfg.bs % n:
        raise CxrFastError(f"--bs {cfg.bs} must be a multiple of the {n} processes (each takes bs/{n} images a step)")
    return dataclasses.replace(cfg, bs=cfg.bs // n)


# ---------------------------------------------------------------------------------------------- fastai pieces


def _fastai_distributed():
    try:
        import fastai.distributed as fd
    except (ImportError, NameError):  # fastai.distributed fails with a NameError when accelerate is missing
        raise CxrFastError("distributed training needs Hugging Face Accelerate: pip install accelerate") from None
    return fd


@functools.cache
def fastai_pieces() -> SimpleNamespace:
    """`ShardedDL` and `DataParallelTrainer`, built on first use so that importing cxr_fast needs no Accelerate."""
    fd = _fastai_distributed()

    class ShardedDL(fd.DistributedDL):
        """fastai's DistributedDL: rank 0 shuffles, every rank takes its contiguous 1/N of the epoch's indices
        (padded by repeating the first ones when N does not divide them), and gathered predictions are un-padded
        so metrics cover each valid item exactly once.

        fastai broadcasts the shuffled indices as a CUDA tensor; here they travel on the backend's device.
        `shard` and `items_seen()` record what this process was given and iterated, for checks and debugging.
        """

        def _broadcast(self, t, rank):
            t = torch.tensor(t, dtype=torch.long, device=_comm_device())
            dist.broadcast(t, rank)
            return t.cpu().tolist()

        def get_idxs(self):
            self.shard = super().get_idxs()
            return self.shard

        def items_seen(self) -> list[int]:
            """Dataset indices of this epoch's items on this process so far (the dropped last partial batch of a
            training epoch excluded)."""
            return list(getattr(self, "shard", []))[: getattr(self, "i", 0)]

    class DataParallelTrainer(fd.DistributedTrainer):
        """fastai's DistributedTrainer (DDP through Accelerate) with ShardedDL, SyncBatchNorm only on GPUs (PyTorch
        has none for CPU; DDP then keeps rank 0's BatchNorm statistics, the ones rank 0 saves), and a different
        augmentation stream on every rank, as a single process would draw for different batches."""

        def __init__(self):
            cuda = torch.cuda.is_available()
            super().__init__(sync_bn=cuda, cpu=not cuda)

        def _wrap_dl(self, dl):
            return dl if isinstance(dl, fd.DistributedDL) else ShardedDL(dl, device=self.learn.model.device)

        def before_fit(self):
            super().before_fit()
            if not isinstance(self.learn.model, torch.nn.parallel.DistributedDataParallel):
                # Accelerate decides from the environment; training unwrapped would silently not average gradients
                raise RuntimeError(f"Accelerate did not wrap the model for {world_size()} processes "
                                   f"(RANK={rank()}, LOCAL_RANK={os.environ.get('LOCAL_RANK')})")
            if rank():
                torch.manual_seed(torch.initial_seed() + rank())

    return SimpleNamespace(ShardedDL=ShardedDL, DataParallelTrainer=DataParallelTrainer)


def to_data_parallel(learn):
    """From now on `learn.fit*` trains data-parallel over the process group; a no-op in a single process.

    Like fastai's `Learner.to_distributed`, whose trainer it adapts: the trainer wraps the model and DataLoaders at
    the start of every fit and unwraps them at its end, so between fits `learn.model` is the plain model.
    """
    if not is_distributed():
        return learn
    learn.add_cb(fastai_pieces().DataParallelTrainer())  # cxr_fast.train leaves the progress display to rank 0
    return learn


# ---------------------------------------------------------------------------------------------- launching


def default_nproc() -> int:
    """One process per GPU; two CPU processes without GPUs."""
    return torch.cuda.device_count() or 2


def _train_worker(data, cfg, out, resume, extra_cbs, quiet, notebook: bool = False) -> str:
    from cxr_fast.memory import keep_freed_memory_as_parent_did
    from cxr_fast.train import train

    keep_freed_memory_as_parent_did()
    if notebook:
        # A Jupyter kernel sets FORCE_COLOR and CLICOLOR_FORCE, which rich ignores inside the kernel because it knows
        # it is in a notebook. This process is no notebook: rich took them to mean a terminal and drew its bars as
        # escape codes into the kernel's output. Without them it sees the pipe it writes to and prints plain lines.
        for name in ("FORCE_COLOR", "CLICOLOR_FORCE"):
            os.environ.pop(name, None)
    try:
        return str(train(data, cfg, out=out, resume=resume, extra_cbs=extra_cbs, quiet=quiet))
    except CxrFastError as e:  # a subclass (ImageReadError) too: the parent finds the message by this class's name
        raise CxrFastError(str(e)) from None
    except OSError as e:  # a full disk or a read-only folder: one line, as without --distributed
        if storage_problem(e) is None:
            raise
        raise CxrFastError(storage_problem(e)) from None


def launch_training(nproc: int, data: str | Path, cfg=None, *, out: str | Path | None = None, resume: bool = False,
                    extra_cbs: list | None = None, quiet: bool = False) -> Path:
    """Start `nproc` training processes on this machine (torchrun's standalone mode) and return rank 0's run folder.

    Each process gets `OMP_NUM_THREADS` = cores / nproc unless already set, so CPU processes do not fight over
    cores. A CxrFastError in any process comes back as a CxrFastError here; other failures keep torch's report.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise CxrFastError(f"--nproc must be at least 1, got {nproc}")
    if is_distributed():
        raise CxrFastError("already inside a distributed launch (torchrun): drop --distributed/--nproc")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nproc > gpus > 0:  # each process takes the GPU of its LOCAL_RANK: a second one on one GPU has none to take
        raise CxrFastError(f"--nproc {nproc} but this machine has {gpus} GPU{'s' if gpus > 1 else ''}, one per process: "
                           f"use --nproc {gpus}, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train {nproc} CPU processes")
    # mistakes that would fail in every process fail here, before any process starts
    fastai_pieces()
    if cfg is not None:
        per_process_config(cfg, nproc)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"cxrfast-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    if saved_threads is None and not torch.cuda.is_available():
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # torch's launcher sets handlers for these signals and leaves them: in a notebook, the stop button then raised
    # its SignalException instead of KeyboardInterrupt in every later cell (and in a plain train(), no resume hint)
    handled = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)]
    saved_handlers = {sig: signal.getsignal(sig) for sig in handled} if threading.current_thread() is threading.main_thread() else {}
    try:
        with _quiet_launcher_logs():
            results = elastic_launch(config, _train_worker)(str(data), cfg, None if out is None else str(out),
                                                            resume, extra_cbs, quiet, Console().is_jupyter)
    except SignalException as e:
        if e.sigval != signal.SIGINT:
            raise
        raise KeyboardInterrupt(_interrupted(out, data, nproc)) from None  # Ctrl-C: one line, as without --distributed
    except ChildFailedError as e:
        message = e.get_first_failure()[1].message  # from the worker's error file: a dict, or text
        message = message.get("message", "") if isinstance(message, dict) else str(message)
        user_error = user_error_in(message) or user_error_in(str(e))
        if user_error:
            raise CxrFastError(user_error) from None
        raise
    finally:
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    return Path(results[0])


def _interrupted(out, data, nproc: int) -> str:
    """What a Ctrl-C of a data-parallel run kept, and the command that continues it (the launcher's own report is a
    traceback ending in SignalException)."""
    from cxr_fast.train import CHECKPOINT_DIR, resume_command

    if out is not None and (Path(out) / CHECKPOINT_DIR / "state.json").is_file():
        return (f"training interrupted; {out} holds the finished epochs; continue with: "
                f"{resume_command(Path(out), data)} --distributed --nproc {nproc}")
    return "training interrupted"


def user_error_in(report: str) -> str | None:
    """The message of the CxrFastError at the end of a worker's failure report, if that is how it failed."""
    found = re.findall(r"^\s*(?:[\w.]+\.)?CxrFastError: (.+)$", report, flags=re.MULTILINE)
    return found[-1] if found else None


@contextmanager
def _quiet_launcher_logs():
    """torch's launcher logs every worker's traceback; a user mistake should read as one line, and a bug still
    shows its traceback in the ChildFailedError."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]
    saved = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(loggers, saved):
            log.setLevel(level)


__all__ = ["backend", "barrier", "default_nproc", "fastai_pieces", "is_distributed", "is_main", "launch_training",
           "on_main", "per_process_config", "process_group", "rank", "to_data_parallel", "world_size"]
