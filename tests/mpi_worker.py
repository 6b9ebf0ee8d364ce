"""Run under ``mpirun`` by tests/test_distributed.py (not a test module itself).

``python tests/mpi_worker.py parity CASES.json OUT.npz``: for each case (model, optimizer, lr, a
file of global batches), a data-parallel Trainer on MPI.COMM_WORLD trains on this rank's shard of
each batch; rank 0 records the loss and every parameter and running statistic after each step.

``python tests/mpi_worker.py fault {kill,raise} MODEL DATA.npz CKPT_DIR``: ``fit`` with a
checkpoint per epoch; rank 1 is SIGKILLed (``kill``) or raises (``raise``) in its 8th step,
in the second epoch.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

from onnxbp.training import SGD, AdamW, Trainer, TrainingError
from onnxbp.training import distributed
from onnxbp.training.data import load_npz
from onnxbp.training.loop import fit

OPTIMIZERS = {"sgd_momentum": lambda: SGD(momentum=0.9), "adamw": lambda: AdamW(weight_decay=0.05)}


def parity(cases_path: str, out_path: str) -> None:
    comm = distributed.world()
    cases = json.loads(open(cases_path).read())
    out = {}
    for case in cases:
        tr = Trainer(case["model"], optimizer=OPTIMIZERS[case["optimizer"]](), threads=1, comm=comm)
        with np.load(case["batches"]) as z:
            xs, ys = [z[f"x{k}"] for k in range(case["steps"])], [z[f"y{k}"] for k in range(case["steps"])]
        losses, states = [], []
        for x, y in zip(xs, ys):
            mine = distributed.shard(np.arange(len(x)), comm.Get_rank(), comm.Get_size())
            losses.append(tr.train_step(x[mine], y[mine], lr=case["lr"], check=True))
            states.append(tr.parameters())
        out[f"{case['name']}/loss"] = np.array(losses)
        for name in states[0]:
            out[f"{case['name']}/{name}"] = np.stack([s[name] for s in states])
        out[f"{case['name']}/buckets"] = np.array(len(tr._dist.buckets.buffers))
    if comm.Get_rank() == 0:
        np.savez(out_path, **out)


def fault(kind: str, model: str, data_path: str, ckpt: str) -> None:
    comm = distributed.world()
    with distributed.abort_on_error(comm):
        tr = Trainer(model, optimizer=SGD(momentum=0.9), threads=1, comm=comm)
        calls = {"n": 0}
        step = tr.train_step

        def faulty(*a, **k):
            calls["n"] += 1
            if comm.Get_rank() == 1 and calls["n"] == 8:
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise TrainingError("injected failure on rank 1 at step 8")
            return step(*a, **k)

        tr.train_step = faulty
        fit(tr, load_npz(data_path), epochs=3, batch_size=8, lr=0.05, checkpoint_dir=ckpt)


if __name__ == "__main__":
    if sys.argv[1] == "parity":
        parity(*sys.argv[2:4])
    else:
        fault(*sys.argv[2:6])
