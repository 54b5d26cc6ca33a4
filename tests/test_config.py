"""The configuration: defaults, aliases, the cascade, validation. Pure logic except the last tests."""
from __future__ import annotations

import math

import pytest

import kickq
from kickq.config import (GLOBAL_DEFAULTS, JOB_OPTION_DEFAULTS, normalise_job_options, resolve_job_options,
                          snake_case, stored_options)
from kickq.connection import redis_url
from tests.structures import stored


@pytest.fixture(autouse=True)
def clean_config():
    kickq.reset()
    yield
    kickq.reset()


# --- defaults -------------------------------------------------------------------------------------

ISSUE_DEFAULTS = {
    "redis_host": "127.0.0.1", "redis_port": 6379, "redis_password": None, "redis_options": None,
    "redis_url": None, "redis_namespace": "kickq", "purge_timeout": 86400, "process_timeout": 10,
    "delay": None, "ghost_retry": True, "ghost_count": 1, "ghost_interval": 1800, "hotjob": False,
    "hotjob_timeout": 10, "retry": False, "retry_count": 3, "retry_interval": 1800, "job_flags": {},
}


def test_defaults_are_exactly_the_issues():
    current = kickq.config()
    for key, value in ISSUE_DEFAULTS.items():
        assert current[key] == value, key
        assert type(current[key]) is type(value), key  # True is not 1, 10 is not 10.0
    assert current["redis_port"] == 6379  # not the seed document's 6389
    assert current["max_payload_bytes"] == 512 * 1024


def test_job_option_defaults_are_the_per_job_options():
    assert set(JOB_OPTION_DEFAULTS) == {
        "delay", "process_timeout", "retry", "retry_count", "retry_interval", "ghost_retry", "ghost_count",
        "ghost_interval", "hotjob", "hotjob_timeout", "purge_timeout"}
    assert set(JOB_OPTION_DEFAULTS) <= set(GLOBAL_DEFAULTS)


# --- the forms of config() ----------------------------------------------------------------------

def test_config_mapping_kwargs_and_key_value_merge():
    kickq.config({"redis_port": 6390, "retry": True})
    kickq.config(process_timeout=2.5)
    result = kickq.config("redis_namespace", "other")
    assert (result["redis_port"], result["retry"], result["process_timeout"], result["redis_namespace"]) == (
        6390, True, 2.5, "other")
    assert result["redis_host"] == "127.0.0.1"  # untouched keys keep their values


def test_config_without_arguments_returns_a_copy():
    kickq.config(redis_options={"client_name": "x"}, job_flags={"a": {"retry": True}})
    copy = kickq.config()
    copy["redis_port"] = 1
    copy["job_flags"]["a"]["retry"] = False
    copy["job_flags"]["b"] = {"retry": True}
    copy["redis_options"]["client_name"] = "changed"
    again = kickq.config()
    assert again["redis_port"] == 6379
    assert again["job_flags"] == {"a": {"retry": True}}
    assert again["redis_options"] == {"client_name": "x"}


def test_config_return_value_of_a_change_is_also_a_copy():
    result = kickq.config(retry_count=5)
    result["retry_count"] = 0
    assert kickq.config()["retry_count"] == 5


def test_config_rejects_other_call_shapes():
    for args in [(1, 2), ("redis_port",), ("redis_port", 1, 2), ([("redis_port", 1)],)]:
        with pytest.raises(kickq.ConfigError):
            kickq.config(*args)
    with pytest.raises(kickq.ConfigError):
        kickq.config({"redis_port": 6390}, redis_port=6391)
    assert kickq.config()["redis_port"] == 6379


# --- aliases --------------------------------------------------------------------------------------

def test_snake_case():
    assert snake_case("processTimeout") == "process_timeout"
    assert snake_case("redisPort") == "redis_port"
    assert snake_case("process_timeout") == "process_timeout"
    assert snake_case("jobFlags") == "job_flags"


def test_camel_case_aliases_globally():
    kickq.config(redisPort=6391, processTimeout=3, retryCount=1, ghostRetry=False, hotjobTimeout=2,
                 redisNamespace="ns1", purgeTimeout=5, jobFlags={"a": {"retryInterval": 7, "ghostCount": 0}})
    current = kickq.config()
    assert current["redis_port"] == 6391
    assert current["process_timeout"] == 3
    assert current["retry_count"] == 1
    assert current["ghost_retry"] is False
    assert current["hotjob_timeout"] == 2
    assert current["redis_namespace"] == "ns1"
    assert current["purge_timeout"] == 5
    assert current["job_flags"] == {"a": {"retry_interval": 7, "ghost_count": 0}}
    assert "redisPort" not in current and "jobFlags" not in current


def test_camel_case_aliases_in_per_job_opts():
    opts = normalise_job_options({"processTimeout": 4, "retryCount": 2, "hotjob": True}, allow_callable=False)
    assert opts == {"process_timeout": 4, "retry_count": 2, "hotjob": True}


def test_alias_and_snake_case_of_the_same_key_at_once_is_an_error():
    with pytest.raises(kickq.ConfigError):
        kickq.config({"redisPort": 6390, "redis_port": 6391})
    with pytest.raises(kickq.ConfigError):
        kickq.config({"redisPort": 6390}, redis_port=6391)
    with pytest.raises(kickq.ConfigError):
        normalise_job_options({"processTimeout": 1, "process_timeout": 2}, allow_callable=False)
    assert kickq.config()["redis_port"] == 6379


def test_kickq_client_accepts_aliases_and_rejects_unknown_keys():
    client = kickq.Kickq(redisNamespace="client-ns", processTimeout=4)
    assert client.settings()["redis_namespace"] == "client-ns"
    assert client.settings()["process_timeout"] == 4
    assert kickq.config()["redis_namespace"] == "kickq"  # overrides are the client's own
    with pytest.raises(kickq.ConfigError):
        kickq.Kickq(no_such_option=1)


# --- the cascade ----------------------------------------------------------------------------------

def test_cascade_global_then_job_flags_then_opts():
    kickq.config(process_timeout=5, retry=True, job_flags={"a": {"process_timeout": 7, "retry_count": 9}})
    settings = kickq.config()
    a = resolve_job_options(settings, "a", None)
    b = resolve_job_options(settings, "b", None)
    a_opts = resolve_job_options(settings, "a", {"processTimeout": 9, "retry": False})
    assert (a["process_timeout"], a["retry_count"], a["retry"]) == (7, 9, True)
    assert (b["process_timeout"], b["retry_count"], b["retry"]) == (5, 3, True)
    assert (a_opts["process_timeout"], a_opts["retry_count"], a_opts["retry"]) == (9, 9, False)
    assert set(a) == set(JOB_OPTION_DEFAULTS)


def test_job_flags_apply_to_that_name_only():
    kickq.config(job_flags={"email:send": {"hotjob": True}})
    settings = kickq.config()
    assert resolve_job_options(settings, "email:send", None)["hotjob"] is True
    assert resolve_job_options(settings, "email", None)["hotjob"] is False
    assert resolve_job_options(settings, "email:send ", None)["hotjob"] is False


def test_job_flags_merge_by_name():
    kickq.config(job_flags={"a": {"retry": True, "retry_count": 1}})
    kickq.config(job_flags={"b": {"hotjob": True}})
    assert kickq.config()["job_flags"] == {"a": {"retry": True, "retry_count": 1}, "b": {"hotjob": True}}
    # A name given again replaces that name's flags as a whole.
    kickq.config(job_flags={"a": {"process_timeout": 3}})
    assert kickq.config()["job_flags"] == {"a": {"process_timeout": 3}, "b": {"hotjob": True}}


def test_per_job_opts_do_not_change_the_global_config():
    settings = kickq.config()
    resolve_job_options(settings, "a", {"retry": True})
    assert kickq.config()["retry"] is False


def test_stored_options_are_the_differences_from_the_library_defaults():
    kickq.config(retry=True)
    resolved = resolve_job_options(kickq.config(), "a", {"process_timeout": 10, "hotjob_timeout": 2})
    assert stored_options(resolved) == {"retry": True, "hotjob_timeout": 2}
    assert stored_options(resolve_job_options(GLOBAL_DEFAULTS, "a", None)) == {}


# --- retry_interval as a callable -----------------------------------------------------------------

def test_callable_retry_interval_globally_is_expanded_one_interval_per_retry():
    kickq.config(retry_interval=lambda attempt: 2 ** attempt)
    resolved = resolve_job_options(kickq.config(), "a", None)
    assert resolved["retry_interval"] == [2, 4, 8]  # retry_count 3: one per re-run
    resolved = resolve_job_options(kickq.config(), "a", {"retry_count": 5})
    assert resolved["retry_interval"] == [2, 4, 8, 16, 32]


def test_callable_retry_interval_in_job_flags():
    kickq.config(job_flags={"a": {"retryInterval": lambda attempt: attempt * 0.5, "retry_count": 2}})
    assert resolve_job_options(kickq.config(), "a", None)["retry_interval"] == [0.5, 1.0]
    assert resolve_job_options(kickq.config(), "b", None)["retry_interval"] == 1800


def test_callable_retry_interval_rejected_in_per_job_opts():
    with pytest.raises(kickq.ConfigError, match="retry_interval"):
        resolve_job_options(kickq.config(), "a", {"retry_interval": lambda attempt: 1})


def test_callable_retry_interval_with_bad_values_is_a_config_error():
    kickq.config(retry_interval=lambda attempt: -1)
    with pytest.raises(kickq.ConfigError):
        resolve_job_options(kickq.config(), "a", None)
    kickq.config(retry_interval=lambda attempt: 1 / 0)
    with pytest.raises(kickq.ConfigError):
        resolve_job_options(kickq.config(), "a", None)
    kickq.config(retry_interval=lambda attempt: float("nan"))
    with pytest.raises(kickq.ConfigError):
        resolve_job_options(kickq.config(), "a", None)


# --- validation: ConfigError and nothing changed -------------------------------------------------

BAD_SETTINGS = [
    {"no_such_option": 1},
    {"noSuchOption": 1},
    {"redis_port": "6379"},
    {"redis_port": 70000},
    {"redis_port": True},
    {"redis_host": ""},
    {"redis_namespace": "has space"},
    {"redis_namespace": ""},
    {"redis_options": "x"},
    {"redis_options": {"decode_responses": False}},
    {"redis_url": 5},
    {"process_timeout": "10"},
    {"process_timeout": 0},
    {"process_timeout": -1},
    {"process_timeout": math.nan},
    {"process_timeout": math.inf},
    {"hotjob_timeout": -0.5},
    {"purge_timeout": -1},
    {"delay": -1},
    {"delay": math.nan},
    {"delay": "1"},
    {"ghost_interval": math.inf},
    {"retry_interval": -3},
    {"retry_interval": math.nan},
    {"retry_interval": [1, 2]},
    {"retry_count": 1.5},
    {"retry_count": -1},
    {"ghost_count": True},
    {"retry": "yes"},
    {"retry": 1},
    {"hotjob": None},
    {"max_payload_bytes": 0},
    {"redis_timeout": 0},
    {"job_flags": []},
    {"job_flags": {"a": {"no_such_option": 1}}},
    {"job_flags": {"a": {"process_timeout": -1}}},
    {"job_flags": {"a": "retry"}},
    {"job_flags": {1: {}}},
    {"retry": True, "retry_count": -1},  # one good, one bad: neither applied
    {"wait_replicas": -1},
    {"wait_replicas": 1.0},
    {"wait_replicas": True},
    {"wait_replicas": "1"},
    {"wait_replicas_timeout": 0},
    {"wait_replicas_timeout": -1},
    {"wait_replicas_timeout": math.inf},
    {"wait_replicas_timeout": "1"},
    {"wait_aof": 1},
    {"wait_aof": "yes"},
    {"wait_replicas": 1, "wait_aof": None},
]


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=[repr(b)[:40] for b in BAD_SETTINGS])
def test_bad_setting_raises_config_error_and_changes_nothing(bad):
    kickq.config(process_timeout=2, job_flags={"keep": {"retry": True}})
    before = kickq.config()
    with pytest.raises(kickq.ConfigError) as info:
        kickq.config(bad)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, kickq.KickqError)
    assert kickq.config() == before


@pytest.mark.parametrize("bad", [{"nope": 1}, {"process_timeout": math.nan}, {"retry_count": -1},
                                 {"retry_interval": math.inf}, {"hotjob": "true"}, {"delay": -0.1},
                                 {"concurrent_jobs": 2}, {"redis_port": 6390}])
def test_bad_per_job_opts_raise_config_error(bad):
    with pytest.raises(kickq.ConfigError):
        resolve_job_options(kickq.config(), "a", bad)


def test_replica_confirmation_options():
    assert (GLOBAL_DEFAULTS["wait_replicas"], GLOBAL_DEFAULTS["wait_replicas_timeout"],
            GLOBAL_DEFAULTS["wait_aof"]) == (0, 1.0, False)
    current = kickq.config(waitReplicas=2, wait_replicas_timeout=0.25, waitAof=True)
    assert [current[k] for k in ("wait_replicas", "wait_replicas_timeout", "wait_aof")] == [2, 0.25, True]
    assert kickq.Kickq(wait_replicas=0).settings()["wait_replicas"] == 0  # a client's override wins


def test_a_wait_timeout_must_be_below_redis_timeout_when_used():
    """Checked where a write would wait (kickq.acks.wanted), since either may be set on its own."""
    from kickq import acks

    assert acks.wanted(kickq.config(wait_replicas_timeout=9)) is None  # wait_replicas 0: not used
    assert acks.wanted(kickq.config(wait_replicas=1, wait_replicas_timeout=4.9)) == acks.Acks(1, 4.9, False)
    for timeouts in ({"wait_replicas_timeout": 5}, {"wait_replicas_timeout": 0.5, "redis_timeout": 0.5}):
        with pytest.raises(kickq.ConfigError, match="below redis_timeout"):
            acks.wanted(kickq.config(**timeouts))


def test_floats_are_allowed_for_durations():
    kickq.config(process_timeout=0.2, retry_interval=0.05, ghost_interval=0.1, hotjob_timeout=0.3, delay=0.5,
                 purge_timeout=1.5)
    resolved = resolve_job_options(kickq.config(), "a", {"delay": 0})
    assert resolved["process_timeout"] == 0.2
    assert resolved["delay"] == 0


# --- reset ------------------------------------------------------------------------------------------

def test_reset_restores_the_defaults():
    kickq.config(redis_port=6400, retry=True, job_flags={"a": {"retry": False}}, redis_options={"x": 1})
    kickq.reset()
    current = kickq.config()
    for key, value in ISSUE_DEFAULTS.items():
        assert current[key] == value, key
    assert current == {**GLOBAL_DEFAULTS}


def test_reset_does_not_share_state_with_the_defaults():
    kickq.config(job_flags={"a": {"retry": True}})
    kickq.reset()
    assert GLOBAL_DEFAULTS["job_flags"] == {}
    assert kickq.config()["job_flags"] == {}


# --- the Redis URL from the environment ----------------------------------------------------------

def test_kickq_redis_url_env_used_when_config_has_none(monkeypatch):
    monkeypatch.setenv("KICKQ_REDIS_URL", "redis://env-host:1234/2")
    assert redis_url(kickq.config()) == "redis://env-host:1234/2"
    kickq.config(redis_url="redis://conf-host:99/0")
    assert redis_url(kickq.config()) == "redis://conf-host:99/0"
    monkeypatch.delenv("KICKQ_REDIS_URL")
    kickq.reset()
    assert redis_url(kickq.config()) is None


def test_kickq_redis_url_env_reaches_the_server(monkeypatch, redis_url, namespace, r):
    monkeypatch.setenv("KICKQ_REDIS_URL", redis_url)
    kickq.config(redis_namespace=namespace, redis_port=1)  # host/port ignored: the URL wins
    with kickq.Kickq() as client:
        job = client.create("from-env", {"x": 1})
    assert stored(r, namespace, job.id)["name"] == "from-env"
