import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import handclip

PACKAGE = Path(handclip.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "handclip."))
GLUE = ("handclip.train",)  # the only place that may import Lightning or Hydra


def test_every_module_outside_training_imports_without_hydra_or_lightning():
    library = [m for m in MODULES if not m.startswith(GLUE)]
    expected = {"handclip.model.hf", "handclip.losses.objective", "handclip.eval.evaluator", "handclip.tools.export"}
    assert expected <= set(library)
    script = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'lightning_fabric', 'hydra'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        f"for module in {library!r}:\n"
        "    __import__(module)\n"
        "from handclip.model import Full, apply_freeze\n"
        "from handclip.eval.reid import evaluate\n"
        "import torch\n"
        "print(evaluate(torch.eye(3), torch.arange(3), torch.eye(3), torch.arange(3))['rank1'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "1.0"


def test_no_source_outside_training_mentions_lightning_or_hydra_imports():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "train":
            continue
        for line in path.read_text().splitlines():
            if re.match(r"\s*(from|import)\s+(lightning|pytorch_lightning|hydra)\b", line):
                offenders.append(f"{path.relative_to(PACKAGE)}: {line.strip()}")
    assert not offenders


def test_nothing_outside_the_model_parses_parameter_names():
    # the implementations' parameter names (Hugging Face's and open_clip's) belong to handclip/model; everything
    # else asks the layer groups (and `backbone.logit_scale`, `backbone.logit_bias`: the interface's own names, never
    # a parameter's name in quotes)
    names = re.compile(
        r"vision_model|text_model|encoder\.layers|visual_projection|text_projection|post_layernorm|pre_layrnorm|"
        r"final_layer_norm|\"embedding\"|\"norm\" in|"  # Hugging Face
        r"resblocks|ln_pre|ln_post|ln_final|attnpool|token_embedding|positional_embedding|class_embedding|"
        r"\bconv1\b|visual\.proj|[\"']logit_bias|c_fc|c_proj|in_proj_weight"  # open_clip
    )
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "model":
            continue
        offenders += [f"{path.relative_to(PACKAGE)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                      if names.search(line)]  # fmt: skip
    assert not offenders
