"""The drop-oldest buffer between the UART and a possibly stalled sink."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from runphi.console.bytequeue import DropOldestQueue

operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.binary(max_size=40)),
        st.tuples(st.just("consume"), st.integers(min_value=0, max_value=50)),
    ),
    max_size=60,
)


@given(limit=st.integers(min_value=1, max_value=64), ops=operations)
def test_behaves_like_the_newest_bytes_of_the_stream(limit, ops):
    queue = DropOldestQueue(limit)
    model = b""
    pushed = consumed = dropped = 0
    for op, arg in ops:
        if op == "push":
            pushed += len(arg)
            model += arg
            lost = max(0, len(model) - limit)
            assert queue.push(arg) == lost
            dropped += lost
            model = model[lost:]
        else:
            count = min(arg, len(queue))  # may span several pushed chunks
            head = bytes(queue.peek())
            assert head == model[: len(head)]  # the oldest kept bytes, in order
            queue.consume(count)
            consumed += count
            model = model[count:]
        assert len(queue) == len(model) <= limit
        assert bytes(queue.peek()) == model[: len(queue.peek())]
        assert (len(queue.peek()) > 0) == (len(model) > 0)
    assert pushed == consumed + dropped + len(queue)
    assert queue.clear() == len(model) and len(queue) == 0


def test_a_chunk_larger_than_the_limit_keeps_its_tail():
    queue = DropOldestQueue(4)
    assert queue.push(b"ab") == 0
    assert queue.push(b"0123456789") == 8
    assert bytes(queue.peek()) == b"6789"


def test_consuming_more_than_queued_is_a_bug():
    queue = DropOldestQueue(8)
    queue.push(b"abc")
    with pytest.raises(ValueError):
        queue.consume(4)


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        DropOldestQueue(0)
