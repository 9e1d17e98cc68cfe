"""CLIP's real BPE tokenizer, built offline from the merges file that open_clip ships.

The hub's `openai/clip-*` tokenizers use exactly this vocabulary (49408 tokens,
`<|startoftext|>` = 49406, `<|endoftext|>` = 49407), so the tiny test backbone tokenizes
captions the way the real ones do, with the same `CLIPTokenizer` class.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from handclip.errors import BackboneError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP keeps the first 49152 - 256 - 2 merges of the 16e6 file: 256 byte tokens, their
# end-of-word forms, the merges and two special tokens make 49408.
_NUM_MERGES = 49152 - 256 - 2


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _merges_file() -> Path:
    # find_spec locates the package without importing it (open_clip imports torch and timm)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "The offline CLIP tokenizer needs the 'open_clip_torch' package for its BPE merges "
            "file: pip install open_clip_torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise BackboneError(f"open_clip's BPE merges file is missing: {path}")
    return path


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` of CLIP's tokenizer into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_merges_file(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [t + "</w>" for t in alphabet]
    tokens += ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out_dir


def build_clip_tokenizer(out_dir: str | Path, context_length: int = 77, input_names: list[str] | None = None):
    """A `transformers.CLIPTokenizer` with CLIP's vocabulary and the text tower's context length, saved to `out_dir`
    and loaded back; `input_names`: what it gives a model (a SigLIP takes `input_ids` alone, no mask)."""
    from transformers import CLIPTokenizer

    out_dir = write_clip_tokenizer_files(out_dir)
    tokenizer = CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=context_length,
        **({"model_input_names": list(input_names)} if input_names else {}),
    )
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)
