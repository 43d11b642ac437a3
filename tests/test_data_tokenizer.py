"""Sentencepiece tokenizer: reserved ids, round trips, save/load, external models."""
import io
import pickle

import pytest
import sentencepiece as spm

from transfusion_jax.data.shapes import text as shapes_text
from transfusion_jax.data.config import get_data_config
from transfusion_jax.data.tokenizer import get_tokenizer, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapes_text.text_corpus(0, "train", 2000), 512)


def test_reserved_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id) == (0, 1, 2, 3, 4)
    assert 100 < tok.vocab_size <= 512
    ids = tok.encode("A small red circle in the top left. <boi> <eoi> <s> </s> <pad>")
    assert not set(ids) & {0, 1, 2, 3, 4}  # text never encodes to a special
    assert max(ids) < tok.vocab_size


@pytest.mark.parametrize("text", [
    "A small red circle in the top left. Question: How many shapes are there? Answer: two.",
    "Unseen words, ünïcödé, 日本語, emoji 🎉, tabs\tand  double  spaces\nnewlines.",
    "digits 0123456789 and <boi> literally",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_shapes_text_is_compact(tok):
    text = shapes_text.text_record(0, "heldout", 5)["text"]
    assert len(tok.encode(text)) < len(text) / 2.5  # words, not bytes


def test_decode_drops_specials(tok):
    ids = [tok.bos_id] + tok.encode("a red circle") + [tok.boi_id, tok.pad_id, tok.eoi_id, tok.eos_id]
    assert tok.decode(ids) == "a red circle"


def test_save_load_pickle_and_workdir(tok, tmp_path):
    tok.save(tmp_path / "t.model")
    again = load_tokenizer(tmp_path / "t.model")
    assert again.encode("a big blue square") == tok.encode("a big blue square")
    clone = pickle.loads(pickle.dumps(tok))  # what Grain worker processes receive
    assert clone.encode("a big blue square") == tok.encode("a big blue square")
    config = get_data_config(tokenizer_train_documents=500)
    first = get_tokenizer(config, tmp_path / "work")
    assert (tmp_path / "work" / "tokenizer.model").exists()
    second = get_tokenizer(config, tmp_path / "work")  # loaded, not retrained
    assert second.model_proto == first.model_proto
    with pytest.raises(ValueError, match="data.tokenizer_model"):
        get_tokenizer(get_data_config(tokenizer_model=str(tmp_path / "nope.model")), tmp_path)


def test_external_model_gets_specials_appended(tmp_path):
    """A Llama-2-like model: unk=0, bos=1, eos=2, no pad, no BOI/EOI."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(shapes_text.text_corpus(1, "train", 500)), model_writer=model,
        vocab_size=100, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "llama.model").write_bytes(model.getvalue())
    tok = get_tokenizer(get_data_config(tokenizer_model=str(tmp_path / "llama.model")), tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert (tok.pad_id, tok.boi_id, tok.eoi_id) == (100, 101, 102)
    assert tok.vocab_size == 103
    assert tok.decode([1] + tok.encode("a red square") + [101, 100, 102, 2]) == "a red square"


def test_trained_on_configured_sources(tmp_path):
    corpus = "\n".join(f"zebra quokka axolotl number {i}" for i in range(300))
    (tmp_path / "c.txt").write_text(corpus)
    config = get_data_config(text_source="text_files", text_files_path=str(tmp_path / "c.txt"),
                             image_source="none", tokenizer_train_source="sources")
    tok = get_tokenizer(config, tmp_path / "work")
    assert len(tok.encode("zebra quokka axolotl")) <= 4  # its words became pieces
    assert tok.decode(tok.encode("zebra quokka 17")) == "zebra quokka 17"
