"""Which store files a segment needs: its layers, plus the extras of the first and last spans."""

from __future__ import annotations

from common.model_store import EMBED_ROLE, HEAD_ROLE, TOKENIZER_PREFIX, Manifest, layer_role
from common.spans import Span


def roles_for_span(manifest: Manifest, span: Span) -> list[str]:
    roles = [layer_role(i) for i in span.layers()]
    if span.start == 0:
        roles.append(EMBED_ROLE)
        roles += [r for r in manifest.files if r.startswith(TOKENIZER_PREFIX)]  # the head tokenizes
    if span.end == manifest.num_layers:
        roles.append(HEAD_ROLE)
        if manifest.tied_embeddings:
            roles.append(EMBED_ROLE)
    return sorted(set(roles))
