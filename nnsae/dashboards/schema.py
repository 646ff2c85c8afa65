"""JSON Schema (draft 2020-12) of the dashboard's JSON export; `dashboard()` also writes it to `{out}/schema.json`.

Two documents: `features/{i}.json` (`#/$defs/feature`, one record per feature, close to Neuronpedia's feature
records as SAEDashboard's Neuronpedia runner writes them: `frac_nonzero`, `pos_str`/`pos_values`,
`neg_str`/`neg_values`, `freq_hist_data_*`, `logits_hist_data_*`, `activations[{tokens, values, bin_min, bin_max,
bin_contains, qualifying_token_index}]`, plus nnsae's extra fields) and `features.json` (`#/$defs/index`, the SAE,
the extraction, and one summary row per feature). See `nnsae.dashboards` for what each field means.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
SCHEMA_ID = "https://nnsae.dev/schemas/dashboard-v1.json"

_num = {"type": "number"}
_num_or_null = {"type": ["number", "null"]}
_int = {"type": "integer"}
_int_or_null = {"type": ["integer", "null"]}
_str_or_null = {"type": ["string", "null"]}
_nums = {"type": "array", "items": _num}
_ints = {"type": "array", "items": _int}
_strs = {"type": "array", "items": {"type": "string"}}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False}


ACTIVATION = _object({
    "group": {"enum": ["top", "quantile"]},
    "quantile": {"oneOf": [{"type": "null"}, {"type": "array", "items": _num, "minItems": 2, "maxItems": 2}]},
    "bin_min": _num_or_null,
    "bin_max": _num_or_null,
    "bin_contains": _num_or_null,
    "tokens": _strs,
    "token_ids": _ints,
    "values": _nums,
    "qualifying_token_index": {"type": "integer", "minimum": 0},
    "max_value": _num,
    "max_value_token_index": {"type": "integer", "minimum": 0},
    "chunk_index": {"type": "integer", "minimum": 0},
    "chunk_position": {"type": "integer", "minimum": 0},
    "doc_id": _int_or_null,
    "doc_position": _int_or_null,
})

TOP_TOKEN = _object({"token": {"type": "string"}, "token_id": _int, "count": {"type": "integer", "minimum": 1},
                     "mean_act": _num, "max_act": _num})

FEATURE = _object({
    "schema_version": {"const": SCHEMA_VERSION},
    "modelId": {"type": "string"},
    "layer": {"type": "string"},
    "index": {"type": "integer", "minimum": 0},
    "sae": {"type": "string"},
    "neuronpedia_id": _str_or_null,
    "neuronpedia_url": _str_or_null,
    "n_tokens": {"type": "integer", "minimum": 0},
    "firing_count": {"type": "integer", "minimum": 0},
    "firings_in_shards": _int_or_null,
    "frac_nonzero": {"type": "number", "minimum": 0, "maximum": 1},
    "max_act": _num,
    "mean_act": _num,
    "freq_hist_data_bar_heights": _ints,
    "freq_hist_data_bar_values": _nums,
    "freq_hist_data_bin_edges": _nums,
    "freq_hist_underflow": {"type": "integer", "minimum": 0},
    "freq_hist_overflow": {"type": "integer", "minimum": 0},
    "logits_available": {"type": "boolean"},
    "logit_method": _str_or_null,
    "pos_str": _strs,
    "pos_values": _nums,
    "pos_token_ids": _ints,
    "neg_str": _strs,
    "neg_values": _nums,
    "neg_token_ids": _ints,
    "logits_hist_data_bar_heights": _ints,
    "logits_hist_data_bar_values": _nums,
    "logits_hist_data_bin_edges": _nums,
    "max_act_tokens": _strs,
    "top_tokens": {"type": "array", "items": TOP_TOKEN},
    "activations": {"type": "array", "items": ACTIVATION},
})

INDEX_ROW = _object({
    "index": {"type": "integer", "minimum": 0},
    "frac_nonzero": {"type": "number", "minimum": 0, "maximum": 1},
    "firing_count": {"type": "integer", "minimum": 0},
    "max_act": _num,
    "mean_act": _num,
    "max_act_tokens": _strs,
    "pos_str": _strs,
    "neg_str": _strs,
    "page": {"type": "string"},
    "json": {"type": "string"},
})

INDEX = _object({
    "schema_version": {"const": SCHEMA_VERSION},
    "sae": _object({
        "name": {"type": "string"}, "model": _str_or_null, "architecture": _str_or_null, "d_in": _int_or_null,
        "d_sae": {"type": "integer", "minimum": 1}, "hook_name": _str_or_null, "hook": _str_or_null,
        "neuronpedia_id": _str_or_null,
    }),
    "extraction": _object({
        "path": {"type": "string"}, "n_tokens": {"type": "integer", "minimum": 0},
        "context_size": {"type": "integer", "minimum": 1}, "context_window": {"type": "integer", "minimum": 0},
        "dataset": _str_or_null, "complete": {"type": "boolean"},
    }),
    "logit_method": _str_or_null,
    "features": {"type": "array", "items": INDEX_ROW},
})

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "nnsae feature dashboard export",
    "description": "features/{i}.json validates against #/$defs/feature, features.json against #/$defs/index.",
    "$defs": {"feature": FEATURE, "index": INDEX, "activation": ACTIVATION, "top_token": TOP_TOKEN,
              "index_row": INDEX_ROW},
    "oneOf": [{"$ref": "#/$defs/feature"}, {"$ref": "#/$defs/index"}],
}


def subschema(name: str) -> dict[str, Any]:
    """A standalone schema for one document kind ("feature" or "index"), e.g. for `jsonschema.validate`."""
    return {"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{name}"}


__all__ = ["SCHEMA", "SCHEMA_VERSION", "subschema"]
