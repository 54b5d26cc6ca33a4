"""kickq: kick jobs out the door. Quickly.

A Redis-backed job queue. Producers create jobs with `Kickq().create()`; a `kickq-supervisor`
runs the handlers registered with `Kickq().process()` in isolated worker processes.
"""
from __future__ import annotations

from .client import Kickq
from .config import config, reset
from .errors import (ConfigError, HotjobTimeout, InvalidPayload, JobNotFound, KickqError,
                     PayloadTooLarge, RedisModeError, RedisUnavailable, RedisVersionError, ReplicationTimeout)
from .job import STATES, Job

__version__ = "0.1.0"
__all__ = [
    "Kickq", "Job", "config", "reset", "KickqError", "ConfigError", "JobNotFound", "HotjobTimeout",
    "InvalidPayload", "PayloadTooLarge", "RedisModeError", "RedisUnavailable", "RedisVersionError",
    "ReplicationTimeout", "STATES",
]
