"""SAE configuration with SAELens 6 field names, an open metadata bag, the legacy-config migration, and the table
of architecture names.

The table (`ARCHITECTURES`, name → SAE class) lives here, below the SAE classes, because a config is checked against
its architecture's rules (`check_config`, `config_fields`) without needing anything else from the class:
`nnsae.architectures` registers the built-in classes into it, and `register_architecture` user classes.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from packaging.version import InvalidVersion, Version

if TYPE_CHECKING:
    from nnsae.architectures import SAE

# The SAELens release whose file format nnsae reads and writes. It is what we put in `sae_lens_version` so that
# SAELens loads our files as 6.x files instead of running its pre-6.0 migration on them.
SAELENS_FORMAT_VERSION = "6.54.12"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")

# Metadata keys SAELens moves out of a pre-6.0 config into `metadata`.
LLM_METADATA_KEYS = frozenset({
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
    "sae_lens_version", "sae_lens_training_version", "hook_name_out", "hook_head_index_out", "hf_hook_name",
    "hf_hook_name_out",
})


# Inference architectures: name → SAE class. Filled by `nnsae.architectures.register_architecture`.
ARCHITECTURES: dict[str, type[SAE]] = {}


def architecture_class(architecture: str) -> type[SAE]:
    """The SAE class for an architecture name, with an error listing the known ones."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"Unknown SAE architecture {architecture!r}; known architectures: {sorted(ARCHITECTURES)}."
        ) from None


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`torch.float32`, `"float32"` and `"torch.float32"` all mean float32; anything else is rejected."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"Unsupported dtype {dtype!r}: use one of {sorted(DTYPES)} (a 'torch.' prefix is accepted).")


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical short name (`"bfloat16"`) of a dtype, as written to cfg.json."""
    dtype = parse_dtype(dtype)
    return next(name for name, value in DTYPES.items() if value == dtype)


class SAEMetadata:
    """Open attribute bag for how an SAE is used (model, hook, dataset, ...). Missing keys read as None.

    Unknown keys are kept, so metadata written by other tools survives a save/load round trip.
    """

    def __init__(self, **values: Any):
        values.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
        values.setdefault("sae_lens_training_version", SAELENS_FORMAT_VERSION)
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # keep copy/pickle protocols working
            raise AttributeError(name)
        return None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def keys(self):
        return self.__dict__.keys()

    def items(self):
        return self.__dict__.items()

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SAEMetadata) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return f"SAEMetadata({self.__dict__})"


@dataclass
class SAEConfig:
    """Configuration of an inference SAE; `to_dict()` is exactly SAELens 6's cfg.json.

    Architecture-specific fields (`k`, `rescale_acts_by_decoder_norm` for topk/abstopk, `d_out` for transcoders)
    are written only for the architectures that have them, as SAELens does.
    """

    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    metadata: SAEMetadata = field(default_factory=SAEMetadata)
    architecture: str = "standard"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    d_out: int | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata(**self.metadata)
        self.dtype = dtype_name(self.dtype)
        self.device = str(self.device)
        sae_class = architecture_class(self.architecture)
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported; use one of {NORMALIZATIONS}."
            )
        if self.reshape_activations not in RESHAPES:
            raise ValueError(f"reshape_activations={self.reshape_activations!r} is not one of {RESHAPES}.")
        for name in ("d_in", "d_sae"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        sae_class.check_config(self)

    @property
    def extra_fields(self) -> tuple[str, ...]:
        return architecture_class(self.architecture).config_fields

    @property
    def output_dim(self) -> int:
        """Width of the reconstruction: d_out for transcoders, d_in otherwise."""
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        base = ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations")
        out: dict[str, Any] = {name: getattr(self, name) for name in base}
        out["metadata"] = self.metadata.to_dict()
        out.update({name: getattr(self, name) for name in self.extra_fields})
        out["architecture"] = self.architecture
        return out

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> SAEConfig:
        """Build from a SAELens cfg.json dict (6.x, or pre-6.0 which is migrated first)."""
        if not isinstance(cfg, dict):
            raise ValueError(f"an SAE config must be a JSON object, got {type(cfg).__name__} ({_show(cfg)}).")
        if not isinstance(cfg.get("metadata", {}), dict):
            raise ValueError(f"'metadata' must be a JSON object, got {type(cfg['metadata']).__name__}.")
        cfg = migrate_legacy_config(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in cfg.items() if k in known and k != "metadata"}
        missing = [name for name in ("d_in", "d_sae") if name not in values]
        if missing:
            raise ValueError(f"SAE config is missing required field(s) {missing}.")
        return cls(**values, metadata=SAEMetadata(**cfg.get("metadata", {})))


# Each field's JSON type, checked strictly: `"no"` for a bool or `"4"` for an int is an error, not a truthy value.
_FIELD_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "d_in": ("an integer", (int,)), "d_sae": ("an integer", (int,)), "k": ("an integer or null", (int, type(None))),
    "d_out": ("an integer or null", (int, type(None))), "device": ("a string", (str, torch.device)),
    "apply_b_dec_to_input": ("true or false", (bool,)),
    "rescale_acts_by_decoder_norm": ("true or false", (bool,)), "normalize_activations": ("a string", (str,)),
    "reshape_activations": ("a string", (str,)), "architecture": ("a string", (str,)),
    "metadata": ("a JSON object", (dict, SAEMetadata)),
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _check_types(cfg: SAEConfig) -> None:
    for name, (expected, types) in _FIELD_TYPES.items():
        value = getattr(cfg, name)
        integer_field = int in types
        if not isinstance(value, types) or (integer_field and isinstance(value, bool)):
            raise ValueError(f"{name!r} must be {expected}, got {_show(value)}.")


def _is_legacy(cfg: dict[str, Any]) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    try:
        return Version(str(version)) < Version("6.0.0rc0")
    except InvalidVersion:
        return True


def migrate_legacy_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens' pre-6.0 → 6.0 config migration; 6.x configs are returned unchanged (as a copy)."""
    cfg = copy.deepcopy(cfg)
    if not _is_legacy(cfg):
        return cfg
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    cfg = {renames.get(k, k): v for k, v in cfg.items()}
    cfg.setdefault("prepend_bos", True)
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("sae_lens_training_version", None)
    cfg.setdefault("neuronpedia_id", None)
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("reshape_activations", "hook_z" if "hook_z" in (cfg.get("hook_name") or "") else "none")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if cfg.get("activation_fn") == "topk" and k is not None:
        cfg["architecture"], cfg["k"] = "topk", k
    normalize = cfg.get("normalize_activations")
    if isinstance(normalize, bool) or normalize is None:
        cfg["normalize_activations"] = "expected_average_only_in" if normalize else "none"
    cfg.setdefault("device", "cpu")
    fields = {f.name for f in dataclasses.fields(SAEConfig)} - {"metadata"}
    migrated = {k: v for k, v in cfg.items() if k in fields}
    migrated["metadata"] = {k: v for k, v in cfg.items() if k in LLM_METADATA_KEYS}
    # The config is now in 6.x form; saying so keeps SAELens (and us) from migrating it a second time.
    migrated["metadata"]["sae_lens_version"] = SAELENS_FORMAT_VERSION
    return migrated
