"""New tokens on a pipeline (textual inversion, pivotal tuning): trained, or loaded with an adapter.

A token of n vectors is n tokenizer entries, TOKEN, TOKEN_1 ... TOKEN_{n-1}, as diffusers'
load_textual_inversion adds them, with one new row per entry in the token embedding of every text
encoder. The pipelines' encode_prompt expands TOKEN in a prompt into all of them
(TextualInversionLoaderMixin.maybe_convert_prompt), so imglora and diffusers encode a prompt alike.

While training, the rows are a separate parameter beside the untouched embedding matrix (NewTokens), so
the vocabulary cannot move, whatever the optimizer does.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ImgloraError
from ..formats.embeddings import Embeddings


def encoders(pipe) -> list[tuple[str, object, nn.Module]]:
    """(component, tokenizer, text encoder) of each text encoder: SD1/SD2 one, SDXL two."""
    out = [("text_encoder", pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.append(("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2))
    return out


def token_strings(token: str, vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def _rows(text_encoder) -> nn.Embedding:
    emb = text_encoder.get_input_embeddings()
    return emb.base if isinstance(emb, NewTokens) else emb


def check_tokens(pipe, embeddings: Embeddings, where: str | os.PathLike | None = None) -> None:
    """ImgloraError unless every token is new to every tokenizer and its vectors fit every text encoder."""
    comps = [c for c, _, _ in encoders(pipe)]
    for token, parts in embeddings.items():
        if sorted(parts) != sorted(comps):
            raise ImgloraError(f"embedding {token!r} has vectors for {' and '.join(sorted(parts))}, the model's text "
                               f"encoders are {' and '.join(comps)}", "use an adapter made for this base model",
                               path=where)
        n = parts["text_encoder"].shape[0]
        for component, tok, te in encoders(pipe):
            vocab = tok.get_vocab()
            taken = [s for s in token_strings(token, n) + [f"{token}_{n}"] if s in vocab or s + "</w>" in vocab]
            if taken:
                raise ImgloraError(f"the token {taken[0]!r} is already in the {component}'s tokenizer",
                                   "choose a made-up word for --train-embedding (or unload the adapter that "
                                   "brought it)", path=where)
            rows = _rows(te)
            if len(tok) != rows.num_embeddings:  # new ids must be the rows appended to the matrix
                raise ImgloraError(f"the {component}'s tokenizer has {len(tok)} tokens but its embedding "
                                   f"{rows.num_embeddings} rows", "use a model whose tokenizer fits its text encoder",
                                   path=where)
            if parts[component].shape[1] != rows.embedding_dim:
                raise ImgloraError(f"embedding {token!r} has {parts[component].shape[1]}-wide vectors for the "
                                   f"{component}, which takes {rows.embedding_dim}",
                                   "use an adapter made for this base model", path=where)


def _add_strings(pipe, strings: list[str]) -> None:
    done = set()
    for _, tok, _ in encoders(pipe):
        if id(tok) not in done:  # SDXL pipelines may share one tokenizer between the encoders
            tok.add_tokens(strings)
            done.add(id(tok))


def add_tokens(pipe, embeddings: Embeddings, where: str | os.PathLike | None = None) -> None:
    """Put the tokens on the pipeline: tokenizer entries and appended embedding rows, as diffusers'
    load_textual_inversion does (but without resize_token_embeddings, which draws random rows)."""
    check_tokens(pipe, embeddings, where)
    for token, parts in embeddings.items():
        strings = token_strings(token, parts["text_encoder"].shape[0])
        _add_strings(pipe, strings)
        for component, tok, te in encoders(pipe):
            old = te.get_input_embeddings()
            weight = torch.cat([old.weight.detach(), parts[component].to(old.weight)])
            te.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=old.padding_idx))
            te.config.vocab_size = weight.shape[0]


def remove_tokens(pipe, tokens: list[str]) -> None:
    """Take tokens put on by add_tokens off again (an adapter unloaded): tokenizer entries and rows."""
    if not tokens:
        return
    first = encoders(pipe)[0][1]
    strings = [s for t in tokens for s in token_strings(t, _vector_count(first, t))]
    pairs = [(tok, te, tok.convert_tokens_to_ids(strings)) for _, tok, te in encoders(pipe)]  # before any change
    done = set()
    for tok, te, ids in pairs:
        if id(tok) not in done:
            # diffusers' own unloading edits the tokenizer (slow and fast kinds) and drops this encoder's rows
            pipe.unload_textual_inversion(strings, tokenizer=tok, text_encoder=te)
            done.add(id(tok))
        else:  # an encoder sharing that tokenizer: drop the same rows
            old = te.get_input_embeddings()
            keep = torch.ones(old.num_embeddings, dtype=torch.bool)
            keep[ids] = False
            te.set_input_embeddings(nn.Embedding.from_pretrained(old.weight.detach()[keep], freeze=True))
        te.config.vocab_size = te.get_input_embeddings().num_embeddings


def _vector_count(tok, token: str) -> int:
    added = tok.get_added_vocab()
    n = 1
    while f"{token}_{n}" in added:
        n += 1
    return n


class NewTokens(nn.Module):
    """A token embedding with trainable rows after the frozen ones: ids below `start` read the original
    matrix, the rest read `vectors`."""

    def __init__(self, base: nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.start = base.num_embeddings
        self.vectors = nn.Parameter(vectors.detach().float().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.start - 1))
        new = self.vectors[(ids - self.start).clamp(min=0)].to(out.dtype)
        return torch.where((ids >= self.start)[..., None], new, out)


def init_vectors(pipe, word: str, vectors: int) -> dict[str, torch.Tensor]:
    """{component: (vectors, width)}, each row a copy of `word`'s embedding in that text encoder."""
    out = {}
    for component, tok, te in encoders(pipe):
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ImgloraError(f"--embedding-init {word!r} is {len(ids)} tokens for the {component}'s tokenizer, "
                               "not one", "choose a word the tokenizer knows whole (a common word)")
        out[component] = _rows(te).weight.detach()[ids[0]].float().cpu().repeat(vectors, 1)
    return out


def add_trainable(pipe, token: str, vectors: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Add `token` with trainable vectors (start values `vectors`, from init_vectors or a checkpoint);
    returns {component: its parameter}."""
    check_tokens(pipe, {token: vectors})
    _add_strings(pipe, token_strings(token, vectors["text_encoder"].shape[0]))
    params = {}
    for component, _, te in encoders(pipe):
        layer = NewTokens(te.get_input_embeddings(), vectors[component]).to(te.device)
        te.set_input_embeddings(layer)
        params[component] = layer.vectors
    return params


def mentions(pipe, token: str, captions: list[str]) -> int:
    """How many captions the tokenizer reads `token` in (a token no caption has would never train)."""
    tok = pipe.tokenizer
    return sum(token in tok.tokenize(c) for c in captions)
