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


_PIXTRAL = "audit.adapters.tiled:PixtralAdapter"
_DEEPSTACK = ("DeepStack adds vision-block features to the image positions after the first decoder blocks, "
              "outside the block modules and the projector: a hook on `projector` does not reach them.")
# model_type -> the transformers config class it needs, a custom adapter where the generic one
# is not enough, and what a user should know.
_GENERATIVE = {
    "llava": dict(requires_class="LlavaConfig", adapter=_PIXTRAL,
                  notes="Pixtral-12B is a llava checkpoint with a Pixtral tower (its processor needs torchvision). "
                        "A llava whose language model is a mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE: the "
                        "`moe` reference model) has routers at language.blocks.{i}.router."),
    "llava_next": dict(requires_class="LlavaNextConfig"),
    "vipllava": dict(requires_class="VipLlavaConfig"),
    "llava_onevision": dict(requires_class="LlavaOnevisionConfig"),
    "gemma3": dict(requires_class="Gemma3Config"),
    "paligemma": dict(requires_class="PaliGemmaConfig", adapter="audit.adapters.paligemma:PaliGemmaAdapter",
                      notes="Every prompt needs an image (prefix-LM)."),
    "qwen2_vl": dict(requires_class="Qwen2VLConfig"),
    "qwen2_5_vl": dict(requires_class="Qwen2_5_VLConfig"),
    "qwen3_vl": dict(requires_class="Qwen3VLConfig", notes=_DEEPSTACK),
    "qwen3_vl_moe": dict(requires_class="Qwen3VLMoeConfig",
                         notes=_DEEPSTACK + " Decoder MLPs are mixtures of experts; their routers are the "
                                            "hook sites language.blocks.{i}.router (probe moe_routing)."),
    "internvl": dict(requires_class="InternVLConfig"),
    "mistral3": dict(requires_class="Mistral3Config", adapter=_PIXTRAL,
                     notes="Its PixtralProcessor needs torchvision."),
    "idefics3": dict(requires_class="Idefics3Config", adapter="audit.adapters.idefics3:Idefics3Adapter"),
    "smolvlm": dict(requires_class="SmolVLMConfig", adapter="audit.adapters.smolvlm:SmolVLMAdapter",
                    notes="Its processor needs num2words."),
    "llama4": dict(requires_class="Llama4Config", adapter="audit.adapters.tiled:Llama4Adapter",
                   notes="Its image processor needs torchvision. Decoder MLPs are mixtures of experts (routers at "
                         "language.blocks.{i}.router in the MoE blocks). transformers 5.24's "
                         "Llama4ForConditionalGeneration.forward raises AttributeError ('image_outputs'), so no "
                         "probe runs on it there (moe_routing included); 5.17 runs."),
    "mllama": dict(requires_class="MllamaConfig"),
    "qwen2_audio": dict(requires_class="Qwen2AudioConfig", auto_class="AutoModelForMultimodalLM",
                        adapter="audit.adapters.audio:Qwen2AudioAdapter",
                        notes="Audio and text only (no images); clips longer than the feature extractor's window "
                              "(30 s) are refused, other sample rates are resampled to its rate. Encoder blocks are "
                              "hook sites audio.blocks.{i}."),
}
for _name, _sites in GENERATIVE_FAMILIES.items():
    register_family(Family(_name, "generative", _sites, **_GENERATIVE.get(_name, {})))
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
