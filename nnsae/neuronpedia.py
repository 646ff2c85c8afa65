"""Links to Neuronpedia (https://neuronpedia.org) for SAEs that have a Neuronpedia id.

An SAE has one when it was loaded by release name from the pretrained registry (`SAE.from_pretrained(release,
sae_id)` copies the registry's `neuronpedia` field into `sae.cfg.metadata.neuronpedia_id`) or when its cfg.json
metadata carries one. Ids look like `gpt2-small/8-res-jb`: `{model id on Neuronpedia}/{source}`.

- `neuronpedia_page_url(neuronpedia_id, feature=None)` → `https://neuronpedia.org/{neuronpedia_id}` (the source's
  page) or `…/{feature}` (the feature's dashboard): the one place a Neuronpedia page URL is built (dashboards and
  model cards call it with the id they hold).
- `neuronpedia_url(sae, feature)`: the same feature URL from an SAE (SAELens' `open_neuronpedia_feature_dashboard`
  URL), with the id and the feature index checked.
- `neuronpedia_quick_list_url(sae, features, name)` → `https://neuronpedia.org/quick-list/?name=…&features=…`,
  with `features` the URL-quoted JSON list `[{"modelId", "layer", "index"}]` that SAELens'
  `get_neuronpedia_quick_list` builds. `layer` is the id's part after the `/` and `index` the feature as a string,
  as in SAELens. `modelId` is the id's part before the `/`: that is the model id Neuronpedia knows. SAELens uses
  `metadata.model_name` there, which is the same string for most releases but an HF id (and a broken link) for
  some, e.g. Llama Scope (`meta-llama/Llama-3.1-8B` vs `llama3.1-8b`).

Nothing here touches the network. The `open_*`/`get_*` functions named as in SAELens also open the URL in a web
browser (`open_browser=False` to only return it).
"""

from __future__ import annotations

import json
import urllib.parse
import webbrowser
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from nnsae.architectures import SAE

NEURONPEDIA_DOMAIN = "https://neuronpedia.org"


class NoNeuronpediaIdError(ValueError):
    """The SAE has no `cfg.metadata.neuronpedia_id`, so no Neuronpedia page can be named."""


def neuronpedia_id(sae: SAE | Any) -> str:
    """The SAE's Neuronpedia id (`model/source`), or a `NoNeuronpediaIdError` saying how SAEs get one."""
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    np_id = metadata.get("neuronpedia_id") if metadata is not None else None
    if not np_id:
        hook = getattr(metadata, "hook_name", None) if metadata is not None else None
        raise NoNeuronpediaIdError(
            f"This SAE{f' (hook {hook!r})' if hook else ''} has no Neuronpedia id (cfg.metadata.neuronpedia_id is "
            f"unset): either Neuronpedia has no dashboards for it, or it was not loaded by release name. SAEs loaded "
            f"with SAE.from_pretrained(release, sae_id) from a release with Neuronpedia pages get one (see "
            f"`nnsae list`); you can also set it yourself: sae.cfg.metadata.neuronpedia_id = 'gpt2-small/8-res-jb'."
        )
    np_id = str(np_id).strip("/")
    if "/" not in np_id:
        raise NoNeuronpediaIdError(f"Neuronpedia id {np_id!r} is malformed: expected 'model/source', "
                                   f"e.g. 'gpt2-small/8-res-jb'.")
    return np_id


def _check_feature(sae: SAE | Any, feature: Any) -> int:
    try:
        index = int(feature)
    except (TypeError, ValueError):
        raise ValueError(f"Feature index must be an integer, got {feature!r}.") from None
    if index != feature and not (isinstance(feature, str) and feature.strip().isdigit()):
        raise ValueError(f"Feature index must be an integer, got {feature!r}.")
    d_sae = getattr(getattr(sae, "cfg", None), "d_sae", None)
    if index < 0 or (d_sae is not None and index >= d_sae):
        raise ValueError(f"Feature {index} is out of range for an SAE with d_sae={d_sae} (valid: 0..{d_sae - 1}).")
    return index


def neuronpedia_page_url(neuronpedia_id: str, feature: int | None = None) -> str:
    """`https://neuronpedia.org/{neuronpedia_id}`, the page of a source such as `gpt2-small/8-res-jb`, or with
    `feature` `…/{feature}`, that feature's dashboard. Every Neuronpedia page link nnsae writes comes from here."""
    url = f"{NEURONPEDIA_DOMAIN}/{str(neuronpedia_id).strip('/')}"
    return url if feature is None else f"{url}/{int(feature)}"


def neuronpedia_url(sae: SAE | Any, feature: int) -> str:
    """`https://neuronpedia.org/{neuronpedia_id}/{feature}`: the feature's dashboard on Neuronpedia."""
    return neuronpedia_page_url(neuronpedia_id(sae), _check_feature(sae, feature))


def neuronpedia_quick_list_url(sae: SAE | Any, features: Iterable[int], name: str = "temporary_list") -> str:
    """A Neuronpedia quick-list URL showing `features` of `sae` side by side under the title `name`."""
    np_id = neuronpedia_id(sae)
    model_id, source = np_id.split("/", 1)
    items = [{"modelId": model_id, "layer": source, "index": str(_check_feature(sae, f))} for f in features]
    if not items:
        raise ValueError("A Neuronpedia quick list needs at least one feature.")
    return (f"{NEURONPEDIA_DOMAIN}/quick-list/?name={urllib.parse.quote(name)}"
            f"&features={urllib.parse.quote(json.dumps(items))}")


def neuronpedia_feature_api_url(sae: SAE | Any, feature: int) -> str:
    """`https://neuronpedia.org/api/feature/{model}/{source}/{feature}`: the feature's JSON record (GET)."""
    return f"{NEURONPEDIA_DOMAIN}/api/feature/{neuronpedia_id(sae)}/{_check_feature(sae, feature)}"


def open_neuronpedia_feature_dashboard(sae: SAE | Any, index: int, open_browser: bool = True) -> str:
    """SAELens' name: open (and return) the feature's Neuronpedia page."""
    url = neuronpedia_url(sae, index)
    if open_browser:
        webbrowser.open(url)
    return url


def get_neuronpedia_quick_list(sae: SAE | Any, features: Iterable[int], name: str = "temporary_list",
                               open_browser: bool = True) -> str:
    """SAELens' name: open (and return) a quick list of `features`."""
    url = neuronpedia_quick_list_url(sae, features, name)
    if open_browser:
        webbrowser.open(url)
    return url


__all__ = ["NEURONPEDIA_DOMAIN", "NoNeuronpediaIdError", "get_neuronpedia_quick_list", "neuronpedia_feature_api_url",
           "neuronpedia_id", "neuronpedia_page_url", "neuronpedia_quick_list_url", "neuronpedia_url",
           "open_neuronpedia_feature_dashboard"]
