import json
import math

import numpy as np
import pytest

from model.data import EvalSet, Loader, bits_per_char, check_tokenizer, permute, shard_set_id


class ArrayReader:
    """The shard reader's interface (manifest, num_tokens, read) over one in-memory array."""

    def __init__(self, tokens: np.ndarray, tokenizer_id: str = "tok-a", vocab_size: int = 1 << 16, chars: int | None = None):
        self.tokens = tokens
        self.num_tokens = len(tokens)
        self.reads = 0
        self.manifest = {
            "tokenizer_id": tokenizer_id,
            "vocab_size": vocab_size,
            "eot_id": 0,
            "dtype": str(tokens.dtype),
            "splits": {
                "train": {"tokens": len(tokens), "chars": chars or 2 * len(tokens)},
                "val": {"tokens": len(tokens), "chars": chars or 2 * len(tokens)},
            },
        }

    def read(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or length < 0 or offset + length > self.num_tokens:
            raise IndexError(f"[{offset}, {offset + length}) outside {self.num_tokens}")
        self.reads += 1
        return self.tokens[offset : offset + length]


def counting(n: int) -> ArrayReader:
    """Token i is i, so a window tells where it came from."""
    return ArrayReader(np.arange(n, dtype=np.uint32))


def test_permute_is_a_permutation_for_every_size_and_key():
    for n in (1, 2, 3, 5, 64, 100, 1000, 4097):
        for key in (0, 1, 12345):
            out = permute(np.arange(n), n, np.full(n, key, dtype=np.uint64))
            assert sorted(out.tolist()) == list(range(n)), (n, key)
    a = permute(np.arange(1000), 1000, np.full(1000, 1, dtype=np.uint64))
    b = permute(np.arange(1000), 1000, np.full(1000, 2, dtype=np.uint64))
    assert (a != b).mean() > 0.9  # different keys, different orders
    assert abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.2  # shuffled, not shifted


def test_windows_are_shifted_targets_and_in_range():
    reader = counting(10_000)
    loader = Loader(reader, seq_len=16, global_batch=8, seed=3, process_index=0, process_count=1)
    for step in range(0, 2000, 97):  # far past one epoch (624 windows / 8 = 78 steps)
        x, y = loader.batch(step)
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one token
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(16))  # contiguous windows
        assert x.min() >= 0 and y.max() < reader.num_tokens


def test_batches_are_a_function_of_seed_and_step_and_jump_equals_stepping():
    reader = counting(5_000)
    a = Loader(reader, 16, 4, seed=7, process_index=0, process_count=1)
    b = Loader(reader, 16, 4, seed=7, process_index=0, process_count=1)
    stepped = [next(a) for _ in range(30)]
    assert a.step == 30
    for step in (0, 5, 29):
        np.testing.assert_array_equal(b.batch(step)[0], stepped[step][0])  # jump straight to the step
    other = Loader(reader, 16, 4, seed=8, process_index=0, process_count=1)
    assert not np.array_equal(other.batch(5)[0], stepped[5][0])
    # prefetching yields the same batches
    fetched = list(b.prefetch(10, 20))
    assert [s for s, _, _ in fetched] == list(range(10, 20))
    for step, x, y in fetched:
        np.testing.assert_array_equal(x, stepped[step][0])
        np.testing.assert_array_equal(y, stepped[step][1])


def test_an_epoch_visits_every_window_once_then_reshuffles():
    seq_len, batch = 10, 5
    reader = counting(1 + 10 * 40)  # exactly 40 windows, no tokens left over
    loader = Loader(reader, seq_len, batch, seed=1, process_index=0, process_count=1)
    assert loader.windows == 40
    starts = [loader.window_starts(step) for step in range(16)]  # two epochs of 8 steps
    first, second = np.concatenate(starts[:8]), np.concatenate(starts[8:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == [10 * w for w in range(40)]
    assert first.tolist() != second.tolist()  # the second epoch has its own order
    assert loader.epoch(8) == 1.0


def test_leftover_tokens_shift_the_windows_per_epoch():
    reader = counting(1 + 10 * 20 + 7)  # 20 windows and 7 tokens to spare
    loader = Loader(reader, 10, 4, seed=0, process_index=0, process_count=1)
    assert (loader.windows, loader.leftover) == (20, 7)
    offsets = set()
    for epoch in range(12):
        starts = np.concatenate([loader.window_starts(s) for s in range(epoch * 5, epoch * 5 + 5)])
        offset = int(starts.min())
        assert sorted((starts - offset).tolist()) == [10 * w for w in range(20)]  # one shift per epoch
        assert 0 <= offset <= 7
        offsets.add(offset)
    assert len(offsets) > 1


def test_hosts_read_their_rows_of_one_global_batch():
    reader = counting(20_000)
    whole = Loader(reader, 8, 16, seed=2, process_index=0, process_count=1)
    for count in (2, 4):
        for step in (0, 3, 1000):
            parts = [Loader(reader, 8, 16, seed=2, process_index=i, process_count=count).batch(step)[0] for i in range(count)]
            assert parts[0].shape == (16 // count, 8)
            np.testing.assert_array_equal(np.concatenate(parts), whole.batch(step)[0])
    with pytest.raises(ValueError, match="not divisible"):
        Loader(reader, 8, 16, process_index=0, process_count=3)


def test_grad_accum_batches_split_each_micro_batch_across_hosts():
    reader = counting(20_000)
    flat = Loader(reader, 8, 12, seed=4, process_index=0, process_count=1).batch(5)[0]
    accum = Loader(reader, 8, 12, seed=4, grad_accum=3, process_index=0, process_count=1)
    x, y = accum.batch(5)
    assert x.shape == y.shape == (3, 4, 8)
    np.testing.assert_array_equal(x.reshape(12, 8), flat)  # the same rows, grouped in micro-batches
    hosts = [Loader(reader, 8, 12, seed=4, grad_accum=3, process_index=i, process_count=2).batch(5)[0] for i in range(2)]
    assert hosts[0].shape == (3, 2, 8)
    np.testing.assert_array_equal(np.concatenate(hosts, axis=1), x)


def test_state_round_trips_and_resumes_at_the_same_batch():
    reader = counting(5_000)
    loader = Loader(reader, 16, 4, seed=9, process_index=0, process_count=1)
    for _ in range(13):
        next(loader)
    state = loader.state()
    assert state["step"] == 13 and state["tokenizer_id"] == "tok-a" and state["shard_set"] == shard_set_id(reader.manifest)
    state = json.loads(json.dumps(state))  # it goes into a JSON checkpoint item
    resumed = Loader.from_state(reader, state, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(resumed)[0], next(loader)[0])
    # another host count resumes the same global batch
    halves = [Loader.from_state(reader, state, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.batch(13)[0] for h in halves]), resumed.batch(13)[0])


def test_restore_refuses_other_data_or_settings():
    reader = counting(5_000)
    state = Loader(reader, 16, 4, seed=0, process_index=0, process_count=1).state(step=3)
    with pytest.raises(ValueError, match=r"seq_len: saved 16, now 32"):
        Loader(reader, 32, 4, seed=0, process_index=0, process_count=1).restore(state)
    with pytest.raises(ValueError, match=r"global_batch: saved 4, now 8"):
        Loader(reader, 16, 8, seed=0, process_index=0, process_count=1).restore(state)
    other_shards = ArrayReader(np.arange(6_000, dtype=np.uint32))
    with pytest.raises(ValueError, match="shard_set"):
        Loader(other_shards, 16, 4, seed=0, process_index=0, process_count=1).restore(state)
    other_tok = ArrayReader(np.arange(5_000, dtype=np.uint32), tokenizer_id="tok-b")
    with pytest.raises(ValueError, match=r"tokenizer_id: saved 'tok-a', now 'tok-b'"):
        Loader.from_state(other_tok, state, process_index=0, process_count=1)


def test_tokenizer_and_vocabulary_mismatches_name_both_sides():
    reader = ArrayReader(np.arange(100, dtype=np.uint16), tokenizer_id="tok-a", vocab_size=32000)
    with pytest.raises(ValueError, match="tokenizer tok-a.*expects tokenizer tok-b"):
        Loader(reader, 8, 2, tokenizer_id="tok-b", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="32000 ids.*vocab_size 16000"):
        check_tokenizer(reader.manifest, "tok-a", 16000)
    check_tokenizer(reader.manifest, "tok-a", 32000)  # equal sizes fit


def test_too_few_tokens_for_one_window():
    with pytest.raises(ValueError, match="crawl more pages or lower seq_len"):
        Loader(counting(16), seq_len=16, global_batch=1, process_index=0, process_count=1)
    Loader(counting(17), seq_len=16, global_batch=1, process_index=0, process_count=1)  # exactly one window


def test_eval_set_is_fixed_first_windows_split_across_hosts():
    reader = counting(1 + 8 * 50)
    whole = EvalSet(reader, seq_len=8, batch_size=10, num_batches=3, process_index=0, process_count=1)
    assert len(whole) == 3
    xs = [x for x, _ in whole]
    np.testing.assert_array_equal(np.concatenate(xs)[:, 0], np.arange(30) * 8)  # the first 30 windows, in order
    for x, y in whole:
        np.testing.assert_array_equal(y, x + 1)
    reads = reader.reads
    list(whole)
    assert reader.reads == reads  # read once, then kept
    halves = [EvalSet(reader, 8, 10, 3, process_index=i, process_count=2) for i in range(2)]
    for b in range(3):
        np.testing.assert_array_equal(np.concatenate([h.batches()[b][0] for h in halves]), xs[b])
    # a small split: fewer and smaller batches, never an empty one
    small = EvalSet(counting(1 + 8 * 6), 8, 10, 4, process_index=0, process_count=1)
    assert (small.num_batches, small.batch_size) == (1, 6)
    # shorter than one window: all its tokens, one window
    short = EvalSet(counting(5), 8, 10, 4, process_index=0, process_count=1)
    assert short.batches()[0][0].shape == (1, 4)


def test_bits_per_char_from_nats_per_token():
    reader = ArrayReader(np.arange(1000, dtype=np.uint16), chars=2500)
    # 1000 tokens for 2500 characters: 0.4 tokens per character
    assert bits_per_char(2.0, reader.manifest, "val") == pytest.approx(2.0 * 0.4 / math.log(2))
    assert EvalSet(reader, 8, 4, 1, process_index=0, process_count=1).bits_per_char(math.log(2)) == pytest.approx(0.4)
