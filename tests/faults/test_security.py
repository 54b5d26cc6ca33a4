"""Case 10: security. A least-privilege ACL user, TLS with a test CA, a wrong password, and hostile
job data written straight into Redis."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import redis

import kickq
from kickq.keys import Keys
from tests.faults.harness import Case, Monitor, handler_module, outcomes, sizes, wait_settled
from tests.helpers import free_port, make_certs, redis_server_binary, wait_until

REPO = Path(__file__).resolve().parents[2]


def kickq_cli(url: str, namespace: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KICKQ_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "kickq.cli", "--redis-url", url, "--redis-namespace", namespace, *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def aio_round_trip(url: str, namespace: str) -> str:
    """Create a hotjob with the asyncio client and wait for its result."""
    import kickq.aio

    async with kickq.aio.Kickq(redis_url=url, redis_namespace=namespace) as kq:
        job = await kq.create("acl", {"ref": "aio", "do": "echo"}, {"hotjob": True, "hotjob_timeout": 20})
        done = await asyncio.wait_for(job.hotjob_promise, 20)
        return f"{(await kq.get(job.id)).state} {done.result}"


# --- 10a: ACL ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case10a_acl_user_restricted_to_its_namespace(
    size, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    case = Case(
        "10a",
        "ACL user restricted to its namespace's keys and channels, no dangerous commands",
        "ACL: ~{ns}:* &{ns}:* +@all -@dangerous (so no KEYS, INFO, FLUSHALL, CONFIG, CLIENT KILL ...)",
    )
    rp = redis_procs()
    admin = rp.client()
    user, password = "tenant", "tenant-pw-93d1"
    pattern = "{" + namespace + "}:*"
    admin.acl_setuser(
        user,
        enabled=True,
        passwords=["+" + password],
        keys=[pattern],
        channels=[pattern],
        commands=["+@all", "-@dangerous"],
    )
    admin.set("{other}:secret", "untouched")  # another tenant's data
    admin.config_resetstat()
    url = f"redis://{user}:{password}@127.0.0.1:{rp.port}/0"
    module = handler_module(tmp_path, ledger.path, [(["acl"], 2)])
    sup = start_supervisor(
        module, args=["--reaper-interval", "0.2"], workers=2, url=url, ns=namespace, wait=False
    )
    kq = kickq.Kickq(redis_url=url, redis_namespace=namespace)
    steps: dict[str, object] = {}
    try:
        sup.wait_ready(2, timeout=20)
        with Monitor(rp.url, namespace, interval=0.5) as monitor:
            hot = kq.create("acl", {"ref": "hot", "do": "echo"}, {"hotjob": True, "hotjob_timeout": 20})
            steps["hotjob result"] = hot.hotjob_promise.result(timeout=20).result
            delayed = kq.create("acl", {"ref": "delayed"}, {"delay": 0.3})
            ghosted = kq.create(
                "acl", {"ref": "ghost", "do": "hang"}, {"process_timeout": 0.5, "ghost_count": 0}
            )
            retried = kq.create(
                "acl",
                {"ref": "retry", "do": "unknown"},
                {"retry": True, "retry_count": 1, "retry_interval": 0.1},
            )
            purged = kq.create("acl", {"ref": "purged"}, {"purge_timeout": 0.2})
            deleted = kq.create("acl", {"ref": "deleted"}, {"delay": 3600})
            steps["delete"] = kq.delete(deleted.id)
            sid = kq.schedule("acl", every=0.5, data={"ref": "tick"}, schedule_id="ticker")
            wait_settled(rp.client(), namespace, [delayed.id, ghosted.id, retried.id], timeout=20, idle=False)
            wait_until(lambda: any(e.ref == "tick" for e in ledger.read()), timeout=10, message="a tick ran")
            steps["unschedule"] = kq.unschedule(sid)
            wait_until(lambda: not admin.exists(Keys(namespace).job(purged.id)), timeout=10, message="purged")
            steps["states"] = {
                name: kq.get(job.id).state
                for name, job in (("delayed", delayed), ("ghost", ghosted), ("retry", retried))
            }
            steps["stats"] = kq.stats()["total"]["states"]
            steps["asyncio client"] = asyncio.run(aio_round_trip(url, namespace))
            steps["events"] = sum(1 for _ in kq.events(since="0", timeout=0.2))
            cli_stats = kickq_cli(url, namespace, "stats")
            cli_doctor = kickq_cli(url, namespace, "doctor")
            monitor.check_now("final: ")
    finally:
        kq.close()
    denied = admin.acl_log()
    commandstats = admin.info("commandstats")
    used_keys = {
        name for name in commandstats if name in ("cmdstat_keys", "cmdstat_flushall", "cmdstat_flushdb")
    }
    case.note(f"steps: {steps}")
    case.note(
        f"kickq stats exit {cli_stats.returncode}, kickq doctor exit {cli_doctor.returncode}; "
        f"ACL log entries {len(denied)}: {[(e.get('reason'), e.get('object')) for e in denied][:5]}"
    )
    case.check(
        "the life cycle runs: hotjob, delayed, ghost, retry, purge, delete, schedule, stats, events, "
        "the asyncio client",
        steps.get("hotjob result") == "hot"
        and steps.get("states") == {"delayed": "success", "ghost": "fail", "retry": "fail"}
        and steps.get("delete") is True
        and steps.get("unschedule") is True
        and steps.get("events", 0) > 0,
        steps.get("states"),
    )
    case.check(
        "the kickq admin command works as that user (stats, doctor)",
        cli_stats.returncode == 0 and cli_doctor.returncode == 0,
        (cli_stats.stderr + cli_doctor.stderr)[-300:],
    )
    refused = {(e.get("reason"), e.get("object")) for e in denied}
    case.check(
        "no NOPERM in the life cycle: the server refused nothing but kickq's INFO version probe "
        "(answered by HELLO instead), and no process saw a permission error",
        refused <= {("command", "info")}
        and "NOPERM" not in sup.log()
        and "no permissions" not in sup.log()
        and "Traceback" not in sup.log(),
        refused,
    )
    case.check("no KEYS (nor FLUSHALL/FLUSHDB) was ever called", not used_keys, used_keys)
    case.check("another tenant's key is untouched", admin.get("{other}:secret") == "untouched")
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.done()


# --- 10b: TLS ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case10b_tls_with_a_test_ca(size, ledger, start_supervisor, namespace, tmp_path):
    case = Case(
        "10b",
        "TLS only (rediss://) with a test CA",
        "redis-server --port 0 --tls-port; the supervisor and the producer verify the server against the CA",
    )
    certs = make_certs(tmp_path / "certs")
    port = free_port()
    workdir = tmp_path / "redis-tls"
    workdir.mkdir()
    log = open(workdir / "redis.log", "wb")
    server = subprocess.Popen(
        [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(certs["server.crt"]),
            "--tls-key-file",
            str(certs["server.key"]),
            "--tls-ca-cert-file",
            str(certs["ca.crt"]),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"rediss://127.0.0.1:{port}/0"
    ca = {"ssl_ca_certs": str(certs["ca.crt"])}
    try:
        admin = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, **ca)

        def up() -> bool:
            try:
                return bool(admin.ping())
            except redis.exceptions.ConnectionError:
                return False

        wait_until(lambda: server.poll() is not None or up(), timeout=10, message="TLS redis-server up")
        assert server.poll() is None, (workdir / "redis.log").read_text()
        module = handler_module(tmp_path, ledger.path, [(["tls"], 1)], config={"redis_options": ca})
        start_supervisor(module, args=["--reaper-interval", "0.2"], workers=1, url=url, ns=namespace)
        with kickq.Kickq(redis_url=url, redis_namespace=namespace, redis_options=ca) as kq:
            hot = kq.create("tls", {"ref": "hot", "do": "echo"}, {"hotjob": True, "hotjob_timeout": 20})
            hot_result = hot.hotjob_promise.result(timeout=20).result
            delayed = kq.create("tls", {"ref": "delayed"}, {"delay": 0.2})
            wait_settled(admin, namespace, [delayed.id], timeout=20)
            delayed_state = kq.get(delayed.id).state
        failures = {}
        for label, settings in (
            (
                "a certificate from another CA",
                {"redis_url": url, "redis_options": {"ssl_ca_certs": str(certs["other.crt"])}},
            ),
            ("no CA given (system store)", {"redis_url": url}),
            ("plain redis:// to the TLS port", {"redis_url": f"redis://127.0.0.1:{port}/0"}),
        ):
            started = time.monotonic()
            try:
                with kickq.Kickq(redis_namespace=namespace, redis_timeout=3, **settings) as other:
                    other.create("tls", {"ref": "must not exist"})
                failures[label] = ("created!", 0.0)
            except kickq.KickqError as exc:
                failures[label] = (f"{type(exc).__name__}: {str(exc)[-90:]}", time.monotonic() - started)
    finally:
        server.terminate()
        server.wait(timeout=10)
    case.note(f"hotjob result {hot_result!r}, delayed job {delayed_state}")
    for label, (error, took) in failures.items():
        case.note(f"{label}: {error} after {took:.2f}s")
    case.check(
        "the whole life cycle over TLS: a hotjob's result, a delayed job via the reaper",
        hot_result == "hot" and delayed_state == "success",
    )
    case.check(
        "a server certificate from another CA is refused (certificate verify failed), within redis_timeout",
        "certificate verify failed" in failures["a certificate from another CA"][0]
        and failures["a certificate from another CA"][1] <= 3.5,
        failures["a certificate from another CA"],
    )
    case.check(
        "no CA, or plain redis:// to the TLS port: RedisUnavailable within redis_timeout",
        all(
            failures[k][0].startswith("RedisUnavailable") and failures[k][1] <= 3.5
            for k in ("no CA given (system store)", "plain redis:// to the TLS port")
        ),
    )
    case.done()


# --- 10c: wrong password --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case10c_wrong_password_fails_fast_without_printing_it(
    size, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    case = Case("10c", "wrong password", "requirepass set; the password given is wrong")
    rp = redis_procs()
    rp.client().config_set("requirepass", "the-right-one-5b1f")
    wrong = "Wr0ng-s3cret-77c2"
    url = f"redis://:{wrong}@127.0.0.1:{rp.port}/0"
    acl_url = f"redis://someone:{wrong}@127.0.0.1:{rp.port}/0"
    results = {}
    for label, u in (("password", url), ("user and password", acl_url)):
        started = time.monotonic()
        try:
            kickq.Kickq(redis_url=u, redis_namespace=namespace).create("a")
            results[f"client, {label}"] = ("created!", 0.0, "")
        except kickq.KickqError as exc:
            text = "".join(traceback.format_exception(exc))
            results[f"client, {label}"] = (type(exc).__name__, time.monotonic() - started, text)
    started = time.monotonic()
    cli = kickq_cli(url, namespace, "stats")
    results["kickq stats"] = (f"exit {cli.returncode}", time.monotonic() - started, cli.stdout + cli.stderr)
    module = handler_module(tmp_path, ledger.path, [(["a"], 1)])
    started = time.monotonic()
    sup = start_supervisor(module, url=url, ns=namespace, wait=False)
    code = sup.wait_exit(timeout=20)
    results["kickq-supervisor"] = (f"exit {code}", time.monotonic() - started, sup.log())
    for label, (what, took, text) in results.items():
        case.note(
            f"{label}: {what} after {took:.2f}s: "
            f"{text.strip().splitlines()[-1][:110] if text.strip() else ''}"
        )
    case.check(
        "clients fail fast (< 1 s) with RedisUnavailable",
        all(
            results[k][0] == "RedisUnavailable" and results[k][1] < 1
            for k in results
            if k.startswith("client")
        ),
    )
    case.check(
        "kickq stats and kickq-supervisor exit 1 within 10 s",
        results["kickq stats"][0] == "exit 1"
        and results["kickq-supervisor"][0] == "exit 1"
        and max(r[1] for r in results.values()) < 10,
    )
    case.check(
        "the password appears nowhere (exception text, traceback, output, logs)",
        not any(wrong in text for _, _, text in results.values()),
    )
    case.done()


# --- 10d: hostile job data -------------------------------------------------------------------------------


class Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case10d_hostile_job_data_fails_only_that_job(
    size, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    case = Case(
        "10d",
        "hostile job data written straight into Redis",
        "pickle bytes, binary garbage, 8 MB of garbage, JSON nested 100,000 deep, 4 MB of valid JSON",
    )
    rp = redis_procs()
    raw = redis.Redis(host="127.0.0.1", port=rp.port)  # bytes in, bytes out
    keys = Keys(namespace)
    marker = tmp_path / "pwned"
    hostile = {
        "pickle": pickle.dumps(Boom(str(marker))),
        "garbage": os.urandom(4096),
        "huge garbage": b"\xff" + os.urandom(8 << 20),
        "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    }
    huge_json = json.dumps({"ref": "huge-json", "items": list(range(600_000))}).encode()  # valid, ~4 MB
    module = handler_module(tmp_path, ledger.path, [(["hostile"], 1)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=1, url=rp.url, ns=namespace)
    worker = sup.workers()[1].pid
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    with Monitor(rp.url, namespace, interval=0.5) as monitor:
        # Created delayed, rewritten, then due: the worker meets them in this order, between good jobs.
        jobs, acked = {}, {}
        for i, (label, payload) in enumerate([*hostile.items(), ("huge JSON", huge_json)]):
            good = kq.create("hostile", {"ref": f"good{i}"}, {"delay": 0.5})
            acked[f"good{i}"] = good.id
            job = kq.create("hostile", {"ref": label}, {"delay": 0.5})
            raw.hset(keys.job(job.id), "data", payload)
            jobs[label] = job
        acked["huge-json"] = jobs["huge JSON"].id
        last = kq.create("hostile", {"ref": "last"}, {"delay": 0.6})
        acked["last"] = last.id
        wait_settled(rp.client(), namespace, [j.id for j in jobs.values()] + list(acked.values()), timeout=60)
        monitor.check_now("final: ")
    # (Read as raw fields: Kickq.get() decodes the data, and that data is not JSON.)
    r = rp.client()
    final = {label: r.hgetall(keys.job(job.id)) for label, job in jobs.items()}
    out = outcomes(r, namespace, ledger, acked)
    executed = Counter(e.ref for e in ledger.read())
    for label, fields in final.items():
        case.note(f"{label}: {fields.get('state')}, {fields.get('last_error', '')[:80]!r}")
    case.check(
        "each hostile payload fails only its own job, with a decode error, its handler never called",
        all(
            final[k].get("state") == "fail" and "cannot decode job" in final[k].get("last_error", "")
            for k in hostile
        )
        and not any(executed[k] for k in hostile),
        {k: final[k].get("state") for k in hostile},
    )
    case.check(
        "4 MB of valid JSON is just data: the job ends (success or fail) without hurting others",
        final["huge JSON"].get("state") in ("success", "fail"),
        final["huge JSON"].get("state"),
    )
    case.check("the pickle never ran (no marker file)", not marker.exists())
    case.check(
        "every good job around them succeeds, once",
        not out.lost
        and not out.stranded
        and not out.duplicated
        and all(j.state == "success" for j in out.final.values()),
        out.line(),
    )
    case.check(
        "the worker survived (same process)",
        sup.workers().get(1) is not None and sup.workers()[1].pid == worker,
    )
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.done()
