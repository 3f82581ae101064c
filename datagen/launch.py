"""Who am I in the job, and how many workers does this machine run.

A process's place comes from the config (`worker.rank`, `worker.count`) or, when those are null, from the
launcher's environment: torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (an array job's
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, times its tasks SLURM_PROCID / SLURM_NTASKS). Each such
process then runs `devices` local workers, one per GPU by default, so one command uses a whole machine:
process p of P running G local workers makes workers p*G ... p*G+G-1 of P*G. Workers never talk to each
other; the shard split and the manifest are all they share.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from datagen import job
from datagen.runtime import ModelUnavailableError
from datagen.directions import BankError
from datagen.verify import verify_run

class WorkerFailed(RuntimeError):
    """A local worker process died; its shards in progress are redone by a rerun."""


# Errors whose message is the whole story: shown as one line, never as a stack trace.
USER_ERRORS = (job.ConfigError, BankError, ModelUnavailableError)


@dataclass(frozen=True)
class LauncherPlace:
    rank: int
    count: int
    local_rank: int | None  # the launcher started one process per GPU: this process's GPU


@dataclass(frozen=True)
class WorkerSlot:
    rank: int
    count: int
    device: str


def launcher_place(env: Mapping[str, str]) -> LauncherPlace:
    """This process's rank among the processes a launcher started (0 of 1 without one)."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun: one process per GPU
        return LauncherPlace(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env or "SLURM_ARRAY_TASK_ID" in env:
        tasks, task = int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_PROCID", 0))
        array_index = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        array_count = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
        # srun with several tasks per node gives each task its own GPU; with one task per node, we spread.
        per_gpu = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]) > 1
        local = int(env.get("SLURM_LOCALID", 0)) if per_gpu else None
        return LauncherPlace(array_index * tasks + task, array_count * tasks, local)
    return LauncherPlace(0, 1, None)


def worker_slots(worker: Mapping, devices: int | str, device: str, env: Mapping[str, str],
                 num_gpus: int) -> list[WorkerSlot]:
    """The workers this process runs. `devices`: a count, or `auto`: one per visible GPU, unless the launcher
    already gave this process its GPU or the workers run on one named device (cpu, cuda:N)."""
    if (worker["rank"] is None) != (worker["count"] is None):
        raise job.ConfigError("set both worker.rank and worker.count, or neither (then the launcher's environment decides)")
    place = launcher_place(env)
    if worker["rank"] is not None:  # the config wins over the environment (e.g. a Hydra sweep over worker.rank)
        place = LauncherPlace(worker["rank"], worker["count"], None)
    if not 0 <= place.rank < place.count:
        raise job.ConfigError(f"worker.rank must be in [0, worker.count), got rank={place.rank}, count={place.count}")
    spread = device in ("auto", "cuda") and num_gpus > 0  # each local worker on its own GPU
    if devices == "auto":
        local = num_gpus if spread and place.local_rank is None else 1
    elif isinstance(devices, int) and devices > 0:
        local = devices
    else:
        raise job.ConfigError(f"devices must be a positive count or 'auto', got {devices!r}")
    slots = []
    for g in range(local):
        gpu = place.local_rank if place.local_rank is not None else g
        where = f"cuda:{gpu % num_gpus}" if spread else ("cpu" if device == "auto" else device)
        slots.append(WorkerSlot(place.rank * local + g, place.count * local, where))
    return slots


def run_local(cfg: DictConfig, slot: WorkerSlot, position: int, cpu_threads: int) -> None:
    if slot.device == "cpu":
        torch.set_num_threads(cpu_threads)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.worker.rank, cfg.worker.count, cfg.device = slot.rank, slot.count, slot.device
    job.run(cfg, position)


def _child(container: dict, slot: WorkerSlot, position: int, cpu_threads: int) -> None:
    """Entry point of a local worker process: its own log, and user errors as one line."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run_local(OmegaConf.create(container), slot, position, cpu_threads)
    except USER_ERRORS as error:
        print(f"error: worker {slot.rank}: {error}", file=sys.stderr)
        sys.exit(2)


def run_workers(cfg: DictConfig, env: Mapping[str, str] | None = None) -> job.Summary:
    """Run this process's share of the job (several local workers in child processes) and summarize the job.
    Config errors are raised here, before any model loads or any process starts."""
    slots = worker_slots(cfg.worker, cfg.devices, cfg.device, os.environ if env is None else env,
                         torch.cuda.device_count())
    out_dir = Path(cfg.out_dir)
    job.claim_out_dir(job.plan_job(cfg), out_dir)
    cpu_threads = cfg.cpu_threads or max(1, (os.cpu_count() or 1) // len(slots))  # local CPU workers share the cores
    if len(slots) == 1:
        run_local(cfg, slots[0], 0, cpu_threads)
    else:
        # Workers never fork this process: CUDA, or autograd's threads once anything here started them (torch.export
        # does), break in a forked child. They fork from a fresh server that imported the job's modules once.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["datagen.job"])
        container = OmegaConf.to_container(cfg, resolve=True)
        processes = [context.Process(target=_child, args=(container, slot, g, cpu_threads), name=f"worker-{slot.rank}")
                     for g, slot in enumerate(slots)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [f"worker {slot.rank} (exit code {p.exitcode})" for slot, p in zip(slots, processes) if p.exitcode]
        if failed:
            raise WorkerFailed(f"{', '.join(failed)} failed; its log says why. Rerun the same command to redo "
                               "only the unfinished shards")
    return job.summarize(out_dir)


def main(cfg: DictConfig) -> int:
    """generate.py's body: run (or verify) and report; user errors are one line and exit code 2."""
    try:
        if cfg.verify:
            report = verify_run(Path(cfg.out_dir))
            print(report.text())
            return 0 if report.ok else 1
        summary = run_workers(cfg)
    except (*USER_ERRORS, WorkerFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.table())
    return 0
