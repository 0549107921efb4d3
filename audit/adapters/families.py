"""Model families: which adapter serves a checkpoint's `model_type`, and how to load it.

A `Family` is declarative: the transformers auto class that loads the checkpoint, the
canonical hook-site map (`audit.adapters.sites.FamilySites`) for generative models, and
the transformers class that must exist for the family to be usable (a family the
installed transformers lacks is reported as unavailable, not a crash). Built-in families
register here; third-party packages add theirs through the `mmaudit.adapters` entry-point
group (`audit.plugins`), naming a `Family` object.
"""
from __future__ import annotations

from dataclasses import dataclass

from audit.adapters.sites import DUAL_FAMILIES, GENERATIVE_FAMILIES, FamilySites
from audit.errors import InputError

__all__ = ["Family", "register_family", "family_of", "families", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "mmaudit.adapters"


@dataclass(frozen=True)
class Family:
    model_type: str
    kind: str  # "generative" | "dual_encoder"
    sites: FamilySites | None = None
    auto_class: str = "AutoModelForImageTextToText"
    requires_class: str | None = None  # a transformers attribute that must exist (e.g. "Qwen3VLConfig")
    adapter: str | None = None  # "module:Class" of a custom adapter (default: by kind)
    notes: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("generative", "dual_encoder"):
            raise ValueError(f"family {self.model_type!r}: unknown kind {self.kind!r}")
        if self.kind == "generative" and self.sites is None:
            raise ValueError(f"family {self.model_type!r}: a generative family needs its hook-site map")

    def unavailable_reason(self) -> str | None:
        """Why this install cannot load the family (None when it can)."""
        if self.requires_class is None:
            return None
        import transformers

        if getattr(transformers, self.requires_class, None) is None:
            return (f"the installed transformers {transformers.__version__} has no {self.requires_class}; "
                    f"upgrade transformers to audit {self.model_type} models")
        return None


_FAMILIES: dict[str, Family] = {}
_PLUGINS_LOADED = False


def register_family(family: Family) -> Family:
    if family.model_type in _FAMILIES and _FAMILIES[family.model_type] != family:
        raise ValueError(f"a family for model_type {family.model_type!r} is already registered")
    _FAMILIES[family.model_type] = family
    return family


for _name, _sites in GENERATIVE_FAMILIES.items():
    register_family(Family(_name, "generative", _sites))
for _name in DUAL_FAMILIES:
    register_family(Family(_name, "dual_encoder", auto_class="AutoModel"))


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from audit.plugins import entry_points

    for ep in entry_points(ENTRY_POINT_GROUP):
        try:
            fam = ep.load()
        except Exception as exc:  # noqa: BLE001 - name the broken plugin
            raise InputError(f"the adapter plugin {ep.value!r} failed to import ({type(exc).__name__}: {exc})",
                             where=f"entry point {ENTRY_POINT_GROUP}:{ep.name}") from exc
        if not isinstance(fam, Family):
            raise InputError(f"the adapter plugin {ep.value!r} is not an audit.adapters.families.Family",
                             where=f"entry point {ENTRY_POINT_GROUP}:{ep.name}")
        register_family(fam)


def families() -> dict[str, Family]:
    _load_plugins()
    return dict(_FAMILIES)


def family_of(model_type: str) -> Family | None:
    return families().get(model_type)
