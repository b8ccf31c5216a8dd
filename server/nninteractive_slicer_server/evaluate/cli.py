"""``nninteractive-slicer-eval``: how well does an nnInteractive model segment my data, with a simulated user?

    nninteractive-slicer-eval IMAGES LABELS --server URL --protocol cvpr25 --out OUT
    nninteractive-slicer-eval DATASET_FOLDER --model-dir DIR --protocol cvpr25 points scribbles --out OUT

Writes ``OUT/steps.csv`` (one row per case, object, protocol and step), ``OUT/summary.md`` (mean Dice after each
step, AUC of Dice and NSD, time per prompt; also printed) and ``OUT/dice.png``. Run the same command again to resume
an interrupted run: objects already in ``steps.csv`` are skipped.
"""

import argparse
import os
import sys

from . import dataset as D
from . import report
from .run import PROTOCOLS, STEPS_FILE, EvaluationError, Progress, Settings, evaluate, local_session, open_output

PROG = "nninteractive-slicer-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="protocols:\n" + "\n".join("  %-10s %s" % kv for kv in PROTOCOLS.items()))
    p.add_argument("images", metavar="IMAGES", help="folder of images, or an nnU-Net raw dataset folder "
                   "(imagesTr/labelsTr or imagesTs/labelsTs) when LABELS is left out")
    p.add_argument("labels", metavar="LABELS", nargs="?", help="folder of label maps named like the images (every "
                   "value other than 0 is one object)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="URL", help="an nnInteractive server (ours or the official one)")
    where.add_argument("--model-dir", metavar="DIR", help="run this nnInteractive model folder in this process")
    where.add_argument("--model", metavar="ID", nargs="?", const="", help="run an official model in this process "
                       "(downloaded on first use; without ID the default one)")
    p.add_argument("--out", metavar="OUT", required=True, help="output folder (made when missing; an earlier run "
                   "there is resumed)")
    p.add_argument("--protocol", nargs="+", choices=list(PROTOCOLS), default=["cvpr25"], help="default: cvpr25")
    p.add_argument("--clicks", type=int, default=5, help="corrections after the first prompt (default 5, the "
                   "challenge's)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2, the challenge's)")
    p.add_argument("--box", choices=["auto", "2d", "3d"], default="auto", help="cvpr25's box: 3d (z range x middle "
                   "slice box, as nnInteractive's challenge baseline) when the model takes 3D boxes, else 2d (middle "
                   "slice); default auto")
    p.add_argument("--subset", choices=["Tr", "Ts"], help="of an nnU-Net raw dataset (default: Ts when it has "
                   "labelsTs, else Tr)")
    p.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases")
    p.add_argument("--labels", nargs="+", type=int, metavar="VALUE", help="only these label values")
    p.add_argument("--no-autozoom", action="store_true", help="turn nnInteractive's zoom-out off for this run")
    remote = p.add_argument_group("with --server")
    remote.add_argument("--api-key", help="the server's key (default: $NN_INTERACTIVE_API_KEY; prefer the variable, "
                        "arguments show in ps)")
    remote.add_argument("--ca-bundle", metavar="PEM", help="CA certificate of an https server's private authority")
    remote.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one answer (default 600)")
    local = p.add_argument_group("with --model-dir / --model")
    local.add_argument("--fold", help="fold folder to load (default: the only fold_*)")
    local.add_argument("--checkpoint", default="checkpoint_final.pth")
    local.add_argument("--device", help="cuda, cuda:N, cpu, mps (default: cuda when there is one, else cpu)")
    local.add_argument("--torch-threads", type=int, default=max(1, os.cpu_count() or 1))
    local.add_argument("--torch-compile", action="store_true", help="torch.compile the network (GPU)")
    return p


def open_session(args):
    """``(session, description)``: a server's session, or the library's on this machine."""
    if args.server:
        from SlicerNNInteractiveLib.client import RemoteSession

        key = args.api_key or os.environ.get("NN_INTERACTIVE_API_KEY") or None
        return RemoteSession(args.server, api_key=key, read_timeout=args.timeout, ca_bundle=args.ca_bundle), args.server
    from ..cli import check_device
    from ..models import check_model_dir, resolve_official

    if args.model_dir is not None:
        model_dir = os.path.abspath(os.path.expanduser(args.model_dir))
        name = model_dir
    else:
        name, model_dir = resolve_official(args.model or None)
    fold = check_model_dir(model_dir, args.fold, args.checkpoint)
    import torch

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return local_session(model_dir, fold, args.checkpoint, device, args.torch_threads, args.torch_compile), name


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clicks < 0:
        parser.error("--clicks must be 0 or more")
    if not args.tolerance_mm > 0:
        parser.error("--tolerance-mm must be more than 0")
    protocols = list(dict.fromkeys(args.protocol))
    try:
        cases = D.find_cases(args.images, args.labels, args.subset)
    except D.DatasetError as exc:
        parser.error(str(exc))
    if args.cases:
        unknown = sorted(set(args.cases) - {c.name for c in cases})
        if unknown:
            parser.error("--cases: no case %s in the dataset (it has %s)" % (", ".join(unknown),
                                                                             D.name_list([c.name for c in cases])))
        cases = [c for c in cases if c.name in set(args.cases)]
    settings = Settings(clicks=args.clicks, tolerance_mm=args.tolerance_mm, box=args.box)
    target = args.server or args.model_dir or "official model %s" % (args.model or "(default)")
    try:
        steps = open_output(args.out, settings, target)
    except (EvaluationError, OSError) as exc:
        parser.error(str(exc))
    from ..models import StartupError
    from SlicerNNInteractiveLib.errors import NNInteractiveError

    session = None
    try:
        session, name = open_session(args)
        if args.no_autozoom:
            session.set_do_autozoom(False)
        print("%s: %d cases, protocols %s, %d steps each, with %s" % (PROG, len(cases), " ".join(protocols),
                                                                       settings.steps, name), file=sys.stderr)
        evaluate(session, cases, protocols, settings, steps, args.labels, Progress(len(cases)))
    except (StartupError, EvaluationError, D.DatasetError, NNInteractiveError, ValueError) as exc:
        print("\n%s: error: %s\nObjects finished so far are in %s; run the same command again to resume."
              % (PROG, exc, os.path.join(args.out, STEPS_FILE)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n%s: interrupted; run the same command again to resume." % PROG, file=sys.stderr)
        return 130
    finally:
        close = getattr(session, "close", None)  # a server's session: free its slot before this process ends
        if close is not None:
            close(wait=True)
    done = [p for p in PROTOCOLS if any(r["protocol"] == p for r in steps.rows)]
    summary = report.summarize(steps.rows, done)
    text = report.table(summary, settings.tolerance_mm)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    written = [STEPS_FILE, "summary.md"]
    if summary:
        try:
            report.plot(summary, steps.rows, os.path.join(args.out, "dice.png"))
            written.append("dice.png")
        except ImportError:
            print("%s: no dice.png: matplotlib is not installed (pip install 'nninteractive-slicer-server[eval]')"
                  % PROG, file=sys.stderr)
    print(text, end="")
    print("%s: wrote %s in %s" % (PROG, ", ".join(written), args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
