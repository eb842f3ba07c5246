"""Process-group lifecycle: who this process is, which device it drives, and a clean start and end.

Three launch modes are recognised from the environment:

* torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
* srun without torchrun: the same values are derived from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
  the first host of SLURM_JOB_NODELIST and a port computed from SLURM_JOB_ID;
* nothing set: one process, no process group.

Timeouts: the group is created with `parallel.init_timeout_s`, which bounds the rendezvous and the first
barrier (a rank that never arrives fails the job within that time instead of the long training timeout).
Once every rank has passed the barrier, the group's timeout is raised to `parallel.train_timeout_s` with
torch's `_set_pg_timeout`, which changes the timeout of the existing gloo and NCCL backends in place; a
public equivalent does not exist, and a second group would double the communicators.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from avflow.config import Config

log = logging.getLogger(__name__)

SLURM_PORT_BASE = 20000  # MASTER_PORT = base + SLURM_JOB_ID % span: jobs sharing a node rarely collide
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; `is_distributed` is False for a plain single process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """Rendezvous values and where they came from ("torchrun", "slurm" or "single"), before any group exists."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list such as `node[01-04,07],gpu-a` (zero padding is kept)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_host(item, nodelist))
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: expected at least one host name")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_host(pattern: str, nodelist: str) -> list[str]:
    """Expand the first bracket group of one host pattern, then the rest recursively."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets in {pattern!r}")
        return [pattern]
    prefix, suffix = pattern[:match.start()], pattern[match.end():]
    hosts = []
    for part in match.group(1).split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: expected numbers or ranges like 01-04 inside "
                             f"brackets, got {part!r}")
        width = len(low)
        for number in range(int(low), int(high if dash else low) + 1):
            hosts.extend(_expand_host(f"{prefix}{number:0{width}d}{suffix}", nodelist))
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """The first host of the node list, via `scontrol show hostnames` when available (it knows every form)."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                    timeout=30)
            names, problem = result.stdout.split(), result.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            names, problem = [], str(error)
        if names:
            return names[0]
        log.warning("scontrol show hostnames %s failed (%s); parsing the node list directly", nodelist, problem)
    return expand_nodelist(nodelist)[0]


def _int_env(env: Mapping[str, str], name: str, source: str) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        raise RuntimeError(f"{source} launch: environment variable {name} is not set; expected an integer")
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"{source} launch: environment variable {name}={raw!r}; expected an integer") from None


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rendezvous values from a torchrun or SLURM environment, checked for consistency."""
    env = os.environ if env is None else env
    torchrun_names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if any(name in env for name in ("RANK", "WORLD_SIZE")):
        missing = [name for name in torchrun_names if not env.get(name)]
        if missing:
            raise RuntimeError(f"torchrun-style launch: RANK or WORLD_SIZE is set but {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} not; expected all of "
                               f"{', '.join(torchrun_names)}")
        launch = LaunchEnv(_int_env(env, "RANK", "torchrun"), _int_env(env, "WORLD_SIZE", "torchrun"),
                           _int_env(env, "LOCAL_RANK", "torchrun"), env["MASTER_ADDR"],
                           _int_env(env, "MASTER_PORT", "torchrun"), "torchrun")
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not env.get("MASTER_ADDR") and not nodelist:
            raise RuntimeError("SLURM launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set; expected one "
                               "to name the rendezvous host")
        if env.get("MASTER_PORT"):
            port = _int_env(env, "MASTER_PORT", "SLURM")
        else:
            port = SLURM_PORT_BASE + _int_env(env, "SLURM_JOB_ID", "SLURM") % SLURM_PORT_SPAN
        master_addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        launch = LaunchEnv(_int_env(env, "SLURM_PROCID", "SLURM"), _int_env(env, "SLURM_NTASKS", "SLURM"),
                           _int_env(env, "SLURM_LOCALID", "SLURM"), master_addr, port, "slurm")
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return LaunchEnv(0, 1, 0, "", 0, "single")
    rank_name, world_name, local_name = names
    if launch.world_size < 1:
        raise RuntimeError(f"{world_name}={launch.world_size}: expected at least 1 process")
    if not 0 <= launch.rank < launch.world_size:
        raise RuntimeError(f"{rank_name}={launch.rank}: expected 0 <= rank < {world_name}={launch.world_size}")
    if not 0 <= launch.local_rank <= launch.rank:
        raise RuntimeError(f"{local_name}={launch.local_rank}: expected 0 <= local rank <= {rank_name}={launch.rank}")
    if not 0 < launch.master_port < 65536:
        raise RuntimeError(f"MASTER_PORT={launch.master_port}: expected a TCP port in 1..65535")
    return launch


def pick_backend(cfg: Config, device: torch.device) -> str:
    """`parallel.backend`, with auto meaning nccl for CUDA devices and gloo for CPU.

    NCCL only reduces CUDA tensors, so a CUDA group also gets gloo for CPU tensors (`cpu:gloo,cuda:nccl`):
    a collective on a host tensor (an object gather, a stray CPU metric) works instead of failing the run.
    """
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError(f"parallel.backend=nccl needs CUDA, but this process trains on {device}; "
                           "expected parallel.backend=gloo or auto")
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def rank_device(cfg: Config, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available and not switched off by trainer.device=cpu, else the CPU."""
    wanted = cfg.trainer.device
    if wanted == "cpu" or not torch.cuda.is_available():
        if wanted == "cuda":
            raise RuntimeError("trainer.device=cuda: no CUDA device is available")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"local rank {local_rank} (LOCAL_RANK or SLURM_LOCALID): expected fewer local ranks "
                           f"than the {count} visible CUDA devices; start one process per GPU")
    return torch.device("cuda", local_rank)


def _publish(launch: LaunchEnv) -> None:
    """Export the derived values, so libraries that read the environment (DeepSpeed, DCP) agree with us."""
    for name, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size), ("LOCAL_RANK", launch.local_rank),
                        ("MASTER_ADDR", launch.master_addr), ("MASTER_PORT", launch.master_port)):
        os.environ[name] = str(value)


def init_distributed(cfg: Config) -> DistInfo:
    """Create the default process group from the launch environment, or describe a single process.

    Raises RuntimeError naming the variables when they disagree, or when the other ranks do not arrive
    within parallel.init_timeout_s.
    """
    launch = read_launch_env()
    device = rank_device(cfg, launch.local_rank)
    if launch.source == "single":
        return DistInfo(0, 1, 0, device, False)
    if dist.is_initialized():
        raise RuntimeError("init_distributed: a default process group already exists; call shutdown() first")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _publish(launch)
    backend = pick_backend(cfg, device)
    init_timeout = datetime.timedelta(seconds=cfg.parallel.init_timeout_s)
    try:
        dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                                timeout=init_timeout, device_id=device if device.type == "cuda" else None)
        dist.barrier()
    except Exception as error:
        hint = ("start one task per rank with srun (WORLD_SIZE comes from SLURM_NTASKS)" if launch.source == "slurm"
                else "check that every rank was started with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE")
        raise RuntimeError(
            f"rank {launch.rank}: the {launch.world_size} ranks ({launch.source} launch) did not all meet at "
            f"{launch.master_addr}:{launch.master_port} over {backend} within parallel.init_timeout_s="
            f"{cfg.parallel.init_timeout_s:g}; {hint} ({error})") from error
    _set_pg_timeout(datetime.timedelta(seconds=cfg.parallel.train_timeout_s))
    log.info("rank %d/%d (local %d) on %s, %s via %s", launch.rank, launch.world_size, launch.local_rank, device,
             backend, launch.source)
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, device, True)


def shutdown(info: DistInfo, *, synchronize: bool = True, timeout_s: float = 60.0) -> None:
    """Leave the process group so no rank aborts at exit; safe to call twice or without a group.

    With `synchronize` every rank first waits for the others (at most timeout_s), so a fast rank does not
    tear down communicators a slow one still uses. Pass synchronize=False when leaving because of an
    error: the other ranks may be inside a different collective and a barrier would only time out.
    """
    if not info.is_distributed or not dist.is_initialized():
        return
    if synchronize:
        try:
            _set_pg_timeout(datetime.timedelta(seconds=timeout_s))
            dist.barrier()
        except Exception as error:  # a broken group must not keep the process from exiting
            log.warning("rank %d: exit barrier failed (%s); destroying the process group anyway", info.rank, error)
    dist.destroy_process_group()


def reduce_over_ranks(values: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """`values` reduced in place over every rank, by "sum" or "min"; left as they are in a single process.

    The one rank reduction of training (step metrics, validation losses): a mean over ranks is a reduced sum
    divided by a reduced or known count, so every rank's share weighs by what it counted."""
    if info.is_distributed:
        dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return values
