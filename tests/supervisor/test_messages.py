"""The worker -> master pipe messages: one codec, used by both ends."""
from __future__ import annotations

import pytest

from kickq_supervisor.messages import Finished, Started, decode, encode, encode_lines


@pytest.mark.parametrize("message", [
    Started("12", "3:1700000000000", 1234.5, 7.0, "email:send"),
    Started("12", "3:1700000000000", 1234.5, 0.25, "a name with  spaces"),
    Started("12", "3:1700000000000", 1234.5, 10.0, ""),
    Finished("12"),
    Finished("12", "success", 0.5, None),
    Finished("12", "fail", 0.5, 'ValueError: bad "quote"\nand a newline'),
    Finished("12", "success", 0.5, '{"n": 1}'),
    Finished("12", "success", 0.5, ""),
    Finished("12", "ghost", 10.001, "processing timed out"),
])
def test_every_message_comes_back_as_it_was_sent(message):
    line = encode(message)
    assert "\n" not in line
    assert decode(line) == message


def test_several_messages_go_in_one_write_of_lines():
    data = encode_lines([Finished("1", "success", 0.25, ""), Started("2", "1:1700000000000", 5.0, 10.0, "w")])
    assert data == b'F 1 success 0.250000 ""\nS 2 1:1700000000000 5.000000 10.0 w\n'


@pytest.mark.parametrize("line", ["", "X 1", "S 1 2", "S 1 2 notanumber 10", "F", "F 1 success x",
                                  "S", "F  "])
def test_a_line_that_is_no_message_is_ignored(line):
    assert decode(line) is None


def test_an_undecodable_payload_still_says_the_handler_returned():
    assert decode("F 7 success 0.002 {not json") == Finished("7", "success", 0.002, None)


def test_a_run_the_worker_ghosted_itself_carries_its_reason():
    line = encode(Finished("7", "ghost", 2.5, "processing timed out"))
    assert line == 'F 7 ghost 2.500000 "processing timed out"'
    assert decode(line) == Finished("7", "ghost", 2.5, "processing timed out")
