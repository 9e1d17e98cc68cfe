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


def tiny_fields(config: Mapping | None) -> tuple[dict, dict, dict]:
    """(text_config, vision_config, the rest) of a tiny backbone's config fields, each tower's width checked
    against its heads, and the text tower's special ids those of CLIP's tokenizer (which tiny models use)."""
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
    return text, vision, config


def tiny_clip_config(config: Mapping | None):
    """The `CLIPConfig` of a tiny backbone from its fields (`projection_dim`, `vision_config`, `text_config`)."""
    from transformers import CLIPConfig

    text, vision, rest = tiny_fields(config)
    return CLIPConfig(text_config=text, vision_config=vision, **rest)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep + os.sep in source


# how a user names a local folder of each family on the command line
LOCAL = {"CLIPModel": "backbone=local", "SiglipModel": "backbone=siglip_b16"}


def _load_error(source: str, error: Exception, model_class: str = "CLIPModel") -> BackboneError:
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        return BackboneError(
            f"backbone.source={source}: no such directory. A local backbone is a directory written by "
            f"{model_class}.save_pretrained (with its tokenizer and image processor); check the path"
        )
    first = first_line(error)
    local = Path(source)
    if local.expanduser().is_dir():  # a folder that is there but does not load: no download can fix it
        return BackboneError(
            f"backbone folder {source} could not be loaded: {first}. It is damaged or incomplete (a copy cut "
            "short, a file missing or edited): if HandCLIP built it in its cache, delete the folder and the next run "
            f"builds it again; otherwise write it again with {model_class}.save_pretrained (with its tokenizer and "
            "image processor)"
        )
    tried = (
        f"the local directory '{source}' ({'exists' if local.is_dir() else 'not found'})"
        f" and the Hugging Face cache/hub (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})"
    )
    return BackboneError(
        f"Could not load backbone '{source}': {first}. Tried {tried}. To fix: download it once on a "
        f"machine with internet (`hf download {source}`) and run with HF_HUB_OFFLINE=1, or save a "
        f"model with `save_pretrained(DIR)` and use `{LOCAL.get(model_class, 'backbone=local')} backbone.source=DIR`, "
        "or try the offline demo with `experiment=demo`."
    )


# the spec of each model family of transformers HandCLIP serves, by config.json's model_type
FAMILIES = {"clip": "handclip.model.HuggingFaceCLIP", "siglip": "handclip.model.HuggingFaceSigLIP"}


def wrong_family(source: str, found: str, wanted: str) -> str:
    """The message for a model of another family than the spec's (a SigLIP folder given to the CLIP spec)."""
    if found in FAMILIES:
        fix = f"give it with backbone._target_={FAMILIES[found]} (conf/backbone/ has a file for each family)"
    elif found == "siglip2":
        fix = ("SigLIP 2's NaFlex models (model_type siglip2) are not served; its fixed-resolution checkpoints "
               "(google/siglip2-base-patch16-224 and the like) are SiglipModels: use one with backbone=siglip2_b16")
    else:
        fix = f"HandCLIP serves the model types {', '.join(FAMILIES)}"
    return f"backbone.source={source} holds a {found} model, not a {wanted} one: {fix}"


def hub_spec(source: str, name: str | None = None) -> HuggingFaceCLIP:
    """The spec of the family whose model a hub id or folder holds, by its config's `model_type`; a config that
    cannot be read is refused with what to do, and a type no family serves by the CLIP spec, naming what is served."""
    import importlib

    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except Exception as error:  # noqa: BLE001 - re-raised with what to do
        raise _load_error(source, error) from error
    module, _, cls = FAMILIES.get(model_type, FAMILIES["clip"]).rpartition(".")
    return getattr(importlib.import_module(module), cls)(source=source, name=name)


class HuggingFaceCLIP(BackboneSpec):
    """A backbone spec for `transformers.CLIPModel`: cheap to build, `load()` brings the weights.

    Another model family of transformers (SigLIP: `handclip.model.hf.siglip`) subclasses it and names its own
    classes; loading, the tiny model's cache and the export checks are the same."""

    export_format = HFBackbone.export_format
    model_type = "clip"  # the `model_type` of the config.json this spec loads
    model_class = HFBackbone.model_class  # transformers' model class, by name (and in messages)
    family = HFBackbone.family  # how messages and model cards name the family
    tokenizer_inputs: list[str] | None = None  # what a tiny model's tokenizer gives the model (None: ids and mask)

    def transformers_classes(self) -> tuple[type, type, type]:
        """(config class, model class, image processor class) of the family in transformers."""
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        return CLIPConfig, CLIPModel, CLIPImageProcessor

    def tiny_config(self):
        """The tiny model's config from `self.config`'s fields."""
        return tiny_clip_config(self.config)

    def new_processor(self, size: int):
        """The image processor a tiny model is saved with (and a skeleton carries)."""
        _, _, processor = self.transformers_classes()
        return processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def wrap(self, model, tokenizer, processor) -> HFBackbone:
        """The loaded model, tokenizer and processor as this family's `Backbone`."""
        return HFBackbone(model, tokenizer, processor, self.source)

    def facts_of(self, config) -> BackboneFacts:
        return facts_of(config)

    def check_config(self, config) -> None:
        """Refuse, in one line, a config of this family the backbone cannot serve (none for CLIP)."""

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

    def model_config(self):
        """The model's config (a `CLIPConfig`, ...), without loading any weights."""
        if self.source == TINY:
            config = self.tiny_config()
        else:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(self.source)
            except Exception as error:  # noqa: BLE001 - re-raised with what to do
                raise _load_error(self.source, error, self.model_class) from error
            if config.model_type != self.model_type:
                raise BackboneError(wrong_family(self.source, config.model_type, self.model_type))
        self.check_config(config)
        return config

    clip_config = model_config  # the name it had while CLIP was the only family

    def facts(self) -> BackboneFacts:
        """Depths, widths and sizes of the towers, from the config alone."""
        return self.facts_of(self.model_config())

    def skeleton(self) -> HFBackbone:
        """The model's structure with no weights (on the meta device): what policies are checked on."""
        config = self.model_config()
        with torch.device("meta"):
            model = self.transformers_classes()[1](config)
        return self.wrap(model, None, self.new_processor(int(config.vision_config.image_size)))

    def cache_key(self) -> dict:
        """What a tiny model's weights depend on: its folder in the cache is named by a digest of this."""
        key = {"config": self.config, "seed": self.seed}
        if self.model_type != "clip":  # another family built from the same fields is another model (CLIP's keys stay)
            key["model_type"] = self.model_type
        if self.pretrain is not None:
            key["pretrain"] = self.pretrain.key()
        return key

    def tiny_dir(self, cache_dir: str | Path | None = None) -> Path:
        """Build the tiny backbone once (seeded random weights, then pretrained if asked) and return its directory."""
        digest = hashlib.sha1(json.dumps(self.cache_key(), sort_keys=True).encode()).hexdigest()[:10]
        family = "" if self.model_type == "clip" else f"-{self.model_type}"
        kind = f"tiny{family}" if self.pretrain is None else f"tiny{family}-pretrained"
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

    def start_tiny(self, model) -> None:
        """Set what a freshly built tiny model starts from beyond its library's own initialisation (nothing here)."""

    def _build_tiny(self, out: Path) -> None:
        from transformers import AutoTokenizer

        from handclip.model.tokenizer import build_clip_tokenizer

        config = self.tiny_config()
        self.check_config(config)
        # a private random stream: building the cache must not change the run's own random numbers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.transformers_classes()[1](config)
            self.start_tiny(model)
            build_clip_tokenizer(out, int(config.text_config.max_position_embeddings), self.tokenizer_inputs)
            processor = self.new_processor(int(config.vision_config.image_size))
            processor.save_pretrained(out)
            if self.pretrain is not None:
                from handclip.model.pretrain import pretrain_tiny

                print(f"pretraining the tiny {self.family} once on synthetic hands (a few minutes on a CPU); "
                      f"kept in {out.parent}", flush=True)  # fmt: skip
                backbone = self.wrap(model, AutoTokenizer.from_pretrained(out), processor)
                report = pretrain_tiny(backbone, self.pretrain, self.seed)
                write_json_atomic(out / "pretraining.json", report)
                print(f"pretrained in {report['seconds']:.0f} s; loss by epoch {report['epoch_loss']}", flush=True)
        model.save_pretrained(out, safe_serialization=True)

    def load(self, cache_dir: str | Path | None = None) -> HFBackbone:
        """Model, tokenizer and image processor through `from_pretrained`."""
        from transformers import AutoTokenizer

        if self.source != TINY:
            self.model_config()  # a config of the family this backbone cannot serve is refused before the weights
        path = str(self.tiny_dir(cache_dir)) if self.source == TINY else self.source
        _, model_class, processor_class = self.transformers_classes()
        try:
            model = model_class.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = processor_class.from_pretrained(path)
        except Exception as error:  # noqa: BLE001 - re-raised with what to do
            raise _load_error(self.source, error, self.model_class) from error
        return self.wrap(model, tokenizer, processor)

    def initial_weights(self) -> str:
        if self.source != TINY:
            local = Path(self.source).expanduser().is_dir()
            return f"the {self.model_class} in {self.source}" if local else f"{self.source} (Hugging Face hub)"
        built = f"{self.name}: a tiny {self.family} built from a config"
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
            return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == cls.model_type
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
                    f"({cls.model_class}.from_pretrained(DIR).save_pretrained(DIR)) so that {folder} holds "
                    "model.safetensors"
                )
            raise BackboneError(f"{folder} has config.json but no model.safetensors: give a folder that export wrote")
        return cls(source=str(folder), name=folder.name)
