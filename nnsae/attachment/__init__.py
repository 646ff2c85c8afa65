"""Running SAEs inside Hugging Face models wrapped by nnsight.

One package, its parts one file each:

- `splice`: the one splice computation (`splice_activation`) and the inline, remote-friendly `splice()`;
- `mount`: `attach`/`detach`/`attached`, mounting an SAE as a traced submodule (`SAESplice`);
- `handle`: `SAEHandle`, an attached SAE's hook points, steering and removal;
- `helpers`: the HookedSAETransformer-style `saes`, `steer`, `run_with_saes`, `run_with_cache`,
  `run_with_cache_with_saes`, `run_with_hooks_with_saes`, `feature_attribution`;
- `prompt`: `test_prompt`, TransformerLens' `utils.test_prompt` report;
- `transcoders`: transcoder sets and cross-layer transcoders as one SAE per layer (`layer_saes`,
  `attach_transcoders`, `splice_transcoders`).

Where an SAE sits comes from the one hook resolver (`nnsae.hooks.resolve_hook`); every nnsight/torch internal this
needs is in `nnsae.seam`.

    with model.trace(prompt):
        h = nnsae.attach(model, sae)                    # attached for this trace only
        feats = h.hook_sae_acts_post.output.save()
        h.hook_sae_acts_post.output[:, :, 3] = 0        # ablate; the model continues from the edited reconstruction
        logits = model.output.logits.save()

For NDIF (remote) runs, call `splice` inside the trace body instead: it mounts nothing, so only the SAE and the body
travel (nnsae registers itself with `nnsight.register` so its code ships by value).
"""

import nnsight

from nnsae.attachment.handle import SAEHandle
from nnsae.attachment.helpers import (Hook, feature_attribution, lm_loss, run_with_cache, run_with_cache_with_saes,
                                  run_with_hooks_with_saes, run_with_saes, saes, steer)
from nnsae.attachment.mount import SAESplice, attach, attached, detach
from nnsae.attachment.prompt import test_prompt
from nnsae.attachment.splice import splice, splice_activation
from nnsae.attachment.transcoders import (LayerTranscoder, TranscoderAttachment, attach_transcoders, layer_saes,
                                          splice_transcoders)
from nnsae.seam import SAEOrderError

__all__ = ["Hook", "LayerTranscoder", "SAEHandle", "SAEOrderError", "SAESplice", "TranscoderAttachment", "attach",
           "attach_transcoders", "layer_saes", "splice_transcoders", "attached", "detach", "feature_attribution",
           "lm_loss", "run_with_cache", "run_with_cache_with_saes", "run_with_hooks_with_saes", "run_with_saes", "saes",
           "splice", "splice_activation", "steer", "test_prompt"]

# Ship nnsae's code by value in remote requests (a pip-installed package is not auto-registered by nnsight).
nnsight.register("nnsae")
