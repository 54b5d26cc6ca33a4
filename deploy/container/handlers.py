"""The example app's handlers (the image's CMD names this module)."""
import kickq

kq = kickq.Kickq()


@kq.process("report", {"concurrent_jobs": 2})
def report(job, data):
    # process_timeout 300 s (set per job by the producer) is the longest of this app: the stop
    # grace periods of compose.yaml and kubernetes.yaml are 330 s because of it.
    return {"rows": len(data.get("rows", []))}
