"""The corrupt data a run skipped, totalled over ranks and workers: metrics and one summary line at the end of the run
(instead of a warning for every skipped read of a resampled shard).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
NAMED = 10   # shards named in the summary line


def skip_metrics(stream, prefix: str, what: str, device: torch.device) -> dict[str, int]:
    """`<prefix>/skipped_shards` (shards with a corrupt part) and `<prefix>/skipped_records` (records lost, over
    every read of them) of `stream`'s `SkipCounter`, summed over ranks (a collective: every rank calls it); rank 0
    logs the summary when anything was skipped. A stream without a counter (simulation) gives no metrics."""
    counter = getattr(stream, "skips", None)
    if counter is None:
        return {}
    reads, records = counter.totals()
    totals = torch.tensor(reads + records, dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    reads, records = totals[:len(reads)].tolist(), totals[len(reads):].tolist()
    bad = [i for i, n in enumerate(reads) if n]
    if bad and (not dist.is_initialized() or dist.get_rank() == 0):
        listed = [f"{stream.shards.shards[i]['name']} ({reads[i]} read(s), {records[i]} record(s))" for i in bad]
        more = f" and {len(bad) - NAMED} more" if len(bad) > NAMED else ""
        log.warning("%s skipped corrupt data over all ranks and workers: %d shard(s), %d record(s) lost in %d "
                    "read(s) cut short: %s%s", what, len(bad), sum(records), sum(reads), ", ".join(listed[:NAMED]),
                    more)
    return {f"{prefix}/skipped_shards": len(bad), f"{prefix}/skipped_records": int(sum(records))}
