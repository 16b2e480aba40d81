"""The training data: MQAR sequences checked against a parse of the task's definition, packed text
against the files' bytes, the tokenizer folder path, and the learning-rate schedule."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mom_compile.train.data import IGNORE_INDEX, next_token_accuracy
from mom_compile.train.errors import TrainError
from mom_compile.train.mqar import Mqar
from mom_compile.train.optim import warmup_cosine
from mom_compile.train.text_data import PackedText, tokenize_files
from mom_compile.train.tokenizer import ByteTokenizer, FolderTokenizer, end_of_document, load_tokenizer

CPU = torch.device("cpu")


def check_mqar_row(ids: list[int], labels: list[int], vocab: int, pair_choices) -> int:
    """Parse one sequence by the definition; returns its number of pairs."""
    pairs = sum(1 for label in labels if label != IGNORE_INDEX)
    assert pairs in pair_choices
    keys, values = ids[0:2 * pairs:2], ids[1:2 * pairs:2]
    assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
    assert all(vocab // 2 <= v < vocab for v in values)
    assert all(label == IGNORE_INDEX for label in labels[:2 * pairs + 1])
    answer = dict(zip(keys, values))
    asked = []
    for t, label in enumerate(labels):
        if label != IGNORE_INDEX:
            assert (t - 2 * pairs) % 2 == 1, "an asked key sits at an even offset after the pairs"
            assert ids[t] == label == answer[ids[t - 1]]
            asked.append(ids[t - 1])
    assert sorted(asked) == sorted(keys), "every key is asked exactly once"
    return pairs


def test_mqar_sequences_follow_the_definition():
    task = Mqar(vocab_size=64, seq_len=64, pairs=(2, 8, 16), global_batch=48, seed=5)
    ids, labels = task.rows(3, 0, 48, CPU)
    assert ids.shape == labels.shape == (48, 64) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < 64
    counts = {check_mqar_row(i, lab, 64, (2, 8, 16)) for i, lab in zip(ids.tolist(), labels.tolist())}
    assert counts == {2, 8, 16}
    eval_ids, eval_labels = task.eval_set(8, 10, CPU)
    rows = zip(eval_ids.tolist(), eval_labels.tolist())
    assert eval_ids.shape[0] == 10 and {check_mqar_row(i, lab, 64, (8,)) for i, lab in rows} == {8}


def test_mqar_batches_are_a_function_of_seed_and_step():
    a = Mqar(256, 128, (8, 32), global_batch=8, seed=1)
    b = Mqar(256, 128, (8, 32), global_batch=8, seed=1)
    whole = a.rows(7, 0, 8, CPU)
    halves = [b.rows(7, 0, 4, CPU), b.rows(7, 4, 8, CPU)]  # two processes' slices of one global batch
    for i in range(2):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    assert not torch.equal(a.rows(8, 0, 8, CPU)[0], whole[0])
    assert not torch.equal(Mqar(256, 128, (8, 32), 8, seed=2).rows(7, 0, 8, CPU)[0], whole[0])
    assert not torch.equal(a.eval_set(8, 8, CPU)[0], Mqar(256, 128, (8,), 8, seed=1).rows(0, 0, 8, CPU)[0])


def test_mqar_refuses_impossible_settings():
    with pytest.raises(ValueError, match="seq-len >= 128"):
        Mqar(256, 64, (32,), 8, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        Mqar(16, 64, (8,), 8, 0)


def test_next_token_accuracy_counts_scored_positions():
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 1]])
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 3] = 1  # predicts labels[1] = 3: right
    logits[0, 2, 2] = 1  # predicts 2 for labels[3] = 1: wrong
    assert next_token_accuracy(logits, labels).tolist() == [1, 2]


def test_packed_text_is_the_files_bytes_in_a_seeded_order(tmp_path):
    (tmp_path / "a.txt").write_text("héllo, world\n")
    lines = [json.dumps({"text": "second doc"}), "", json.dumps({"text": "3rd", "id": 7})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    stream = [*"héllo, world\n".encode(), 2, *b"second doc", 2, *b"3rd", 2]
    data = PackedText(files, ByteTokenizer(), "text", seq_len=4, global_batch=3, seed=0, vocab_size=256,
                      eos_id=2)
    rows = [stream[i:i + 4] for i in range(0, len(stream) - 3, 4)]
    assert data.num_rows == len(rows) == len(stream) // 4
    seen = [data.rows(step, 0, 3, CPU)[0] for step in range(math.ceil(len(rows) / 3) * 2)]
    seen = torch.cat(seen).tolist()
    first_epoch, second_epoch = seen[:len(rows)], seen[len(rows):2 * len(rows)]
    assert sorted(first_epoch) == sorted(rows) == sorted(second_epoch)  # every row once per epoch
    assert first_epoch != second_epoch  # in a new order
    ids, labels = data.rows(1, 1, 3, CPU)
    assert torch.equal(ids, labels) and torch.equal(ids, data.rows(1, 0, 3, CPU)[0][1:])


def test_tokenizing_reports_its_progress(tmp_path):
    """Tokenizing says it starts, where it stands (here after every document: every_s=0) and what
    it read, with the token counts of what it returns."""
    for name, text in (("a.txt", "abc"), ("b.txt", "de")):
        (tmp_path / name).write_text(text)
    heard = []
    tokens = tokenize_files([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], ByteTokenizer(), "text", 2,
                            heard.append, every_s=0)
    assert tokens.tolist() == [*b"abc", 2, *b"de", 2]
    assert heard[0] == "tokenizing 2 file(s)..."
    assert heard[1].startswith("  4 tokens from 1 documents so far (file 1 of 2")
    assert heard[2].startswith("  7 tokens from 2 documents so far (file 2 of 2")
    assert heard[3].startswith("tokenized 7 tokens from 2 documents (") and len(heard) == 4


def test_tokenizer_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    loaded = load_tokenizer(str(tmp_path))
    assert (loaded.vocab_size, loaded.eos_token_id) == (4, 1)
    (tmp_path / "data.txt").write_text("hello world world hello")
    data = PackedText([str(tmp_path / "data.txt")], loaded, "text", seq_len=5, global_batch=1, seed=0,
                      vocab_size=8, eos_id=loaded.eos_token_id)
    assert data.rows(0, 0, 1, CPU)[0].tolist() == [[2, 3, 3, 2, 1]]


def test_compressed_or_binary_data_is_refused(tmp_path):
    """A gzip file passed as --data was read as text with replacement characters and trained on."""
    import gzip
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 50))
    with pytest.raises(TrainError, match="corpus.jsonl.gz' is not UTF-8 text .*decompress"):
        tokenize_files([str(path)], ByteTokenizer(), "text", 2)


def test_the_separator_between_documents():
    """The tokenizer's end-of-document id; bytes take the model's eos id (a control byte); a
    tokenizer folder without one joins documents as they are, never with one of its words."""
    folder = FolderTokenizer(lambda text: [1], 4, None, "words")
    assert end_of_document(folder, 2) is None
    assert end_of_document(ByteTokenizer(), 2) == 2
    assert end_of_document(ByteTokenizer(), [5, 2]) == 5  # a config.json list: its first id
    assert end_of_document(FolderTokenizer(lambda text: [1], 4, 3, "words"), 2) == 3


def test_warmup_then_cosine_to_the_floor():
    factor = warmup_cosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0) and factor(109) == pytest.approx(0.1)
    assert factor(59) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    decay = [factor(s) for s in range(10, 110)]
    assert all(x >= y for x, y in zip(decay, decay[1:]))
