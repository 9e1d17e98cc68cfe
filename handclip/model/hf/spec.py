"""The Hugging Face backbone spec: a hub id, a local directory, or the tiny model built from a config.

See `handclip.model.hf` for what a spec names; `facts()` reads only the model config, `load()` the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from handclip.checks import integer
from handclip.errors import BackboneError, ConfigError, first_line
from handclip.io import atomic_path, remove_dead_leftovers, waiting_lock, write_json_atomic
from handclip.model.backbone import BackboneFacts, BackboneSpec, default_cache_dir
from handclip.model.hf.backbone import HFBackbone, facts_of
from handclip.settings import plain_dict

TINY = "tiny"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


BUILT = "handclip_built.json"  # in a built backbone's folder: the SHA-256 of each of its files as built
UNRECORDED = "built before folders kept a record"


def file_digests(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file in `folder` but the record itself (a tiny model's are a few MB: milliseconds)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != BUILT}  # fmt: skip


def built_problem(folder: Path) -> str | None:
    """Why a built backbone's folder cannot be used as it is (missing, a file gone, a file changed since it was
    built), `UNRECORDED` for a folder built before records were kept, or None: a changed weight would otherwise
    start every run from other weights than its config and seed say, without a word."""
    if not folder.is_dir():
        return "missing"
    gone = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if gone:
        return f"{gone[0]} is missing"
    if not (folder / BUILT).is_file():
        return UNRECORDED
    try:
        recorded = json.loads((folder / BUILT).read_text())
    except (OSError, ValueError):
        return f"{BUILT} is damaged"
    now = file_digests(folder)  # a file added beside them is not read by from_pretrained's names: left alone
    changed = sorted(name for name in recorded if recorded.get(name) != now.get(name))
    return f"{changed[0]} changed or went missing since it was built" if changed else None


def tiny_clip_config(config: Mapping | None):
    """The `CLIPConfig` of a tiny backbone from its fields (`projection_dim`, `vision_config`, `text_config`)."""
    from transformers import CLIPConfig

    config = dict(config or {})
    text = dict(config.pop("text_config", {}) or {})
    vision = dict(config.pop("vision_config", {}) or {})
    for tower, values in (("text_config", text), ("vision_config", vision)):
        width, heads = values.get("hidden_size", 0), values.get("num_attention_heads", 1)
        if width and width % heads:
            raise ConfigError(
                f"backbone.config.{tower}: hidden_size={width} must be divisible by num_attention_heads={heads}"
            )
    # the tokenizer's special ids: the text tower pools at eos_token_id, so they must agree
    text.setdefault("bos_token_id", 49406)
    text.setdefault("eos_token_id", 49407)
    text.setdefault("pad_token_id", 49407)
    text.setdefault("vocab_size", 49408)
    return CLIPConfig(text_config=text, vision_config=vision, **config)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep + os.sep in source


def _load_error(source: str, error: Exception) -> BackboneError:
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        return BackboneError(
            f"backbone.source={source}: no such directory. A local backbone is a directory written by "
            "CLIPModel.save_pretrained (with its tokenizer and image processor); check the path"
        )
    first = first_line(error)
    local = Path(source)
    if local.expanduser().is_dir():  # a folder that is there but does not load: no download can fix it
        return BackboneError(
            f"backbone folder {source} could not be loaded: {first}. It is damaged or incomplete (a copy cut "
            "short, a file missing or edited): if HandCLIP built it in its cache, delete the folder and the next run "
            "builds it again; otherwise write it again with CLIPModel.save_pretrained (with its tokenizer and image "
            "processor)"
        )
    tried = (
        f"the local directory '{source}' ({'exists' if local.is_dir() else 'not found'})"
        f" and the Hugging Face cache/hub (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})"
    )
    return BackboneError(
        f"Could not load backbone '{source}': {first}. Tried {tried}. To fix: download it once on a "
        f"machine with internet (`hf download {source}`) and run with HF_HUB_OFFLINE=1, or save a "
        "model with `save_pretrained(DIR)` and use `backbone=local backbone.source=DIR`, or try the "
        "offline demo with `experiment=demo`."
    )


class HuggingFaceCLIP(BackboneSpec):
    """A backbone spec for `transformers.CLIPModel`: cheap to build, `load()` brings the weights."""

    export_format = HFBackbone.export_format

    def __init__(self, source: str | None = None, name: str | None = None, config: Mapping | None = None,
                 seed: int = 0, pretrain: Mapping | None = None):  # fmt: skip
        if not source:
            raise ConfigError(
                "backbone.source is missing: give a hub id (openai/clip-vit-base-patch32), "
                "a local save_pretrained directory, or 'tiny'"
            )
        if source != TINY and config:
            raise ConfigError(f"backbone.config is only for source=tiny; backbone.source={source} brings its own")
        integer("backbone.seed", seed)
        self.source = str(source)
        self.name = name or self.source
        self.config = plain_dict(config or {}, "backbone.config")
        self.seed = seed
        if pretrain is not None and source != TINY:
            raise ConfigError(f"backbone.pretrain is only for source=tiny; backbone.source={source} is already trained")
        self.pretrain = None
        if pretrain is not None:
            from handclip.model.pretrain import Pretraining

            self.pretrain = Pretraining.from_settings(plain_dict(pretrain, "backbone.pretrain"))

    def clip_config(self):
        """The model's `CLIPConfig`, without loading any weights."""
        if self.source == TINY:
            return tiny_clip_config(self.config)
        from transformers import CLIPConfig

        try:
            return CLIPConfig.from_pretrained(self.source)
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise _load_error(self.source, error) from error

    def facts(self) -> BackboneFacts:
        """Depths, widths and sizes of the towers, from the config alone."""
        return facts_of(self.clip_config())

    def skeleton(self) -> HFBackbone:
        """The model's structure with no weights (on the meta device): what policies are checked on."""
        from transformers import CLIPImageProcessor, CLIPModel

        config = self.clip_config()
        with torch.device("meta"):
            model = CLIPModel(config)
        size = int(config.vision_config.image_size)
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return HFBackbone(model, None, processor, self.source)

    def tiny_dir(self, cache_dir: str | Path | None = None) -> Path:
        """Build the tiny backbone once (seeded random weights, then pretrained if asked) and return its directory."""
        key = {"config": self.config, "seed": self.seed}
        if self.pretrain is not None:
            key["pretrain"] = self.pretrain.key()
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        kind = "tiny" if self.pretrain is None else "tiny-pretrained"
        out = Path(cache_dir or default_cache_dir()) / "backbones" / f"{kind}-{digest}"

        if built_problem(out) is None:
            return out
        # a second process building the same model waits here, then finds it built
        with waiting_lock(out.with_name(f".{out.name}.lock")):
            remove_dead_leftovers(out.parent)  # killed builds' half-made folders
            problem = built_problem(out)
            if problem == UNRECORDED:  # built by a HandCLIP that kept no record: its files as they are now
                write_json_atomic(out / BUILT, file_digests(out))
            elif problem is not None:  # missing, or damaged (a file gone or changed): built anew, put in place whole
                if out.exists():
                    print(f"{out}: {problem}; built again", flush=True)
                with atomic_path(out) as tmp:
                    self._build_tiny(tmp)
                    write_json_atomic(tmp / BUILT, file_digests(tmp))
        return out

    def _build_tiny(self, out: Path) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from handclip.model.tokenizer import build_clip_tokenizer

        config = tiny_clip_config(self.config)
        # a private random stream: building the cache must not change the run's own random numbers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = CLIPModel(config)
            build_clip_tokenizer(out)
            size = config.vision_config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            processor.save_pretrained(out)
            if self.pretrain is not None:
                from handclip.model.pretrain import pretrain_tiny

                print("pretraining the tiny CLIP once on synthetic hands (a few minutes on a CPU); "
                      f"kept in {out.parent}", flush=True)  # fmt: skip
                backbone = HFBackbone(model, AutoTokenizer.from_pretrained(out), processor, TINY)
                report = pretrain_tiny(backbone, self.pretrain, self.seed)
                write_json_atomic(out / "pretraining.json", report)
                print(f"pretrained in {report['seconds']:.0f} s; loss by epoch {report['epoch_loss']}", flush=True)
        model.save_pretrained(out, safe_serialization=True)

    def load(self, cache_dir: str | Path | None = None) -> HFBackbone:
        """Model, tokenizer and image processor through `from_pretrained`."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = str(self.tiny_dir(cache_dir)) if self.source == TINY else self.source
        try:
            model = CLIPModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = CLIPImageProcessor.from_pretrained(path)
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise _load_error(self.source, error) from error
        return HFBackbone(model, tokenizer, processor, self.source)

    def initial_weights(self) -> str:
        if self.source != TINY:
            local = Path(self.source).expanduser().is_dir()
            return f"the CLIPModel in {self.source}" if local else f"{self.source} (Hugging Face hub)"
        built = f"{self.name}: a tiny CLIP built from a config"
        if self.pretrain is None:
            return f"{built}, random initial weights (seed {self.seed})"
        return (
            f"{built} (seed {self.seed}), pretrained contrastively on synthetic hands: {self.pretrain.identities} "
            f"people the demo never sees, {self.pretrain.epochs} epochs (handclip.model.pretrain)"
        )

    def base_model(self) -> str | None:
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", self.source) and not Path(self.source).exists()
        return self.source if hub_id else None

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        try:
            return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "clip"
        except (OSError, ValueError, AttributeError):
            return False

    @classmethod
    def from_export(cls, folder: Path) -> HuggingFaceCLIP:
        folder = Path(folder)
        if not any((folder / name).is_file() for name in SAFETENSORS):
            pickled = [name for name in PICKLED if (folder / name).is_file()]
            if pickled:
                raise BackboneError(
                    f"{folder / pickled[0]} holds pickled weights, which can run code when loaded: HandCLIP reads "
                    "safetensors only; convert the model once where you trust it "
                    f"(CLIPModel.from_pretrained(DIR).save_pretrained(DIR)) so that {folder} holds model.safetensors"
                )
            raise BackboneError(f"{folder} has config.json but no model.safetensors: give a folder that export wrote")
        return cls(source=str(folder), name=folder.name)
