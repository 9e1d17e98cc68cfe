import subprocess
import sys

LIBRARY = ["backbone", "tokenizer", "freeze", "projection", "losses", "reid", "evaluation", "captions",
           "transforms", "embeddings", "zeroshot", "plots", "checkpoints", "rundir", "sampling", "config_check",
           "settings", "files", "export", "features", "sweep", "data.readers", "data.split", "data.prepare",
           "data.images", "data.dataset", "data.synthetic"]  # fmt: skip


def test_the_library_imports_without_hydra_or_lightning():
    script = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'hydra'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        f"for module in {LIBRARY!r}:\n"
        "    __import__('handclip.' + module)\n"
        "from handclip.model.freeze import apply_freeze\n"
        "from handclip.eval.reid import evaluate\n"
        "import torch\n"
        "print(evaluate(torch.eye(3), torch.arange(3), torch.eye(3), torch.arange(3))['rank1'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "1.0"
