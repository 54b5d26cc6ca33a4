"""Handlers for `make demo`. A supervisor imports this module: each process() call registers one."""
import time

import kickq

kq = kickq.Kickq()


@kq.process("email:send", {"concurrent_jobs": 2})
def send_email(job, data):
    time.sleep(0.05)  # pretend to talk to an SMTP server
    return {"sent_to": data["to"]}


@kq.process("flaky")
def flaky(job, data):
    # Fails on its first two runs, then succeeds: retries in action.
    if len(job.runs) < 3:
        raise ConnectionError(f"upstream not ready (run {len(job.runs)})")
    return "third time lucky"


@kq.process("runaway")
def runaway(job, data):
    while True:  # never returns: the supervisor kills it at its process_timeout
        time.sleep(1)


@kq.process("resize", {"concurrent_jobs": 1})
async def resize(job, data):
    return {"width": data["width"] // 2, "height": data["height"] // 2}


@kq.process("heartbeat")
def heartbeat(job, data):
    return {"tick": job.tick}  # the tick (epoch ms) this run belongs to
