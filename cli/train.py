"""``onnxbp train``: train a forward ONNX model with plain onnxruntime (thin; the work is in onnxbp.training)."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

DEFAULTS = {"loss": "cross_entropy", "optimizer": "adamw", "lr": 5e-3, "epochs": 15, "batch_size": 16}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (forward+loss+backward+optimizer as one ONNX graph)",
        description="Build ONE training-step graph of standard ops (forward, loss, backward, optimizer "
                    "update), run it with onnxruntime, and write the trained inference model.")
    p.add_argument("model", help="forward ONNX model (.onnx)")
    p.add_argument("--data", required=True,
                   help="an .npz with x_train, y_train, x_test, y_test, or, for a model with several inputs "
                        "(input_ids, attention_mask), <input>_train and <input>_test per input and labels_train, "
                        "labels_test; or 'digits' (the 8x8 UCI digits shipped with onnxbp)")
    p.add_argument("--loss", default=DEFAULTS["loss"],
                   choices=("cross_entropy", "lm_cross_entropy", "mse", "l1", "output"),
                   help="loss on the model output (default: cross_entropy; lm_cross_entropy: (N, T, V) token "
                        "scores against shifted next-token labels, -100 ignored; 'output': the output is the loss)")
    p.add_argument("--optimizer", default=DEFAULTS["optimizer"], choices=("sgd", "adam", "adamw"),
                   help="optimizer, PyTorch's update rules (default: adamw)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate (default: 5e-3, the peak of the cosine schedule)")
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "linear", "constant"),
                   help="learning rate per batch after --warmup: cosine annealing from --lr to 0 over the run, "
                        "linear decay to 0, or constant (default: cosine)")
    p.add_argument("--warmup", type=int, default=0, metavar="STEPS",
                   help="linear warmup from 0 to --lr over the first STEPS batches (default: 0)")
    p.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                   help="clip the gradients to global 2-norm MAX in the step graph (torch's clip_grad_norm_)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--nesterov", action="store_true", help="SGD: Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay (default: 0.01 for adamw, 0 otherwise)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="epochs (default: 15)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="batch size (default: 16)")
    p.add_argument("-o", "--output", default=None,
                   help="where to write the trained model (default: <model name>_trained.onnx in the "
                        "current directory)")
    p.add_argument("--external-data", action="store_true",
                   help="write the trained weights to <output>.data beside the model (ONNX external data); the "
                        "default does so only over protobuf's 2 GB limit or when the input had external data")
    p.add_argument("--metrics", default=None, help="write per-epoch metrics as JSON here")
    p.add_argument("--plot", default=None, help="draw loss and accuracy curves as PNG here (needs matplotlib)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="write a checkpoint to DIR after each epoch (atomically)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint DIR")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling and dropout (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's)")
    p.add_argument("--freeze", nargs="+", default=None, metavar="NAME",
                   help="parameters to keep constant; names or glob patterns ('bert.embeddings.*')")
    p.add_argument("--requires-grad", nargs="+", default=None, metavar="NAME",
                   help="train only these parameters, names or glob patterns (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel training on MPI, started as `mpirun -n N onnxbp train ... --distributed` "
                        "(needs onnxbp[mpi]); --batch-size is the global batch, split across the ranks; rank 0 "
                        "prints and writes (docs/distributed.md)")
    p.add_argument("--step-model", default=None, metavar="PATH",
                   help="also write the training-step graph (forward, loss, backward, optimizer) here before "
                        "training, e.g. with --target portable to run it in another runtime")
    from .main import _add_option_flags

    _add_option_flags(p)  # --target, --conv-strategy: the rules' options, as for `onnxbp grad`
    p.set_defaults(func=run)


class _Progress:
    """A plain-text progress bar on stderr, redrawn at most ~10 times a second."""

    def __init__(self, stream, enabled: bool, width: int = 30):
        self.stream, self.enabled, self.width = stream, enabled, width
        self._last = 0.0

    def batch(self, epoch, done, total, loss, epochs):
        if not self.enabled:
            return
        now = time.monotonic()
        if done != total and now - self._last < 0.1:
            return
        self._last = now
        fill = int(self.width * done / total)
        self.stream.write(f"\repoch {epoch}/{epochs} [{'#' * fill}{'.' * (self.width - fill)}] "
                          f"{done}/{total} loss {loss:.4f}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def run(args) -> int:
    if not args.distributed:
        _note_mpi_launch()
        return _run(args, None)
    from onnxbp.training.distributed import abort_on_error, world

    comm = world()
    with abort_on_error(comm):
        return _run(args, comm)


def _note_mpi_launch() -> None:
    import os

    size = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE")
    if size and size.isdigit() and int(size) > 1:
        print(f"onnxbp: note: started by an MPI launcher as one of {size} processes without --distributed: "
              f"each trains alone", file=sys.stderr)


def _run(args, comm) -> int:
    import onnxbp
    from onnxbp.errors import OutputPathError
    from onnxbp.training import Trainer, TrainingError, make_optimizer

    from .main import _options
    from onnxbp.training.checkpoint import checkpoint_path
    from onnxbp.training.data import n_samples
    from onnxbp.training.loop import fit

    if args.resume and not args.checkpoint:
        raise TrainingError("--resume needs --checkpoint DIR (where the last checkpoint is)")
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        raise TrainingError("--epochs and --batch-size must be >= 1 and --lr > 0")
    if args.output is None:
        args.output = f"{Path(args.model).stem}_trained.onnx"
    # Every path is checked before the first step, not after the training it would throw away.
    for path, what in ((args.output, "output"), (args.metrics, "--metrics"), (args.plot, "--plot"),
                       (args.step_model, "--step-model")):
        if path:
            _check_output(Path(path), what, Path(args.model))
    if args.checkpoint and Path(args.checkpoint).exists() and not Path(args.checkpoint).is_dir():
        raise OutputPathError(f"--checkpoint '{args.checkpoint}' is a file; give a directory (created if missing)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise TrainingError("--plot needs matplotlib (pip install 'onnxbp[plot]' or pip install matplotlib)") from None

    opt_kwargs = {}
    if args.optimizer == "sgd":
        opt_kwargs = {"momentum": args.momentum, "nesterov": args.nesterov}
    if args.weight_decay is not None:
        opt_kwargs["weight_decay"] = args.weight_decay
    optimizer = make_optimizer(args.optimizer, **opt_kwargs)
    lead = comm is None or comm.Get_rank() == 0
    say = print if lead else (lambda *a, **k: None)
    threads = args.threads
    if comm is not None and threads is None:
        from onnxbp.training.distributed import default_threads

        threads = default_threads(comm)
    if args.warmup < 0:
        raise TrainingError("--warmup must be >= 0")
    trainer = Trainer(args.model, loss=args.loss, optimizer=optimizer, requires_grad=args.requires_grad,
                      frozen_params=args.freeze, threads=threads, seed=args.seed, comm=comm,
                      clip_grad_norm=args.clip_grad_norm, **_options(args))
    if args.step_model and lead:
        onnxbp.save_model_atomic(trainer.step_model.model, args.step_model, source=args.model)
        say(f"wrote the training-step model to {args.step_model}", flush=True)
    data = trainer.load_data(args.data)
    ranks = "" if comm is None else f", {comm.Get_size()} ranks x {threads} threads"
    say(f"training {args.model}: {len(trainer.spec.params)} parameter tensors "
          f"({trainer.num_parameters()} values), "
          f"{len(data)} train / {n_samples(data.x_test)} test samples, {args.optimizer} lr {args.lr:g}, "
          f"batch {args.batch_size}{ranks}", flush=True)
    progress = _Progress(sys.stderr, lead and not args.no_progress and sys.stderr.isatty())  # no \r frames in log files

    def on_epoch(rec):
        acc = "" if rec["test_accuracy"] is None else f", test accuracy {rec['test_accuracy']:.4f}"
        say(f"epoch {rec['epoch']}/{rec['epochs']}: train loss {rec['train_loss']:.4f}, "
              f"test loss {rec['test_loss']:.4f}{acc} ({rec['seconds']:.1f} s)", flush=True)

    t0 = time.perf_counter()
    try:
        history = fit(trainer, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      checkpoint_dir=args.checkpoint, resume=args.resume, lr_schedule=args.lr_schedule,
                      warmup=args.warmup,
                      on_batch=lambda e, d, t, l: progress.batch(e, d, t, l, args.epochs), on_epoch=on_epoch)
    except KeyboardInterrupt:
        if not lead:
            return 130
        sys.stderr.write("\n")
        if args.checkpoint and checkpoint_path(args.checkpoint).exists():
            print(f"onnxbp: interrupted; the last checkpoint is intact at {checkpoint_path(args.checkpoint)} "
                  f"(continue with --resume)", file=sys.stderr)
        else:
            print("onnxbp: interrupted; no checkpoint was written (use --checkpoint DIR)", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - t0
    if not lead:
        return 0
    trainer.export(args.output, source=args.model, external_data=args.external_data or None)
    final_acc = history["test_accuracy"][-1] if history["test_accuracy"] else None
    metrics = dict(history)
    metrics.update({"final_test_accuracy": final_acc, "final_train_loss":
                    history["train_loss"][-1] if history["train_loss"] else None,
                    "train_seconds": elapsed, "model": str(args.model), "data": str(args.data),
                    "optimizer": trainer.spec.optimizer, "lr": args.lr, "lr_schedule": args.lr_schedule,
                    "warmup": args.warmup, "clip_grad_norm": args.clip_grad_norm, "batch_size": args.batch_size,
                    "seed": args.seed, "ranks": 1 if comm is None else comm.Get_size()})
    metrics["test_accuracy_per_epoch"] = metrics.pop("test_accuracy")
    metrics["test_accuracy"] = final_acc
    if args.metrics:
        _write_json(args.metrics, metrics)
    if args.plot:
        _plot(history, args.plot)
    acc = "" if final_acc is None else f", test accuracy {final_acc:.4f}"
    print(f"wrote {args.output}{acc} ({elapsed:.1f} s training)")
    return 0


def _check_output(path: Path, what: str, model: Path) -> None:
    from onnxbp.errors import OutputPathError
    from onnxbp.modelio import writable_target

    if path.is_dir():
        raise OutputPathError(f"{what} path '{path}' is a directory; give a file name")
    target = writable_target(path)
    if not target.parent.exists():
        raise OutputPathError(f"{what} directory '{target.parent}' does not exist")
    if model.exists() and target.resolve() == model.resolve():
        raise OutputPathError(f"{what} path '{path}' is the input model; choose another path "
                              f"(the input is never modified)")


def _write_json(path, obj) -> None:
    from onnxbp.modelio import write_bytes_atomic

    write_bytes_atomic(path, json.dumps(obj, indent=2).encode())


def _plot(history, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(history["epoch"], history["train_loss"], "o-", label="train")
    ax1.plot(history["epoch"], history["test_loss"], "s-", label="test")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    acc = [a for a in history["test_accuracy"] if a is not None]
    if acc:
        ax2.plot(history["epoch"][-len(acc):], acc, "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from onnxbp.modelio import write_bytes_atomic

    write_bytes_atomic(path, buf.getvalue())
