"""Sharded, resumable per-image evaluation (``iwae-eval``, ``python -m iwae_ext.cli.eval``).

Images are split across the ranks of a ``torch.distributed`` job (torchrun sets RANK and
WORLD_SIZE; gloo on CPUs, NCCL on GPUs) in fixed batches: batch j to rank j mod W. Each
rank appends its per-image results as JSON lines to ``OUT/<split>-<estimator>.rank<r>.jsonl``
as every batch finishes (flushed and fsynced: a crash loses at most the batch in flight);
``resume`` reads every rank's file (whatever the earlier world size) and skips the images
already there. Rank 0 gathers all per-image results and reports exactly what one process
would: the random numbers of an image are keyed by its index (:mod:`iwae_ext.keyed`), so its
values do not depend on the rank, the batch or the order it was computed in, and Python's
float repr round-trips the stored values exactly.
"""
from __future__ import annotations

import glob
import json
import os

import torch

from ._distributed import Dist


class ResultsFile:
    """Per-image results of one estimator, as JSON lines {"index": i, ...} in one file per rank."""

    def __init__(self, out: str, name: str, rank: int):
        self.pattern = os.path.join(out, f"{name}.rank*.jsonl")
        self.path = os.path.join(out, f"{name}.rank{rank}.jsonl")

    def load(self) -> dict:
        """{index: row} from every rank's file; a line cut short by a crash is dropped (and cut
        from this rank's own file, so appends start on a fresh line)."""
        rows = {}
        for path in sorted(glob.glob(self.pattern)):
            with open(path, "rb") as f:
                data = f.read()
            complete = data[:data.rfind(b"\n") + 1]
            if path == self.path and len(complete) != len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            for line in complete.decode().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[int(row["index"])] = row
        return rows

    def append(self, rows: list[dict]):
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())


def check_settings(out: str, settings: dict, resume: bool, rank: int, d: Dist):
    """OUT/eval.json records what is being evaluated; a resumed run must match it, a fresh one
    must not find earlier results."""
    path = os.path.join(out, "eval.json")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    d.barrier()
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if not resume:
            raise FileExistsError(f"{out} holds an earlier evaluation ({path}); pass --resume to "
                                  f"continue it or choose another --out")
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"--resume: the evaluation in {out} was started with other settings "
                             f"({', '.join(f'{k}: {old.get(k)!r} then, {settings.get(k)!r} now' for k in changed)})")
    elif glob.glob(os.path.join(out, "*.jsonl")):
        raise ValueError(f"{out} has per-image results but no eval.json saying what they are; "
                         f"choose another --out")
    d.barrier()
    if rank == 0 and not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(tmp, path)
    d.barrier()


def run(name: str, compute, index: torch.Tensor, batch_size: int, d: Dist, out: str | None,
        resume: bool, progress: bool, desc: str) -> list[dict]:
    """Per-image rows of one estimator for every image, in the order of ``index`` (positions
    0..N-1). The batches are fixed blocks of ``batch_size`` positions, dealt to the ranks in turn
    (batch j to rank j mod W), so an image is always computed with the same batch mates whatever
    the number of processes or where a run was resumed: its matrix products round the same way
    and its value is bit-identical (float32 AIS trajectories would otherwise amplify a different
    rounding). ``compute(positions [b]) -> list of b dicts``."""
    n = index.shape[0]
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = batches[d.rank::d.world]
    file = ResultsFile(out, name, d.rank) if out else None
    done = file.load() if (file and resume) else {}
    rows, todo = {}, []
    for batch in mine:  # a batch counts as done only whole (a crash may cut it short)
        keys = [int(index[p]) for p in batch]
        if all(k in done for k in keys):
            rows.update((k, done[k]) for k in keys)
        else:
            todo.append(batch)
    bar = None
    total = sum(len(b) for b in mine)
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=total - sum(len(b) for b in todo), desc=desc, unit="image",
                   leave=False, position=d.rank if d.world > 1 else None)
    for positions in todo:
        new = compute(torch.tensor(positions, dtype=torch.int64))
        for p, row in zip(positions, new):
            row["index"] = int(index[p])
            rows[row["index"]] = row
        if file:
            file.append(new)
        if bar is not None:
            bar.update(len(positions))
    if bar is not None:
        bar.close()
    everything = d.gather(rows)
    return [everything[int(i)] for i in index]
