"""Data sets by name: `resolve_data("mnist" | "toy:NAME" | PATH)`.

Installed as `cmt.datasets` (the top-level name `datasets` belongs to Hugging Face).
"""

if __name__ == "datasets":
    # Imported as the top-level `datasets` only because the repository root is on sys.path
    # (`python -c ...` or `python -m pytest` run from the root), where this folder would shadow
    # Hugging Face's package. Hand the name over to the next `datasets` on sys.path (the import
    # system returns whatever sys.modules holds once this body has run), or fail as if this folder
    # were not there. A namespace package (no __init__.py) would avoid this, but setuptools' editable
    # install then cannot find `cmt.datasets`.
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    _spec = PathFinder.find_spec("datasets", [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'datasets' (the repository's datasets/ folder is cmt.datasets)",
                                  name="datasets")
    sys.modules["datasets"] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
else:
    from .files import load_edm_zip, load_image_folder, load_npz
    from .images import ImageFiles
    from .mnist import load_mnist
    from .resolve import ACCEPTED_SPECS, ImageData, ToyData, one_hot_labels, resolve_data
    from .toy import TOY_NAMES, reference_sample, sample_toy

    __all__ = [
        "ACCEPTED_SPECS",
        "ImageData",
        "ImageFiles",
        "TOY_NAMES",
        "ToyData",
        "load_edm_zip",
        "load_image_folder",
        "load_mnist",
        "load_npz",
        "one_hot_labels",
        "reference_sample",
        "resolve_data",
        "sample_toy",
    ]
