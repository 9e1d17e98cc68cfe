"""Which backbone implementation wrote an exported model folder, and loading it back.

Each known backbone spec class recognises its own exports by their files (`BackboneSpec.recognises`)
and makes a spec that loads one (`BackboneSpec.from_export`); tools that take a model folder ask
them in turn here, and never look for an implementation's file names themselves:

    backbone = load_export("exported/dorsal_right")   # a Hugging Face CLIP or SigLIP, or an open_clip export
"""

from __future__ import annotations

import importlib
from pathlib import Path

from handclip.errors import BackboneError
from handclip.model.backbone import Backbone, BackboneSpec

# the spec classes of the implementations in handclip.model, imported when asked (open_clip is heavy)
SPECS = ("handclip.model.hf.HuggingFaceCLIP", "handclip.model.hf.HuggingFaceSigLIP", "handclip.model.openclip.OpenCLIP")


def spec_classes() -> list[type[BackboneSpec]]:
    """The known backbone spec classes, in the order they are asked."""
    classes = []
    for path in SPECS:
        module, _, name = path.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def export_spec(folder: str | Path) -> BackboneSpec:
    """The spec that loads the exported model in `folder`; a BackboneError names what is wrong with it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BackboneError(f"{folder} is not a model directory (no such folder): give the folder export wrote")
    classes = spec_classes()
    for spec_class in classes:
        if spec_class.recognises(folder):
            return spec_class.from_export(folder)
    formats = " or ".join(spec_class.export_format for spec_class in classes)
    raise BackboneError(
        f"{folder} is not a model directory: no {formats} export is in it; give the folder "
        "python -m handclip.export wrote"
    )


def load_export(folder: str | Path, cache_dir: str | Path | None = None) -> Backbone:
    """The backbone exported in `folder`, with its tokenizer and preprocessing, whichever implementation wrote it."""
    return export_spec(folder).load(cache_dir)
