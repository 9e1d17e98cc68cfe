import json

from handclip.model.tokenizer import build_clip_tokenizer, write_clip_tokenizer_files


def test_vocabulary_files_match_clip(tmp_path):
    write_clip_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 49152 - 256 - 2
    assert vocab["hand</w>"] == 2463


def test_tokenizer_lowercases_and_ends_words_like_clip(tmp_path):
    tokenizer = build_clip_tokenizer(tmp_path)
    ids = tokenizer("Dorsal RIGHT hand")["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407
    assert tokenizer.convert_ids_to_tokens(ids[1:-1])[-2:] == ["right</w>", "hand</w>"]
