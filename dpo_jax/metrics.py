"""Metric writers: `metrics.jsonl`, TensorBoard and the progress bar, written by process 0 only."""

import json
import os

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter


def to_python(metrics):
    """Device scalars to plain floats (this fetches them from the device)."""
    return {key: float(np.asarray(value)) for key, value in metrics.items()}


class MetricWriter:
    """Appends `{"stage", "split", "step", ...}` lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        if self.enabled:
            self._jsonl = open(self._path, "a", encoding="utf-8")
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def drop_after(self, stage, step):
        """Forgets the records of `stage` after `step`: on resume, what the interrupted run wrote
        after its last checkpoint is written again by the resumed run."""
        if not self.enabled:
            return
        self._jsonl.close()
        records = [r for r in read_jsonl(self._path) if not (r["stage"] == stage and r["step"] > step)]
        with open(self._path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(self._path + ".tmp", self._path)
        self._jsonl = open(self._path, "a", encoding="utf-8")

    def write(self, stage, split, step, metrics, **extra):
        """One record; `extra` fields (e.g. example ids) go to metrics.jsonl only."""
        if not self.enabled:
            return
        record = {"stage": stage, "split": split, "step": int(step), **to_python(metrics)}
        self._jsonl.write(json.dumps({**record, **extra}) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key not in ("stage", "split", "step"):
                self._tensorboard.add_scalar(f"{stage}/{split}/{key}", value, int(step))
        self._tensorboard.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def progress_bar(stage, start, total):
    """A tqdm bar for one stage (silent on processes other than 0)."""
    return tqdm.tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True,
                     disable=jax.process_index() != 0)


def read_jsonl(path):
    """All records of a metrics.jsonl file; a torn last line (a run killed mid-write) is ignored."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            records.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass
    return records
