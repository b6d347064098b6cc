import pytest
from conftest import data_file, synthetic_corpus

from minillama.errors import MiniLlamaError
from minillama.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def test_trained_tokenizer_round_trips_text(tokenizer):
    text = "The old king finds 2024 apples — naïve café, 東京!\n  Two spaces."
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, bos=False, eos=True)[-1] == 2


def test_trained_tokenizer_is_llama_style(tmp_path):
    corpus = tmp_path / "years.txt"
    corpus.write_text(synthetic_corpus(1000) + "".join(f"In 1999 and 2024 the count was {i % 50} of 1999.\n" for i in range(2000)))
    tokenizer = train_tokenizer([corpus], 320, tmp_path / "years.model")
    assert tokenizer.vocab_size == 320
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("In 1999", bos=False)]
    assert pieces[-4:] == ["1", "9", "9", "9"]  # digits split, though "1999" is frequent enough to merge
    assert "<0xE6>" in [tokenizer.id_to_piece(i) for i in tokenizer.encode("東", bos=False)]  # byte fallback
    assert tokenizer.decode(tokenizer.encode("a  b\t\u00e9")) == "a  b\t\u00e9"  # no normalisation


def test_llama2_tokenizer_ids(test_data):
    tokenizer = Tokenizer(data_file(test_data, "llama2_tokenizer.model"))
    assert tokenizer.vocab_size == 32000 and tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    assert tokenizer.encode("I believe the meaning of life is", bos=False) == [306, 4658, 278, 6593, 310, 2834, 338]
    assert tokenizer.fingerprint == "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"


def test_environment_variable_names_the_tokenizer(tokenizer, monkeypatch):
    monkeypatch.setenv("MINILLAMA_TOKENIZER", str(tokenizer.path))
    assert load_tokenizer().fingerprint == tokenizer.fingerprint


def test_failed_download_says_how_to_pass_a_local_file(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.delenv("MINILLAMA_TOKENIZER", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(MiniLlamaError, match="pass tokenizer PATH to a tokenizer.model, or set MINILLAMA_TOKENIZER=PATH"):
        load_tokenizer()


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(MiniLlamaError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(MiniLlamaError, match="is not a SentencePiece model"):
        Tokenizer(junk)


def test_training_on_jsonl_and_bad_records(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text("".join(f'{{"text": "record number {i} says hello world"}}\n' for i in range(300)))
    assert train_tokenizer([good], 320, tmp_path / "j.model").decode(Tokenizer(tmp_path / "j.model").encode("hello")) == "hello"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(MiniLlamaError, match=r"bad.jsonl:2: not a JSON object with a 'text' field"):
        train_tokenizer([bad], 320, tmp_path / "b.model")
    assert not (tmp_path / "b.model").exists()


def test_too_small_a_vocabulary_is_explained_in_our_terms(tmp_path, corpus_file):
    with pytest.raises(MiniLlamaError, match=r"^vocab size 40 is too small for this text: .* need at least \d+; choose a vocab size of \d+ or more$"):
        train_tokenizer([corpus_file], 40, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
