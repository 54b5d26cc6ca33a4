"""kickq-supervisor: runs kickq handlers in a pool of isolated worker processes.

The master forks one worker process per `concurrent_jobs` slot of each registration, kills and
replaces any worker whose job passes its process_timeout, and runs a reaper process that promotes,
recovers and purges jobs. This package imports kickq; kickq never imports it.
"""
__version__ = "0.1.0"
