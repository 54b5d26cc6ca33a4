"""Handlers for the log-format tests: one that answers, one that runs past any process_timeout.
The reaper writes a vitals line every 0.3 s, so that it logs something soon."""
import time

import kickq

kickq.config(vitals_interval=0.3)


def answer(job, data):
    return data


def hang(job, data):
    while True:
        time.sleep(1)


kq = kickq.Kickq()
kq.process("logs.answer", answer)
kq.process("logs.hang", hang)
