"""``nninteractive-slicer-server-registry``: check a model registry (``model-serve-spec.yaml``) and its metadata
files, or list its models, without starting a server.

    nninteractive-slicer-server-registry validate [SPEC] [--strict] [--shallow]
    nninteractive-slicer-server-registry list [SPEC]

SPEC defaults to ``$MODEL_SERVE_SPEC``, then ``./model-serve-spec.yaml``. Exit status: 0 valid (warnings are
printed), 1 invalid (or warnings with ``--strict``), 2 wrong usage.
"""

import argparse
import json
import os
import sys

PROG = "nninteractive-slicer-server-registry"


def _spec_arg(value):
    from .registry import spec_path_from

    return spec_path_from(value) or "model-serve-spec.yaml"


def validate(spec, strict=False, deep=True, out=sys.stdout):
    from .registry import SpecError, load_registry

    try:
        reg = load_registry(spec, check_files=False)
    except SpecError as exc:
        print("error: %s" % exc, file=out)
        return 1
    problems = [("warning", None, None, w) for w in reg.warnings]
    problems += [(level, entry, f, "%s: %s, field '%s': %s" % (reg.path, entry or "top level", f, msg))
                 for level, entry, f, msg in reg.problems(deep=deep)]
    for level, _e, _f, msg in problems:
        print("%s: %s" % (level, msg), file=out)
    errors = sum(1 for p in problems if p[0] == "error")
    warnings = len(problems) - errors
    if errors or (strict and warnings):
        print("%s is not valid: %d error(s), %d warning(s)" % (reg.path, errors, warnings), file=out)
        return 1
    print("%s is valid: %d model(s) (%s)%s" % (reg.path, len(reg), ", ".join(reg.ids()),
                                               ", %d warning(s)" % warnings if warnings else ""), file=out)
    return 0


def list_models(spec, out=sys.stdout):
    from .registry import SpecError, load_registry

    try:
        reg = load_registry(spec, check_files=False)
    except SpecError as exc:
        print("error: %s" % exc, file=out)
        return 1
    print(json.dumps([reg.describe(i, resolve=os.path.isdir(reg.model_folder)) for i in reg.ids()], indent=1),
          file=out)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="Check or list a model registry (model-serve-spec.yaml).")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check the spec, its model folders and its metadata files")
    v.add_argument("spec", nargs="?", help="the spec (default: $MODEL_SERVE_SPEC, then ./model-serve-spec.yaml)")
    v.add_argument("--strict", action="store_true", help="fail on warnings too")
    v.add_argument("--shallow", action="store_true", help="skip comparing each template's labels with the model's "
                   "dataset.json and looking for the default folds' checkpoints")
    ls = sub.add_parser("list", help="print the models as JSON (ids, names, aliases, labels, default arguments)")
    ls.add_argument("spec", nargs="?", help="the spec (default: $MODEL_SERVE_SPEC, then ./model-serve-spec.yaml)")
    a = p.parse_args(argv)
    if a.command == "validate":
        return validate(_spec_arg(a.spec), a.strict, not a.shallow)
    return list_models(_spec_arg(a.spec))


if __name__ == "__main__":
    sys.exit(main())
