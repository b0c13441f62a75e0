"""A tiny but complete llama-architecture GGUF that llama.cpp can load and generate from.

Written with the `gguf` package's own writer: every hyperparameter llama.cpp requires for the
`llama` architecture, an SPM ("llama") tokenizer with the 256 byte-fallback tokens, the three
special tokens and a few hundred word pieces, and every tensor of a llama model with float32
values from `numpy.random.default_rng(seed)`. The same seed always gives the same bytes.

The weights are random, so the text is nonsense, but they are scaled so that the residual
stream, the attention and the logits stay in a sensible range: greedy decoding then depends on
the prompt and walks through varied tokens instead of repeating one.
"""

from __future__ import annotations

import os
import pathlib

import gguf
import numpy as np

SPACE = "\u2581"  # SentencePiece's word-boundary marker

# Words whose pieces (every prefix of "▁word" from two characters on) go into the vocabulary,
# so SPM's pairwise merges can reach the whole word from its characters.
_WORDS = """
the of and to in is was for that on with as by at from his her he she it they we you this
an be are or not but had have has were which their one all there been would when who will
more no if out so said what up its about into than them can only other new some could time
these two may then do first any my now such like our over man me even most made after also
did many before must through back years where much your way well down should because each
just those people how too little state good very make world still own see men work long get
here between both life being under never day same another know while last might us great old
year off come since against go came right used take three hello model file mount cache fuse
llama token read chunk blob verified lazy cold warm registry layer digest byte block page
""".split()

_PUNCT = list(" .,;:!?'\"-()[]{}<>/\\@#$%^&*_=+~`|0123456789")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
    seen = set(tokens)
    pieces: list[str] = []

    def piece(text: str) -> None:
        if text not in seen:
            seen.add(text)
            pieces.append(text)

    # single characters first: SPM starts from characters and merges pairs that are pieces
    for ch in SPACE + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        piece(ch)
    for ch in _PUNCT:
        if ch != " ":
            piece(ch)
    for word in _WORDS:
        full = SPACE + word
        for end in range(2, len(full) + 1):
            piece(full[:end])
        for end in range(2, len(word) + 1):
            piece(word[:end])
    for i, text in enumerate(pieces):
        tokens.append(text)
        types.append(gguf.TokenType.NORMAL)
        # SPM merges the highest-scoring pair first: longer pieces win, ties by order
        scores.append(float(len(text)) - i / (10 * len(pieces)))
    return tokens, scores, [int(t) for t in types]


def _name(tensor: gguf.MODEL_TENSOR, block: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=block) if block is not None else base) + ".weight"


def make_tiny_llama(
    path: os.PathLike | str,
    *,
    seed: int = 0,
    n_embd: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 256,
    n_ctx_train: int = 512,
    name: str = "modelfs-tiny-llama",
) -> pathlib.Path:
    """Write the model to `path` and return it (about 2.3 MB with the defaults)."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    path = pathlib.Path(path)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def norm_weight() -> np.ndarray:
        # around 1, not exactly 1, so the norms do something and differ between seeds
        return (1.0 + 0.1 * rng.standard_normal(n_embd, dtype=np.float32)).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")  # writes general.architecture itself
    try:
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_vocab_size(n_vocab)
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(10000.0)

        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)

        # numpy shapes are (rows, cols); GGUF stores them reversed, which is llama.cpp's
        # {n_in, n_out} for every matrix.
        T = gguf.MODEL_TENSOR
        writer.add_tensor(_name(T.TOKEN_EMBD), normal((n_vocab, n_embd), 1.0))
        for b in range(n_layer):
            writer.add_tensor(_name(T.ATTN_NORM, b), norm_weight())
            writer.add_tensor(_name(T.ATTN_Q, b), normal((n_head * head_dim, n_embd), n_embd ** -0.5))
            writer.add_tensor(_name(T.ATTN_K, b), normal((n_head_kv * head_dim, n_embd), n_embd ** -0.5))
            writer.add_tensor(_name(T.ATTN_V, b), normal((n_head_kv * head_dim, n_embd), n_embd ** -0.5))
            writer.add_tensor(_name(T.ATTN_OUT, b), normal((n_embd, n_head * head_dim), (n_embd * n_layer) ** -0.5))
            writer.add_tensor(_name(T.FFN_NORM, b), norm_weight())
            writer.add_tensor(_name(T.FFN_GATE, b), normal((n_ff, n_embd), n_embd ** -0.5))
            writer.add_tensor(_name(T.FFN_UP, b), normal((n_ff, n_embd), n_embd ** -0.5))
            writer.add_tensor(_name(T.FFN_DOWN, b), normal((n_embd, n_ff), (n_ff * n_layer) ** -0.5))
        writer.add_tensor(_name(T.OUTPUT_NORM), norm_weight())
        # logits of a unit-RMS hidden state with std ~4: peaked enough for a clear argmax,
        # spread enough that the argmax moves with the context
        writer.add_tensor(_name(T.OUTPUT), normal((n_vocab, n_embd), 4.0 * n_embd ** -0.5))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
