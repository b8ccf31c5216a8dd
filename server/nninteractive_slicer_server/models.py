"""Which model folder to serve: an official model id (downloaded on first use) or a local folder."""

import os


class StartupError(Exception):
    """Start-up cannot go on; the message is one sentence telling the operator what to do."""


REQUIRED_FILES = ("plans.json", "dataset.json")


def resolve_fold(model_dir, fold):
    """The fold folder to load: ``fold`` as given, or the only ``fold_*`` folder there is."""
    if fold is not None:
        if fold != "all":
            try:
                fold = int(fold)
            except ValueError:
                raise StartupError("--fold must be an integer or 'all', not %r." % fold)
        if not os.path.isdir(os.path.join(model_dir, "fold_%s" % fold)):
            raise StartupError("The model folder %s has no fold_%s; pass the --fold of a folder that exists there."
                               % (model_dir, fold))
        return fold
    folds = sorted(d for d in os.listdir(model_dir) if d.startswith("fold_")
                   and os.path.isdir(os.path.join(model_dir, d)))
    if len(folds) != 1:
        raise StartupError("The model folder %s has %s fold_* folders; pass --fold to choose one."
                           % (model_dir, len(folds) and ", ".join(folds) or "no"))
    name = folds[0][len("fold_"):]
    return name if name == "all" else int(name)


def check_model_dir(model_dir, fold, checkpoint):
    """Check a model folder before the (slow) library import, so a mistake is reported in a second."""
    if not os.path.isdir(model_dir):
        raise StartupError("The model folder %s does not exist; check --model-dir." % model_dir)
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(model_dir, f))]
    if not (os.path.isfile(os.path.join(model_dir, "inference_info.json"))
            or os.path.isfile(os.path.join(model_dir, "inference_session_class.json"))):
        missing.append("inference_info.json")
    if missing:
        raise StartupError("The model folder %s lacks %s; point --model-dir at a complete nnInteractive model "
                           "folder." % (model_dir, ", ".join(missing)))
    fold = resolve_fold(model_dir, fold)
    ckpt = os.path.join(model_dir, "fold_%s" % fold, checkpoint)
    if not os.path.isfile(ckpt):
        raise StartupError("The checkpoint %s does not exist; check --checkpoint (default checkpoint_final.pth)."
                           % ckpt)
    return fold


def resolve_official(model_id):
    """Local folder of an official model (downloading it when absent); the manifest's default when None."""
    from nnInteractive import model_management as mm

    try:
        if model_id is None:
            model_id = mm.get_default_model_id()
        return model_id, str(mm.ensure_model_available(model_id))
    except (RuntimeError, ValueError) as exc:
        raise StartupError("%s (models are kept in %s; set NNINTERACTIVE_MODEL_DIR to use another folder, or start "
                           "with --model-dir DIR to serve a folder you have)." % (exc, mm.get_model_root_dir()))
