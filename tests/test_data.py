"""Batching: streams continue across steps, windows cover the split, cursors resume exactly."""

import numpy as np
import torch

from charloom.text.encode import open_ids, write_ids
from charloom.training.batches import StreamBatcher, WindowBatcher


def test_streams_continue_row_by_row():
    ids = np.arange(1000) % 251
    b = StreamBatcher(ids.astype(np.uint8), batch_size=4, seq_len=10, seed=0)
    x0, y0, first = b.next()
    x1, y1, _ = b.next()
    assert first and x0.shape == (4, 10)
    assert torch.equal(y0[:, :-1], x0[:, 1:])  # targets are inputs shifted by one
    assert torch.equal(x1[:, 0], y0[:, -1])  # row b of step 1 continues row b of step 0
    # rows are disjoint, contiguous pieces of the text
    assert (x0[1, 0] - x0[0, 0]) % 251 == b.stream_len % 251


def test_stream_epoch_covers_most_of_the_text_once():
    ids = np.arange(5000, dtype=np.int64)
    b = StreamBatcher(ids, batch_size=5, seq_len=20, seed=3)
    seen = []
    for _ in range(b.steps_per_epoch):
        x, y, _ = b.next()
        seen.append(y.reshape(-1))
    seen = torch.cat(seen)
    assert len(torch.unique(seen)) == len(seen)  # no target twice in an epoch
    assert len(seen) > 0.95 * len(ids)


def test_windows_stay_inside_the_split_and_cover_it():
    ids = np.arange(700, dtype=np.int64)
    b = WindowBatcher(ids, batch_size=16, seq_len=60, seed=0, step=3)
    starts = []
    for _ in range(b.steps_per_epoch):
        x, y, _ = b.next()
        assert int(y.max()) < 700
        starts += x[:, 0].tolist()
    assert sorted(starts) == list(range(0, 700 - 60, 3))


def test_cursor_resumes_the_same_batches():
    ids = (np.arange(3000) * 7 % 101).astype(np.uint8)
    for make in (lambda: StreamBatcher(ids, 4, 16, seed=5), lambda: WindowBatcher(ids, 8, 16, seed=5, step=2)):
        a = make()
        for _ in range(a.steps_per_epoch + 3):
            a.next()
        state = a.state_dict()
        expected = [a.next()[0] for _ in range(a.steps_per_epoch + 2)]
        b = make()
        b.load_state_dict(state)
        got = [b.next()[0] for _ in range(b.steps_per_epoch + 2)]
        assert all(torch.equal(e, g) for e, g in zip(expected, got))


def test_ids_round_trip_through_disk(tmp_path):
    ids = np.random.default_rng(0).integers(0, 300, 1234).astype(np.uint16)
    write_ids(ids, tmp_path / "ids.bin")
    assert np.array_equal(open_ids(tmp_path / "ids.bin", "uint16"), ids)
    assert not list(tmp_path.glob("*.tmp-*"))
