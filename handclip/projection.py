"""Optional replacement of CLIP's projection heads.

name: keep                       # the backbone's own projections
name: replace                    # new heads, always trainable, seeded init
dim: 256
towers: [vision, text]           # replacing one tower is allowed only at the other's width
seed: 0
"""

from __future__ import annotations

from typing import Any

from handclip.errors import ConfigError
from handclip.settings import plain_dict

PROJECTIONS = ("keep", "replace")
TOWERS = ("vision", "text")


def check_projection(spec: Any, current_dim: int) -> dict:
    """Validate a projection spec against the backbone's projection width."""
    # a bare name ("keep") is accepted for the simplest case
    spec = {"name": spec} if isinstance(spec, str) else plain_dict(spec, "projection")
    name = spec.get("name")
    if name not in PROJECTIONS:
        raise ConfigError(f"projection.name={name!r} is not valid; choose one of {', '.join(PROJECTIONS)}")
    if name == "keep":
        return spec
    dim = spec.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"projection.dim={dim!r} must be a positive integer")
    towers = list(spec.get("towers") or TOWERS)
    bad = [t for t in towers if t not in TOWERS]
    if bad:
        raise ConfigError(f"projection.towers has {bad[0]!r}; allowed values are {', '.join(TOWERS)}")
    if len(set(towers)) == 1 and dim != current_dim:
        kept = "text" if towers[0] == "vision" else "vision"
        raise ConfigError(
            f"projection.towers=[{towers[0]}] with projection.dim={dim} leaves the {kept} "
            f"projection at {current_dim}: both towers must share one width. Replace both "
            f"(projection.towers=[vision,text]) or use projection.dim={current_dim}"
        )
    spec["towers"] = sorted(set(towers))
    spec.setdefault("seed", 0)
    return spec


def replace_projection(model, spec: Any) -> list[str]:
    """Put new projection heads on `model` by `spec`; return the replaced parameter prefixes."""
    import torch
    from torch import nn

    spec = check_projection(spec, int(model.config.projection_dim))
    if spec["name"] == "keep":
        return []
    generator = torch.Generator().manual_seed(int(spec["seed"]))
    replaced = []
    for tower in spec["towers"]:
        attribute = "visual_projection" if tower == "vision" else "text_projection"
        old = getattr(model, attribute)
        head = nn.Linear(old.in_features, spec["dim"], bias=False)
        with torch.no_grad():
            # CLIP's own init scale for projections: std = width ** -0.5
            head.weight.normal_(0.0, old.in_features**-0.5, generator=generator)
        setattr(model, attribute, head.to(old.weight.device, old.weight.dtype))
        replaced.append(attribute + ".")
    # keep the config true so save_pretrained / from_pretrained rebuild the same shapes
    model.config.projection_dim = spec["dim"]
    return replaced
