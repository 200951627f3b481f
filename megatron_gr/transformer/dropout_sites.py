"""Which dropout of the model a keyed mask belongs to, and the keys a layer's dropout uses.

Every dropout site has its own id, so no two sites (or layers) share a mask:
``site = layer_number * SITES_PER_LAYER + kind`` with the global 1-based layer number
(pipeline stages count from their first layer's number); the input embedding is site 0.

A batch from the training loader carries the keys (``JaggedSeqParams.token_keys`` and
``dropout_seed``), and the masks do not depend on the layout. Under CUDA graphs the step's
stream words of every site come in a device table (``JaggedSeqParams.dropout_words``, see
:func:`dropout_word_table`), the same mask. A layer used on its own
(without them, e.g. in unit tests or megatron's transformer layer fed ``[s, b, C]``
tensors) keys its tokens by row number, with a seed drawn from the CPU generator: the
masks are then reproducible from that generator's state (recompute replays them), not
independent of how tokens are batched.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops.keyed_dropout import DropoutKeys
from megatron_gr.ops.pytorch.keyed_dropout import stream_words
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams

EMBEDDING = 0
STU_OUTPUT = 1
MHC_MERGE_ATTENTION = 2  # the merge after a transformer layer's attention
MHC_MERGE_MLP = 3
SITES_PER_LAYER = 4


def layer_site(layer_number: int, kind: int) -> int:
    """The site id of dropout ``kind`` (STU_OUTPUT, MHC_MERGE_*) of layer ``layer_number`` (>= 1)."""
    return layer_number * SITES_PER_LAYER + kind


def num_sites(num_layers: int) -> int:
    """Site ids of a model of ``num_layers`` layers: ``[0, num_sites)``."""
    return (num_layers + 1) * SITES_PER_LAYER


def dropout_word_table(seed: int, sites: int) -> torch.Tensor:
    """``[sites, 3]`` int64 (CPU): row s holds the stream words of site s for ``seed``
    (values in [0, 2^32), as the dropout ops compute them)."""
    return torch.tensor([stream_words(seed, site) for site in range(sites)], dtype=torch.int64)


def site_keys(
    params: Optional[JaggedSeqParams],
    site: int,
    *,
    num_tokens: int,
    device: torch.device,
    local: bool,
    feature_offset: int = 0,
) -> DropoutKeys:
    """The keys of dropout ``site`` over ``num_tokens`` tokens.

    Args:
        params: the batch's jagged metadata; its ``token_keys`` (``local_token_keys`` with
            ``local``) key the tokens when present.
        local: True between attention blocks (this rank's sequence-parallel slice), False
            where every token of the padded batch is present (attention and its output).
        feature_offset: global index of the first local feature (tensor-parallel slices).
    """
    keys = words = None
    if isinstance(params, JaggedSeqParams) and params.token_keys is not None:
        keys, seed = (params.local_token_keys if local else params.token_keys), params.dropout_seed
        if params.dropout_words is not None:
            if site >= params.dropout_words.shape[0]:
                raise ValueError(f"dropout site {site} is past the {params.dropout_words.shape[0]} rows of dropout_words")
            words = params.dropout_words[site]
    if keys is None:
        seed = int(torch.randint(0, 2**62, (1,)))  # the CPU generator: no device synchronisation
        keys = torch.arange(num_tokens, device=device)
    if keys.shape[0] != num_tokens:
        raise ValueError(f"the batch keys {keys.shape[0]} tokens but the layer holds {num_tokens}")
    return DropoutKeys(seed=seed, site=site, token_keys=keys, feature_offset=feature_offset, words=words)
