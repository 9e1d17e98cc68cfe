"""Captions from dataset rows by templates, so images and text form contrastive pairs.

Templates are Python format strings over these fields: aspect ("dorsal right"), view
("dorsal"), side ("right"), person ("0000530"), gender, age, skin, accessories ("wearing a
ring" or "without accessories"), nail_polish ("with painted nails" or "with bare nails"),
and caption (a caption CSV's own text).
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence

from handclip.errors import ConfigError

FIELDS = ("aspect", "view", "side", "person", "gender", "age", "skin", "accessories", "nail_polish", "caption")
DEFAULT_TEMPLATES = ("a photo of the {aspect} hand of person {person}",)


def caption_fields(row: Mapping[str, str]) -> dict[str, str]:
    """The template fields of one manifest row (absent attributes are left out)."""
    aspect = row.get("aspect", "")
    fields = {"aspect": aspect, "person": row.get("person", ""), "view": aspect.split(" ")[0]}
    if " " in aspect:
        fields["side"] = aspect.split(" ")[1]
    if row.get("caption"):  # a generic caption CSV brings its own captions
        fields["caption"] = row["caption"]
    if row.get("gender"):
        fields["gender"] = row["gender"]
    if row.get("age"):
        fields["age"] = row["age"]
    if row.get("skinColor"):
        fields["skin"] = row["skinColor"]
    if row.get("accessories") in ("0", "1"):
        fields["accessories"] = "wearing a ring" if row["accessories"] == "1" else "without accessories"
    if row.get("nailPolish") in ("0", "1"):
        fields["nail_polish"] = "with painted nails" if row["nailPolish"] == "1" else "with bare nails"
    return fields


class Captioner:
    """Turns a row into a caption; in training a random template, in evaluation the first."""

    def __init__(self, templates: Sequence[str] = DEFAULT_TEMPLATES):
        templates = [templates] if isinstance(templates, str) else list(templates or [])
        if not templates:
            raise ConfigError("data.captions is empty: give at least one caption template")
        self.fields: dict[str, set[str]] = {}  # template -> the fields it uses
        for template in templates:
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            except ValueError as error:
                raise ConfigError(f"data.captions: {template!r} is not a valid template: {error}") from None
            unknown = names - set(FIELDS)
            if unknown:
                raise ConfigError(
                    f"data.captions: {template!r} uses unknown field '{sorted(unknown)[0]}'; "
                    f"allowed fields are {', '.join(FIELDS)}"
                )
            try:  # every field is text: a number format such as {person:05d} cannot apply
                template.format(**dict.fromkeys(FIELDS, "text"))
            except (ValueError, IndexError, KeyError) as error:
                raise ConfigError(
                    f"data.captions: {template!r} cannot be filled ({error}); fields are text, so use plain "
                    "{name} placeholders"
                ) from None
            self.fields[template] = names
        self.templates = templates

    def check_rows(self, rows: Sequence[Mapping[str, str]]) -> None:
        """Fail before training if a template needs a field that a row lacks or leaves empty."""
        for row in rows:
            available = {k for k, v in caption_fields(row).items() if str(v).strip()}
            for template, names in self.fields.items():
                if names - available:
                    missing = sorted(names - available)[0]
                    raise ConfigError(
                        f"data.captions: {template!r} needs '{missing}', which image {row.get('image', '?')} "
                        f"does not have (empty or not recorded); fields it has: {', '.join(sorted(available))}. "
                        "Fill it in the dataset, or use templates without it"
                    )

    def __call__(self, row: Mapping[str, str], rng: random.Random | None = None) -> str:
        template = self.templates[0] if rng is None else rng.choice(self.templates)
        return template.format(**caption_fields(row))
