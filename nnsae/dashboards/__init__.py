"""Feature dashboards: a self-contained static site and a JSON export per SAE, built from one extraction pass.

    index = nnsae.dashboard(model, sae, dataset="offline", out="dash", features=range(100), n_tokens=200_000)
    # dash/index.html, dash/features/{i}.html, dash/features/{i}.json, dash/features.json, dash/schema.json,
    # dash/extraction/ (the nnsae.extract output the pages were built from; reused by a repeated call)

CLI: `nnsae dashboard --model smollm2 --sae PATH_OR_RELEASE:ID --dataset offline --tokens 200000 --features 0-99
--out dash/ [--from-extraction DIR]`.

Pages. `index.html`: the SAE (model, hook, widths, Neuronpedia id) and a table of the selected features (density,
max and mean activation, top activating tokens, top promoted tokens) that is searchable (feature number or token
text), sortable (click a header) and paginated (100 rows a page) by one inline script reading an inline JSON blob,
so 10k+ features stay fast; the state lives in the URL hash (`#sort=-density&q=the&page=2`).
`features/{i}.html` (no script at all): density, max/mean activation, an inline-SVG activation histogram (log-spaced
bins) with DENSITY, the top promoted/suppressed tokens and a histogram of the logit effects over the whole vocabulary
with the exact formula used (`nnsae.dashboards.logits`), the tokens the feature fires on most, the top activating
contexts and random samples from equal-count activation quantiles; every token is shaded by the activation and has a
tooltip with its text, id and activation; a Neuronpedia link when the SAE has a `neuronpedia_id`. Everything is
inline (CSS, SVG, JS), nothing is fetched, pages open from the file system; all data is HTML-escaped and a
Content-Security-Policy forbids any network access and any script but the index's own.

JSON (`schema.json` is the JSON Schema, `nnsae.dashboards.schema`; field names follow the Neuronpedia feature records
that SAEDashboard's Neuronpedia runner writes, where one exists). `features/{i}.json`, one per feature:

- `schema_version` (1); `modelId`, `layer`: the Neuronpedia model id and source id (the two halves of
  `neuronpedia_id`), else the model name and the SAE name; `index`; `sae`: the SAE's name; `neuronpedia_id`,
  `neuronpedia_url` (or null);
- `n_tokens`: tokens counted; `firing_count`: tokens with an activation > the extraction threshold (0);
  `frac_nonzero` = firing_count / n_tokens; `max_act`; `mean_act` (over firing tokens); `firings_in_shards`: the
  firings the shards hold (equal to firing_count unless the extraction kept only the top-k features per token);
- `freq_hist_data_bar_heights` / `_bar_values` / `_bin_edges`: the activation histogram between its first and last
  non-empty log-spaced bin (counts, geometric bin centres, edges); `freq_hist_underflow`/`_overflow`: positive
  activations below / at or above the shown edges;
- `logits_available`, `logit_method` (the formula, as on the page); `pos_str`/`pos_values`/`pos_token_ids` and
  `neg_str`/`neg_values`/`neg_token_ids`: the most promoted / suppressed tokens and their (vocabulary-centred)
  logit effects; `logits_hist_data_bar_heights`/`_bar_values`/`_bin_edges`: histogram of the effects on all tokens;
- `max_act_tokens`: the distinct tokens at the maximum of the top contexts, strongest first;
- `top_tokens[{token, token_id, count, mean_act, max_act}]`: the tokens it fires on most often;
- `activations[...]`: the contexts, top group first then quantiles from the highest: `group` ("top" | "quantile"),
  `quantile` ([lo, hi] share of the ranks, or null), `bin_min`/`bin_max` (activation range of the quantile),
  `bin_contains` (its share of the firings), `tokens` (text of each token; a character split over several byte
  tokens is on the token completing it, the others are ""), `token_ids`, `values` (this feature's activation on each
  token), `qualifying_token_index` (the token the context was selected for), `max_value`/`max_value_token_index`
  (largest activation in the window), `chunk_index`/`chunk_position` (where the qualifying token is in the
  extraction's token stream: global token index = chunk_index * context_size + chunk_position), `doc_id` /
  `doc_position` (document and position in it; -1 for BOS/separators).

Token strings in `pos_str`, `neg_str`, `max_act_tokens` and `top_tokens` are single tokens: their UTF-8 text, or
`<0xE6><0x97>`-style bytes for a fragment of a multi-byte character; special tokens as their piece (`<s>`).

`features.json`: `{schema_version, sae: {name, model, architecture, d_in, d_sae, hook_name, hook, neuronpedia_id},
extraction: {path, n_tokens, context_size, context_window, dataset, complete}, logit_method, features: [{index,
frac_nonzero, firing_count, max_act, mean_act, max_act_tokens, pos_str, neg_str, page, json}]}` (token strings here
are display forms: newline as ↵, tab as ⇥).
"""

from nnsae.dashboards.build import build_site, dashboard, feature_record
from nnsae.dashboards.data import ExtractionSource, FeatureData, parse_features
from nnsae.dashboards.logits import LogitEffectsUnavailable, LogitLens, logit_effects, logit_lens
from nnsae.dashboards.schema import SCHEMA, subschema
from nnsae.dashboards.tokens import TokenRenderer, display

__all__ = ["SCHEMA", "ExtractionSource", "FeatureData", "LogitEffectsUnavailable", "LogitLens", "TokenRenderer",
           "build_site", "dashboard", "display", "feature_record", "logit_effects", "logit_lens", "parse_features",
           "subschema"]

