"""``onnxbp`` command: grad, check, ops (and train).

Errors from onnxbp are printed as one line on stderr (``onnxbp: error: ...``)
with exit code 2; a failed check exits 1; no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

import onnxbp
from onnxbp.errors import OnnxbpError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 2, 3


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """Expose every option the rules declare (e.g. --conv-strategy)."""
    for spec in onnxbp.REGISTRY.options().values():
        parser.add_argument("--" + spec.name.replace("_", "-"), dest="opt_" + spec.name,
                            choices=spec.choices, default=None,
                            help=f"{spec.help} (default: {spec.default})")


def _options(args) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="forward ONNX model (.onnx)")
    parser.add_argument("--wrt", nargs="+", metavar="NAME", default=None,
                        help="differentiate w.r.t. these initializers / graph inputs "
                             "(default: every float initializer that reaches an output)")
    parser.add_argument("--grad-suffix", default=None,
                        help="suffix of the gradient inputs/outputs (default: _grad; _grad2 for the gradient of a "
                             "gradient model, _grad3 next)")
    _add_option_flags(parser)


def add_external_data_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--external-data", action="store_true",
                        help="write the weights to <output>.data beside the model (ONNX external data); the "
                             "default does so only over protobuf's 2 GB limit or when the input had external data")


def cmd_grad(args) -> int:
    from onnxbp.modelio import check_loadable, check_onnxruntime_loads

    model = onnxbp.load_model(args.model)
    check_loadable(model, f"'{args.model}'")
    check_onnxruntime_loads(model, f"'{args.model}'")  # the gradient model must run where the forward does
    # inplace: the loaded model becomes the gradient model (one copy of the weights, not two)
    gm = onnxbp.gradient(model, args.wrt, grad_suffix=args.grad_suffix, inplace=True, **_options(args))
    onnxbp.save_model_atomic(gm, args.output, source=args.model, external_data=args.external_data or None)
    external, _ = onnxbp.modelio.external_data_choice(gm, args.model, args.external_data or None)
    grads = list(_grad_params(gm).values())
    zeros = onnxbp.metadata.zero_gradients(gm)
    backward = sum(1 for n in gm.graph.node if n.doc_string.startswith("onnxbp"))
    print(f"wrote {args.output}: {len(gm.graph.node) - backward} forward nodes, {backward} backward "
          f"nodes, {len(grads)} gradients ({', '.join(grads[:6])}{', ...' if len(grads) > 6 else ''})"
          + (f"; structurally zero: {', '.join(zeros)}" if zeros else "")
          + (f"; weights in {onnxbp.modelio.data_file_for(args.output).name} beside it" if external else ""))
    return EXIT_OK


def _grad_params(gm) -> dict:
    from onnxbp.checker import gradient_names

    return gradient_names(gm)


def cmd_check(args) -> int:
    if args.second_order:
        report = onnxbp.check_second_order(args.model, args.second_order, args.wrt, loss=args.loss, x=args.x,
                                           seed=args.seed, batch_size=args.batch_size, rtol=args.rtol,
                                           precision=args.precision, **_options(args))
        print(f"{args.model}: {args.second_order}, {len(report.results)} parameters, {report.precision} "
              f"finite differences")
    else:
        report = onnxbp.check_gradients(args.model, args.wrt, seed=args.seed, batch_size=args.batch_size,
                                        rtol=args.rtol, precision=args.precision,
                                        grad_suffix=args.grad_suffix, **_options(args))
        print(f"{args.model}: {len(report.results)} gradients, {report.precision} forward, "
              f"{report.smoothness} ops")
    print(report.table())
    failed = [r.name for r in report.results if not r.passed]
    if failed:
        print(f"FAILED: {len(failed)} of {len(report.results)} gradients ({', '.join(failed[:6])})")
        return EXIT_CHECK_FAILED
    print(f"passed: all {len(report.results)} gradients agree with finite differences (rtol {args.rtol:g})")
    return EXIT_OK


def cmd_ops(args) -> int:
    entries = onnxbp.REGISTRY.entries()
    rows = [("op", "domain", "opsets", "outcome", "lowering")]
    for e in entries:
        until = "latest" if e.until >= 10_000 else str(e.until)
        rows.append((e.op_type, e.domain or "ai.onnx", f"{e.since}-{until}", e.kind, e.lowering))
    if args.format == "markdown":
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "---|" * len(rows[0]))
        for r in rows[1:]:
            print("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    with_rule = {(e.domain, e.op_type) for e in entries if e.kind == "rule"}
    others = {(e.domain, e.op_type) for e in entries} - with_rule
    print(f"\n{len(with_rule)} ops with gradient rules ({sum(e.kind == 'rule' for e in entries)} entries "
          f"by opset range), {len(others)} with no gradient / not differentiable",
          file=sys.stderr if args.format == "markdown" else sys.stdout)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxbp",
        description="Gradients of ONNX models as standard ONNX ops, run by plain onnxruntime.")
    parser.add_argument("-V", "--version", action="version", version=f"onnxbp {onnxbp.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("grad", help="write a model that also computes gradients",
                       description="Write MODEL plus its backward graph: inputs <Y>_grad for each output Y, "
                                   "outputs <p>_grad for each parameter p.")
    _add_common(p)
    p.add_argument("-o", "--output", required=True, help="where to write the gradient model")
    add_external_data_flag(p)
    p.set_defaults(func=cmd_grad)

    p = sub.add_parser("check", help="build the gradient model and compare it with finite differences",
                       description="Build the gradient model, run it in onnxruntime, compare every gradient "
                                   "with central finite differences; exit 1 on any failure.")
    _add_common(p)
    p.add_argument("--seed", type=int, default=0, help="random seed for inputs and directions")
    p.add_argument("--batch-size", type=int, default=2, help="size given to symbolic dims (default 2)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    p.add_argument("--precision", choices=("auto", "float64", "float32"), default="auto",
                   help="forward precision for finite differences (default: float64 where possible)")
    p.add_argument("--second-order", choices=onnxbp.second_order.KINDS, default=None,
                   help="check a second-order model instead: hvp (Hessian-vector products of --loss w.r.t. "
                        "--wrt, against differences of the gradient along v) or gradient-penalty "
                        "(||dL/dx||^2 w.r.t. --x, differentiated w.r.t. --wrt)")
    p.add_argument("--loss", default=None, help="with --second-order: the tensor differentiated (default: "
                                               "the only float output; a non-scalar one is summed)")
    p.add_argument("--x", nargs="+", default=None, metavar="NAME",
                   help="with --second-order gradient-penalty: the data inputs (default: every float input)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("ops", help="list every op with a rule and how its backward is lowered")
    p.add_argument("--format", choices=("table", "markdown"), default="table")
    p.set_defaults(func=cmd_ops)

    try:
        train = importlib.import_module(f"{__package__}.train")
    except ModuleNotFoundError as exc:  # only a missing train module is tolerated
        if exc.name != f"{__package__}.train":
            raise
        train = None
    if train is not None:
        train.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except OnnxbpError as exc:
        print(f"onnxbp: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("onnxbp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `onnxbp ops | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"onnxbp: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback; "
              f"please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
