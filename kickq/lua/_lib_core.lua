--[[ _lib_core.lua: what every script builds on: the clock, whole numbers as text, seconds to ms,
  a job's options, a zset's earliest score.

  The shared helpers are the files kickq/lua/_lib_*.lua, read in the order of LIB_FILES in
  kickq/scripts.py (each file uses only what the files before it and its own earlier lines
  define) and cut at each top-level `local`: a script gets the helpers it uses, and on Redis 7
  all the scripts form one function library.

  Every key is built from the namespace prefix P = "{ns}:" passed as ARGV[1]: a job's key comes
  from an id the script reads, so it cannot be declared. The hash tag keeps every key of a
  namespace in one Redis Cluster slot. KEYS[1] of every script is P.."id", declared so that Redis
  routes the call; KEYS[2] is P.."route-guard", which never exists, so that Redis Cluster refuses
  the call while the slot migrates (TRYAGAIN): a script runs only on a node that holds every key
  of its namespace (kickq/layout.py SCRIPT_KEYS, kickq/cluster.py). The keys, the structure of
  each state and the packed record are defined in kickq/layout.py, and the tests hold the
  scripts to it.

  Notifications (P.."done", P.."reaper") are sharded pub/sub on Redis 7 (SPUBLISH: a cluster
  delivers them on the namespace's shard only, not to every node), plain PUBLISH before.

  A job lives in exactly one structure, decided by its state:
    new, queued          -> list  P.."queue:"..name  (plus one token in P.."wake:"..name)
    delayed, retry, ghost -> zset  P.."delayed"       score = due time (ms)
    processing           -> zset  P.."processing"    score = lease deadline (ms)
    success, fail        -> zset  P.."finished"      score = purge time (ms)
  A job's record is its hash P.."job:"..id, except a job created straight into its queue and not
  claimed yet: that one is a packed entry of the hash P.."newjobs" (_lib_packed.lua) until
  its first claim writes its hash, which saves the per-key overhead of a backlog of new jobs.

  Keys: none (job_options reads the hash it is given)
]]
local rcall = redis.call
local PUBLISH = (redis.REDIS_VERSION_NUM or 0) >= 0x070000 and 'SPUBLISH' or 'PUBLISH'
local DEFAULTS = __DEFAULTS__  -- a Lua table literal (scripts.py): no JSON decode per call
local LEASE_GRACE_MS = __LEASE_GRACE_MS__

local function clock(arg)
  -- Time is passed in by tests; production passes nothing and every host shares Redis' clock.
  local t = tonumber(arg)
  if t then return t end
  if redis.replicate_commands then redis.replicate_commands() end
  local tm = rcall('TIME')
  return tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
end

-- A whole number (ms, counts) as a command argument. Lua would write it with "%.14g", whose float
-- formatting costs twice string.format('%d') (0.70 against 0.34 us on the bench machine, a few
-- us per job), and a call writes the same `now` again and again: the last text is kept.
local last_int, last_int_text
local function int_text(n)
  if n ~= last_int then last_int, last_int_text = n, string.format('%d', n) end
  return last_int_text
end

-- Seconds (stored options may be fractional) to whole ms, rounded like the Python side does.
local function ms(seconds)
  return math.floor(seconds * 1000 + 0.5)
end

local DEFAULTS_META = {__index = DEFAULTS}

-- The job's stored options (only those that differ from the defaults), defaults behind them.
local function job_options(jk)
  local raw = rcall('HGET', jk, 'opts')
  return setmetatable(raw and cjson.decode(raw) or {}, DEFAULTS_META)
end

local function next_score(key)
  local first = rcall('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] == nil then return -1 end
  return tonumber(first[2])
end
