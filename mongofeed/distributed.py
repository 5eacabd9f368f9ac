"""Which rank of which distributed job this process is, and so which shard of a feed it reads.

The job's rank and world size come from the first of these that knows them, each a small
function below; a source that is absent says nothing:

1. ``torch.distributed``, if the program imported it and initialised its process group;
2. Horovod, if the program imported it (``horovod.torch``, ``.tensorflow``, ``.keras``)
   and initialised it;
3. torchrun (and the launchers that set the same variables): ``RANK`` and ``WORLD_SIZE``
   (``LOCAL_RANK`` picks a device, not a shard);
4. SLURM: ``SLURM_PROCID`` and ``SLURM_NTASKS``, only when none of the first three is found
   (``srun`` often starts one torchrun per node, which numbers the ranks itself).

The first three must agree when several are found; otherwise the error names them.
``shard="auto"`` uses what is found and fails when nothing is. The default (``shard=None``)
uses 1 to 3 only, and reads the whole feed without them: SLURM's variables are also set for
a lone ``python`` started inside an allocation, where reading a part of the data would be a
silent surprise. ``tf.distribute`` says it through its ``InputContext``
(``mongofeed.tf.distributed_dataset``).

From the job's rank to a consumer's shard (``shard_within``): a daemon that serves a whole
feed is split among all ranks (rank r of R takes shard r/R); a daemon that serves a shard
(``serve --shard d/D``, one per host) is split among the ranks of its host: with R ranks,
R/D per host numbered host by host (as torchrun and SLURM number them), rank r reads the
daemon of shard ``r // (R/D)`` and takes part ``r % (R/D)`` of it. A trainer that reads
every daemon (``MultiConsumer``) takes part r/R of each.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobRank:
    """Rank ``rank`` of a job of ``world`` processes, as ``source`` says."""

    rank: int
    world: int
    source: str = "given"

    def __post_init__(self):
        if not (isinstance(self.rank, int) and isinstance(self.world, int)
                and 0 <= self.rank < self.world):
            raise ValueError(f"{self.source}: rank {self.rank!r} of world size "
                             f"{self.world!r} is not a rank (0 <= rank < world)")

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world} ({self.source})"


def torch_distributed() -> JobRank | None:
    dist = sys.modules.get("torch.distributed")  # never imported here: it takes seconds
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return None
    return JobRank(dist.get_rank(), dist.get_world_size(), "torch.distributed")


HOROVOD_MODULES = ("horovod.torch", "horovod.tensorflow", "horovod.tensorflow.keras",
                   "horovod.keras")


def horovod() -> JobRank | None:
    for name in HOROVOD_MODULES:
        hvd = sys.modules.get(name)
        if hvd is not None and hvd.is_initialized():
            return JobRank(hvd.rank(), hvd.size(), f"Horovod ({name})")
    return None


def torchrun(environ: Mapping[str, str] = os.environ) -> JobRank | None:
    return _from_variables(environ, "RANK", "WORLD_SIZE", "torchrun (RANK, WORLD_SIZE)")


def slurm(environ: Mapping[str, str] = os.environ) -> JobRank | None:
    return _from_variables(environ, "SLURM_PROCID", "SLURM_NTASKS",
                           "SLURM (SLURM_PROCID, SLURM_NTASKS)")


def _from_variables(environ, rank_name: str, world_name: str, source: str) -> JobRank | None:
    if rank_name not in environ or world_name not in environ:
        return None
    try:
        return JobRank(int(environ[rank_name]), int(environ[world_name]), source)
    except ValueError:
        raise ValueError(f"{rank_name}={environ[rank_name]!r} and {world_name}="
                         f"{environ[world_name]!r} are not a rank and a world size") from None


LAUNCHERS = (torch_distributed, horovod, torchrun)  # agree when several are found
FALLBACKS = (slurm,)                                  # only when no launcher is found


def detect(include_fallbacks: bool = True) -> JobRank | None:
    """This process's rank, from the sources above (None when none is found); a
    ``ValueError`` naming them when two disagree."""
    found = [rank for source in LAUNCHERS if (rank := source()) is not None]
    if any((r.rank, r.world) != (found[0].rank, found[0].world) for r in found):
        raise ValueError("the distributed job's rank is ambiguous: "
                         + "; ".join(map(str, found))
                         + ". Pass shard=(rank, world) to say which")
    if not found and include_fallbacks:
        found = [rank for source in FALLBACKS if (rank := source()) is not None]
    return found[0] if found else None


def resolve_shard(shard) -> tuple[int, int] | JobRank:
    """What a consumer's ``shard`` argument means: a consumer's own part of its daemon's
    shard (a tuple, as given), or the job's rank (``"auto"``, a ``JobRank``, or the default
    ``None`` inside a launcher's job), which ``shard_within`` turns into one."""
    if shard is None or shard == "auto":
        rank = detect(include_fallbacks=shard == "auto")
        if rank is None and shard == "auto":
            raise ValueError(
                "shard='auto' found no distributed job: no initialised torch.distributed "
                "or Horovod, no RANK and WORLD_SIZE (torchrun), no SLURM_PROCID and "
                "SLURM_NTASKS. Pass shard=(rank, world), or leave shard out to read the "
                "whole feed")
        if rank is None or rank.world == 1:
            return (0, 1)
        log.info("mongofeed reads the shard of %s", rank)
        return rank
    if isinstance(shard, JobRank):
        return shard if shard.world > 1 else (0, 1)
    if isinstance(shard, str):
        raise ValueError(f"shard must be 'auto', (rank, world) or None, not {shard!r}")
    rank, world = shard
    return (rank, world)


def shard_within(job: JobRank, daemon_shard: tuple[int, int], endpoint: str) -> tuple[int, int]:
    """The part of one daemon's shard (``serve --shard d/D``) that rank ``job`` takes when
    each rank reads one daemon: all of them share a whole feed; the R/D ranks of a host
    share that host's daemon (ranks numbered host by host)."""
    host, hosts = daemon_shard
    if hosts == 1:
        return job.rank, job.world
    if job.world % hosts:
        raise ValueError(f"{job}: {job.world} ranks cannot share {hosts} daemons (--shard "
                         f"d/{hosts}) equally; run one daemon per host, as many ranks on each")
    per_host = job.world // hosts
    if job.rank // per_host != host:
        raise ValueError(
            f"{job} reads {endpoint}, the daemon of --shard {host}/{hosts}, but with "
            f"{per_host} ranks per daemon, numbered host by host, it belongs to the daemon "
            f"of --shard {job.rank // per_host}/{hosts}: start each host's daemon with "
            f"--shard NODE_RANK/{hosts} and read the daemon of your own host")
    return job.rank % per_host, per_host
