"""Generation after an image prompt, as plain functions over a MultimodalSession.

The prompt's token ids hold one run of image tokens per slice (runtimes/image_slicing.py lays
them out); each run's embeddings are that slice's vision-encoder output, every other position
is the token's own embedding, and the LLM prefills the whole sequence from embeddings, as
transformers' MiniCPM-V forward does. Decoding is then the text model's own.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from cpm_mobile.runtimes.multimodal import MultimodalSession


def image_token_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of the image token, in order."""
    runs, start = [], None
    for position, token in enumerate([*ids, None]):
        if token == image_token_id and start is None:
            start = position
        elif token != image_token_id and start is not None:
            runs.append((start, position))
            start = None
    return runs


def prompt_embeddings(session: MultimodalSession, ids: Sequence[int], image_token_id: int,
                      slices: Sequence[np.ndarray]) -> np.ndarray:
    """[T, hidden]: the tokens' embeddings with each image-token run replaced by its slice's features."""
    runs = image_token_runs(ids, image_token_id)
    if len(runs) != len(slices):
        raise ValueError(f"the prompt has {len(runs)} image-token runs for {len(slices)} image slices")
    embeddings = session.embed(np.asarray(ids, dtype=np.int64)).copy()
    for (start, end), pixels in zip(runs, slices):
        features = session.encode_image(pixels)
        if features.shape[0] != end - start:
            raise ValueError(f"a {pixels.shape[1]}x{pixels.shape[2]} slice gives {features.shape[0]} embeddings "
                             f"for a run of {end - start} image tokens")
        embeddings[start:end] = features
    return embeddings


def greedy_tokens(session: MultimodalSession, ids: Sequence[int], image_token_id: int,
                  slices: Sequence[np.ndarray], max_new_tokens: int, eos_ids: Sequence[int] = ()) -> Iterator[int]:
    """Greedy continuation of an image prompt, one token at a time (stops after an end-of-sequence id)."""
    session.reset()
    embeddings = prompt_embeddings(session, ids, image_token_id, slices)
    logits = session.forward_embeddings(embeddings, 0)
    position = len(ids)
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[-1]))
        yield token
        if token in eos_ids or position >= session.max_seq_len:
            return
        logits = session.forward(np.array([token], dtype=np.int64), position)
        position += 1
