"""Metric writers: `metrics.jsonl`, TensorBoard and the progress bar, written by process 0 only."""

import json
import os
import tempfile

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from dpo_jax import storage

# Step metrics are read this many steps after their step was dispatched, so that the host never
# waits for the device (training, and the benchmark that times it).
METRICS_LAG = 2


def to_python(metrics):
    """Device scalars to plain floats (this fetches them from the device)."""
    return {key: float(np.asarray(value)) for key, value in metrics.items()}


class MetricWriter:
    """Writes `{"stage", "split", "step", ...}` records to metrics.jsonl and scalars to TensorBoard.

    TensorBoard gets one run per stage (`tensorboard/<stage>/`) with TRL's tags (`train/loss`,
    `eval/rewards/accuracies`, ...), so dashboards built for TRL read it and chained stages stay
    apart. On a local disk each record is appended and flushed at once. Object stores cannot append:
    there the records are kept in memory and metrics.jsonl is rewritten whole at each `flush`, which
    the driver calls before every checkpoint, so a preempted run keeps every record up to its last
    checkpoint (what a resumed run expects: it rewrites the records after it); the event files are
    written to a local directory and uploaded at each `flush`.
    """

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        self._workdir = workdir
        self._path = storage.join(workdir, "metrics.jsonl")
        self._remote = storage.is_remote(workdir)
        self._tensorboard = {}
        if not self.enabled:
            return
        if self._remote:
            self._records = read_jsonl(self._path) if storage.exists(self._path) else []
            self._staging = tempfile.TemporaryDirectory(prefix="dpo_jax_tensorboard_")
            self._board_root = self._staging.name
        else:
            self._jsonl = open(self._path, "a", encoding="utf-8")
            self._board_root = storage.join(workdir, "tensorboard")

    def _board(self, stage):
        if stage not in self._tensorboard:
            self._tensorboard[stage] = SummaryWriter(os.path.join(self._board_root, stage))
        return self._tensorboard[stage]

    def drop_after(self, stage, step):
        """Forgets the records of `stage` after `step`: on resume, what the interrupted run wrote
        after its last checkpoint is written again by the resumed run."""
        if not self.enabled:
            return
        keep = lambda record: not (record["stage"] == stage and record["step"] > step)
        if self._remote:
            self._records = [record for record in self._records if keep(record)]
            self.flush()
            return
        self._jsonl.close()
        storage.write_jsonl(self._path, [record for record in read_jsonl(self._path) if keep(record)])
        self._jsonl = open(self._path, "a", encoding="utf-8")

    def write(self, stage, split, step, metrics, **extra):
        """One record; `extra` fields (e.g. example ids) go to metrics.jsonl only."""
        if not self.enabled:
            return
        record = {"stage": stage, "split": split, "step": int(step), **to_python(metrics)}
        if self._remote:
            self._records.append({**record, **extra})
        else:
            self._jsonl.write(json.dumps({**record, **extra}) + "\n")
            self._jsonl.flush()
        board = self._board(stage)
        for key, value in record.items():
            if key not in ("stage", "split", "step"):
                board.add_scalar(f"{split}/{key}", value, int(step))
        if not self._remote:
            board.flush()

    def records(self):
        """Every record so far (process 0: also those not yet flushed to an object store)."""
        if self.enabled and self._remote:
            return list(self._records)
        return read_jsonl(self._path) if storage.exists(self._path) else []

    def flush(self):
        """Makes every record written so far durable (on object storage: rewrites metrics.jsonl)."""
        if not self.enabled:
            return
        for board in self._tensorboard.values():
            board.flush()
        if self._remote:
            storage.write_jsonl(self._path, self._records)
            storage.upload_tree(self._board_root, storage.join(self._workdir, "tensorboard"))

    def close(self):
        if not self.enabled:
            return
        for board in self._tensorboard.values():
            board.close()
        self.flush()
        if self._remote:
            self._staging.cleanup()
        else:
            self._jsonl.close()


def progress_bar(stage, start, total):
    """A tqdm bar for one stage (silent on processes other than 0)."""
    return tqdm.tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True,
                     disable=jax.process_index() != 0)


def read_jsonl(path):
    """All records of a metrics.jsonl file; a torn last line (a run killed mid-write) is ignored."""
    with storage.open_file(path) as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            records.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass
    return records
