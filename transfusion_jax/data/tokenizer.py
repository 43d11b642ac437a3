"""Sentencepiece tokenizer with the reserved ids of the batch contract: PAD, BOS, EOS, BOI, EOI.

Two ways to get one:
  * trained here (default: on shapes text, small vocab), with PAD=0, BOS=1, EOS=2, BOI=3, EOI=4
    and UNK=5, byte fallback and identity normalisation so that any UTF-8 text round-trips;
    saved as `tokenizer.model` in the workdir and reused from there;
  * loaded from a given `.model` (the Llama 2 tokenizer for paper runs). Specials the model
    lacks are appended as new ids after its last piece, in the order PAD, BOS, EOS, BOI, EOI
    (Llama 2: unk=0, bos=1, eos=2, so PAD=32000, BOI=32001, EOI=32002, vocab_size=32003).
    A model that already has control pieces `<boi>`/`<eoi>` and a pad id keeps them.
"""
from __future__ import annotations

import io
from typing import Iterable, Sequence

import sentencepiece as spm
from etils import epath

BOI_PIECE, EOI_PIECE = "<boi>", "<eoi>"
TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    """Text <-> ids. Picklable (Grain worker processes get a copy): it carries its model bytes."""

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        n = self._sp.get_piece_size()
        self.num_pieces = n
        extra = []  # appended specials, in order

        def existing_or_new(found: int) -> int:
            if found >= 0:
                return found
            extra.append(None)
            return n + len(extra) - 1

        self.pad_id = existing_or_new(self._sp.pad_id())
        self.bos_id = existing_or_new(self._sp.bos_id())
        self.eos_id = existing_or_new(self._sp.eos_id())
        self.boi_id = existing_or_new(self._control_piece(BOI_PIECE))
        self.eoi_id = existing_or_new(self._control_piece(EOI_PIECE))
        self.vocab_size = n + len(extra)
        self.special_ids = frozenset(
            (self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id))

    def _control_piece(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece and self._sp.is_control(i) else -1

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS/EOS (documents add those)."""
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; specials and appended ids are dropped."""
        keep = [int(i) for i in ids if int(i) not in self.special_ids and 0 <= int(i) < self.num_pieces]
        return self._sp.decode(keep)

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def save(self, path) -> None:
        """Writes the .model file (atomically: concurrent hosts may write the same path)."""
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp"
        tmp.write_bytes(self._proto)
        tmp.rename(path)

    def __getstate__(self):
        return {"model_proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])


def load_tokenizer(path) -> Tokenizer:
    path = epath.Path(path)
    if not path.exists():
        raise ValueError(f"data.tokenizer_model = {str(path)!r}: no such file; expected a sentencepiece .model")
    return Tokenizer(path.read_bytes())


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """BPE sentencepiece with our reserved ids. `vocab_size` is an upper bound: a small
    corpus (shapes) has fewer distinct pieces, so the hard limit is off."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=5,
        control_symbols=[BOI_PIECE, EOI_PIECE],  # ids 3, 4; never produced by encoding text
        byte_fallback=True,  # any UTF-8 encodes, no UNK
        normalization_rule_name="identity",  # decode(encode(s)) == s
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,  # deterministic: every host trains the same model
        minloglevel=2,
    )
    return Tokenizer(model.getvalue())


def get_tokenizer(config, workdir) -> Tokenizer:
    """The tokenizer for a data config: `data.tokenizer_model` if given; else the one in
    `workdir`; else train one (on shapes text, or on text of the configured sources) and save it."""
    if config.tokenizer_model:
        return load_tokenizer(config.tokenizer_model)
    path = epath.Path(workdir) / TOKENIZER_FILE
    if path.exists():
        return load_tokenizer(path)
    if config.tokenizer_train_source == "shapes":
        from transfusion_jax.data.shapes.text import text_corpus
        texts = text_corpus(config.shapes_seed, "train", config.tokenizer_train_documents)
    else:
        from transfusion_jax.data.sources import sample_texts
        texts = sample_texts(config, config.tokenizer_train_documents)
    tokenizer = train_tokenizer(texts, config.tokenizer_vocab_size)
    tokenizer.save(path)
    return tokenizer
