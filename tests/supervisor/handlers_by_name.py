"""A handler module given to the supervisor by dotted name (tests.supervisor.handlers_by_name)."""
import kickq


def echo(job, data):
    return data


kickq.Kickq().process("by-name", echo)
