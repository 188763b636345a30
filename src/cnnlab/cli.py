"""The `cnnlab` command: argparse subcommands, each a thin call into `cnnlab.api`.

A user's mistake (`UserError`) prints one line on stderr and exits 2; Ctrl-C exits 130 and SIGTERM
143 (core/signals.py), a stopped run saying how to resume it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import cnnlab

from cnnlab.core import signals
from cnnlab.core.errors import UserError


def _train_parser(sub, command: str = "train", help: str = "train and evaluate a model; prints 'run: <folder>' last"):
    p = sub.add_parser(command, help=help)
    p.add_argument("config", nargs="?", help="YAML config (sections data, model, train)")
    p.add_argument("--data", help="image folder, .zip/.tar(.gz) archive, or cifar10 / digits")
    p.add_argument("--model", help="registry name (see `cnnlab models`)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--time-budget", metavar="DURATION", help="e.g. 5m: the whole run, evaluation included, planned "
                   "to end within it (cnnlab picks the epochs, and the fastnet width when no --model is named)")
    p.add_argument("--lr", help="learning rate, or auto (a range test picks it)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", help="adam | adamw | sgd")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the model's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels")
    p.add_argument("--precision", help="auto | fp32 | bf16")
    p.add_argument("--split", help="reuse a split.csv from an earlier run")
    g = p.add_argument_group("pretrained backbones (resnet18, efficientnet_lite0, timm:NAME, tv:NAME, ...)")
    g.add_argument("--pretrained", action="store_true", default=None, help="start from ImageNet weights (found offline)")
    g.add_argument("--weights", metavar="FILE", help="backbone weights: .safetensors or a .pth state dict")
    g.add_argument("--from", dest="init", metavar="RUN", help="start from a trained run's model and split")
    g.add_argument("--input-size", type=int, help="the backbone's input side (smaller images are upscaled)")
    g.add_argument("--head", help="linear | mlp")
    g.add_argument("--freeze", action="store_true", default=None, help="phase 1: train the new head only")
    g.add_argument("--unfreeze", metavar="N|all", help="fine-tune the last N blocks (or all)")
    g.add_argument("--finetune-lr", type=float, help="fine-tuning lr after --freeze (default lr/10)")
    g.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs after --freeze (default --epochs)")
    p.add_argument("--out", help="root folder for run folders (default runs/)")
    p.add_argument("--tag", help="suffix for the run folder's name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. train.lr=0.01")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="class-activation maps: a PNG per image of where the network looked")
    p.add_argument("run", metavar="RUN_OR_BUNDLE")
    p.add_argument("images", nargs="+")
    p.add_argument("--class", dest="target", metavar="C", help="map this class (name or index; default: the "
                   "predicted one)")
    # the names of evaluate/explain.py's METHODS, written out: importing it here would load torch before --help
    p.add_argument("--method", default="gradcam", help="gradcam (default), gradcam++, xgradcam, layercam, "
                   "smoothgradcam++ or scorecam")
    p.add_argument("--layer", help="the layer to map (a module name; default: the deepest with a 6 x 6 grid or finer)")
    p.add_argument("--out", help="folder for the PNGs (default RUN/explanations/<time>-explain)")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's own one-line error (argparse would print the whole usage first)."""

    def error(self, message):
        sys.stderr.write(f"cnnlab: error: {message}; check `{self.prog} --help`\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnlab", description="Image classification with CNNs, one command per step.")
    parser.add_argument("--version", action="version", version=f"cnnlab {cnnlab.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("audit", help="decode every image of a dataset and report what is in it")
    p.add_argument("data", help="image folder, archive, or cifar10 / digits")
    p.add_argument("--out", default="audit.json", help="JSON file to write (figures go beside it)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    _train_parser(sub).add_argument("--resume", metavar="RUN", help="continue a stopped run from its checkpoint")
    _train_parser(sub, "lr-find", "learning-rate range test: a plot and a suggested lr (same options as train)")
    p = sub.add_parser("study", help="run a study file (models x settings x lrs) and write its comparison report")
    p.add_argument("study", help="study YAML (see configs/)")
    p.add_argument("--out", default="studies", help="root folder of study folders (default studies/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("report", help="rebuild the comparison report of a study folder or of run folders")
    p.add_argument("folders", nargs="+")
    p.add_argument("--out", help="where run folders' report goes (default comparison/; a study's own folder)")
    p = sub.add_parser("evaluate", help="evaluate a trained run on its test split or on other data")
    p.add_argument("run")
    p.add_argument("--data", help="evaluate on this data instead of the run's test split")
    p.add_argument("--include-seen", action="store_true",
                   help="keep images of --data that the run trained or validated on (left out by default)")
    p = sub.add_parser("predict", help="classify image files with a trained run; prints JSON")
    p.add_argument("run")
    p.add_argument("images", nargs="+")
    _explain_parser(sub)
    p = sub.add_parser("export", help="write a deployable bundle: safetensors + ONNX + bundle.json with hashes")
    p.add_argument("run")
    p.add_argument("--out", help="bundle folder (default RUN/bundle)")
    p.add_argument("--check", action="store_true", help="confirm the bundle's probabilities equal evaluation's")
    p = sub.add_parser("serve", help="the upload-and-classify page and REST API for a run or bundle")
    p.add_argument("path", metavar="RUN_OR_BUNDLE")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="server processes, each with the model loaded once (default: one per core, at most 4)")
    p.add_argument("--threads", type=int, default=1, help="inference threads per worker")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "int8", "bf16", "torch"],
                   help="auto (default): the fastest engine the bundle measured within 0.3 points of fp32's test "
                        "accuracy; onnx: fp32 ONNX Runtime; int8: its quantized model; bf16: PyTorch bf16 "
                        "autocast (CPUs with AMX or AVX512-BF16); torch: PyTorch fp32")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body (413 above it)")
    p.add_argument("--api-key", default="", help="require this X-API-Key header on /predict (for non-local hosts)")
    sub.add_parser("models", help="list the registered models")
    p = sub.add_parser("weights", help="pretrained weights on this machine: list, or fetch for offline use")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="list|fetch")
    wsub.add_parser("list", help="where each pretrained network's weights are found, or that they are not")
    f = wsub.add_parser("fetch", help="download weights into the cnnlab cache (needs a network)")
    f.add_argument("names", nargs="+")
    p = sub.add_parser("summary", help="per-layer table of a model with parameter counts")
    p.add_argument("model")
    p.add_argument("--image-size", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=10)
    return parser


def _train_overrides(a) -> dict:
    """The config keys the train flags set (unset flags are left to the config file and defaults)."""
    from cnnlab import api

    flags = {"data.path": a.data, "model.name": a.model, "train.epochs": a.epochs, "train.lr": a.lr,
             "train.batch_size": a.batch_size, "train.optimizer": a.optimizer, "data.image_size": a.image_size,
             "train.seed": a.seed, "train.deterministic": a.deterministic, "train.precision": a.precision,
             "data.split_file": a.split, "out": a.out, "tag": a.tag, "model.pretrained": a.pretrained,
             "model.weights": a.weights, "model.init": a.init, "model.input_size": a.input_size,
             "model.head": a.head, "train.freeze": a.freeze, "train.unfreeze": a.unfreeze,
             "train.finetune_lr": a.finetune_lr, "train.finetune_epochs": a.finetune_epochs,
             "train.time_budget": a.time_budget}
    out: dict = {}
    for key, value in flags.items():
        if value is not None:
            api.set_dotted(out, key, value)
    return out


def run(argv: list[str], started: float | None = None) -> int:
    """`started`: the time.monotonic() a time budget counts from (None: when `train` is called)."""
    args = build_parser().parse_args(argv)
    from cnnlab import api  # after parsing: `--help` and usage errors answer without importing torch

    if args.command == "audit":
        api.audit(args.data, args.out, workers=args.workers)
    elif args.command == "train":
        cfg = api.train_config(args.config, _train_overrides(args), args.set, args.resume)
        folder = api.train(cfg, progress=not args.no_progress, resume=args.resume, started=started)
        if api.is_main_process():  # under torchrun, one process speaks for the run
            print(f"report: {api.RunFolder(folder).report}")
            print(f"run: {folder}")
    elif args.command == "lr-find":
        folder = api.lr_find(api.load_config(args.config, _train_overrides(args), args.set, from_init=True))
        print(f"plot: {api.RunFolder(folder).lr_find_plot}")
        print(f"folder: {folder}")
    elif args.command == "study":
        folder = api.study(args.study, args.out, args.set, progress=not args.no_progress)
        print(f"study: {folder}")
    elif args.command == "report":
        api.report(args.folders, args.out)  # which says where the report is
    elif args.command == "evaluate":
        out = api.evaluate(args.run, args.data, include_seen=args.include_seen)
        print(f"evaluation: {out}")
    elif args.command == "predict":
        results = api.predict(args.run, args.images)
        print(json.dumps(results, indent=2))
        return _failed_images(results, "classified")
    elif args.command == "explain":
        return _explain(api, args)
    elif args.command == "models":
        rows = api.models()
        width = max(len(name) for name, _, _ in rows)
        for name, size, description in rows:
            print(f"{name:<{width}}  {f'{size:>4}px' if size else '':>6}  {description}")  # a family: its nets' own
    elif args.command == "export":
        print(f"bundle: {api.export(args.run, args.out, check=args.check)}")
    elif args.command == "serve":
        api.serve(args.path, args.host, args.port, args.workers, args.threads, args.engine,
                  int(args.max_body_mb * 2**20), args.api_key)
    elif args.command == "weights":
        if args.weights_command == "list":
            for name, where in api.weights_list():
                print(f"{name:<20} {where}")
        else:
            for name in args.names:
                print(f"{name}: {api.weights_fetch(name)}")
    elif args.command == "summary":
        print(api.summary(args.model, args.image_size, args.num_classes))
    return 0


def _explain(api, args) -> int:
    folder, results = api.explain(args.run, args.images, args.target, args.method, args.layer, args.out)
    for r in results:
        if "error" not in r:
            print(f"{r['path']}: map of {r['explained']} -> {r['png']}")
            print("  " + "  ".join(f"{c} {v:.4f}" for c, v in r["probabilities"].items()))
    if folder:
        print(f"explanations: {folder}")
    return _failed_images(results, "explained")


def _failed_images(results: list[dict], verb: str) -> int:
    """2 with one line on stderr when any image failed (each result with an `error`), else 0."""
    bad = [r for r in results if "error" in r]
    if bad:
        print(f"cnnlab: error: {len(bad)} of {len(results)} images could not be {verb} "
              f"({bad[0]['path']}: {bad[0]['error']}); pass image files (JPEG, PNG, ...) or folders of them",
              file=sys.stderr)
        return 2
    return 0


class _ReaderGone(Exception):
    """stdout's reader went away (`cnnlab predict ... | head`)."""


class _Stdout:
    """sys.stdout, on which a broken pipe is `_ReaderGone`: the command then ends quietly as cat does, while a
    broken pipe anywhere else (a worker process's, say) stays an error."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            raise _ReaderGone from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise _ReaderGone from None

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    stdout, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    try:
        with signals.handled():
            # the command line's own process counts its budget from its start, before torch was imported
            return run(sys.argv[1:], cnnlab.STARTED) if argv is None else run(argv)
    except UserError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 2
    except signals.Interrupted as e:
        hint = f"; continue with: cnnlab train --resume {e.run_dir}" if e.run_dir else ""
        print(f"cnnlab: interrupted by {e.name}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cnnlab: interrupted", file=sys.stderr)
        return 130
    except _ReaderGone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())  # Python's last flush at exit would fail too
        return 141  # 128 + SIGPIPE, what a shell reports for a command that signal ended
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    raise SystemExit(main())
