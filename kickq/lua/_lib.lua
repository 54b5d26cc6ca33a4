--[[ Shared helpers, prepended to every kickq script at load time (see kickq/scripts.py).

  Every key is built from the namespace prefix P = "{ns}:" passed as ARGV[1]. The hash tag
  keeps every key of a namespace in one Redis Cluster slot, so keys derived here are safe.
  KEYS[1] of every script is P.."id", declared only so that Redis routes the call.

  A job lives in exactly one structure, decided by its state:
    new, queued          -> list  P.."queue:"..name  (plus one token in P.."wake:"..name)
    delayed, retry, ghost -> zset  P.."delayed"       score = due time (ms)
    processing           -> zset  P.."processing"    score = lease deadline (ms)
    success, fail        -> zset  P.."finished"      score = purge time (ms)
]]
local rcall = redis.call
local DEFAULTS = cjson.decode('__DEFAULTS__')
local LEASE_GRACE_MS = __LEASE_GRACE_MS__

local function clock(arg)
  -- Time is passed in by tests; production passes nothing and every host shares Redis' clock.
  local t = tonumber(arg)
  if t then return t end
  if redis.replicate_commands then redis.replicate_commands() end
  local tm = rcall('TIME')
  return tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
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

-- Observability, kept by the transitions themselves so that reading it never scans jobs:
--   P.."counts"          hash  "<state>:<name>" -> jobs in that state now
--   P.."events"          stream of every transition (MAXLEN ~ meta.events_maxlen, default below)
--   P.."stats:"..bucket  hash  per 10 s bucket: "<event>:<name>" counts, "time:<name>" (sum of
--                              run ms) and "max:<name>" (longest run ms)
--   P.."times:"..bucket  list  a bounded sample of "<run ms>:<name>" for percentiles
local EVENTS_MAXLEN = 10000
local BUCKET_MS = 10000
local BUCKET_TTL = 3700  -- seconds: longer than the longest stats window (1 h)
local SAMPLES_PER_BUCKET = 1000

-- The stats hash of the bucket holding `now`, given its expiry the first time it is used.
local function bucket_of(P, now)
  local bucket = now - now % BUCKET_MS
  local bk = P .. 'stats:' .. bucket
  if rcall('HSETNX', bk, 'bucket', bucket) == 1 then rcall('EXPIRE', bk, BUCKET_TTL) end
  return bk, bucket
end

-- Record a transition of job `id` (name `name`) from state `from` to `to` (either may be false).
-- `event` names it; `run_ms` is the processing time of a run that just ended.
local function note(P, id, name, from, to, event, now, run_ms)
  name = name or '?'
  local counts = P .. 'counts'
  if from then
    if rcall('HINCRBY', counts, from .. ':' .. name, -1) <= 0 then rcall('HDEL', counts, from .. ':' .. name) end
  end
  if to then rcall('HINCRBY', counts, to .. ':' .. name, 1) end
  local maxlen = tonumber(rcall('HGET', P .. 'meta', 'events_maxlen') or EVENTS_MAXLEN)
  if maxlen and maxlen > 0 then
    rcall('XADD', P .. 'events', 'MAXLEN', '~', maxlen, '*', 'id', id, 'name', name, 'event', event,
          'state', to or '', 'time', now)
  end
  local counted = event == 'create' or event == 'success' or event == 'fail' or event == 'retry'
                  or event == 'ghost'
  if not (counted or run_ms) then return end
  local bk, bucket = bucket_of(P, now)
  if counted then rcall('HINCRBY', bk, (event == 'create' and 'created' or event) .. ':' .. name, 1) end
  if run_ms then
    rcall('HINCRBY', bk, 'processed:' .. name, 1)
    rcall('HINCRBY', bk, 'time:' .. name, run_ms)
    if run_ms > (tonumber(rcall('HGET', bk, 'max:' .. name)) or -1) then rcall('HSET', bk, 'max:' .. name, run_ms) end
    -- percentiles come from the first SAMPLES_PER_BUCKET runs of each 10 s bucket
    local tk = P .. 'times:' .. bucket
    local held = rcall('LLEN', tk)
    if held < SAMPLES_PER_BUCKET then
      rcall('RPUSH', tk, run_ms .. ':' .. name)
      if held == 0 then rcall('EXPIRE', tk, BUCKET_TTL) end
    end
  end
end

local function decode_runs(jk)
  local raw = rcall('HGET', jk, 'runs')
  if raw then return cjson.decode(raw) end
  return {}
end

local function encode_runs(runs)
  if #runs == 0 then return '[]' end
  return cjson.encode(runs)
end

-- Make the wake tokens of each name equal the number of jobs waiting in its queue.
-- Tokens are only hints for blocked workers: a token lost with a dying worker, or one left by a
-- deleted job, is mended here at the next claim, so a waiting job is never left without one.
local function reconcile_wake(P, names)
  for _, name in ipairs(names) do
    local q, w = P .. 'queue:' .. name, P .. 'wake:' .. name
    local diff = rcall('LLEN', q) - rcall('LLEN', w)
    if diff > 0 then
      local tokens = {}
      for i = 1, diff do tokens[i] = '1' end
      rcall('RPUSH', w, unpack(tokens))
    elseif diff < 0 then
      local keep = rcall('LLEN', q)
      if keep == 0 then rcall('DEL', w) else rcall('LTRIM', w, 0, keep - 1) end
    end
  end
end

local function new_job(P, name, data, opts, now)
  local id = tostring(rcall('INCR', P .. 'id'))
  local jk = P .. 'job:' .. id
  rcall('HSET', jk, 'name', name, 'create_time', now, 'update_time', now)
  if data and data ~= '' then rcall('HSET', jk, 'data', data) end
  if opts and opts ~= '' then rcall('HSET', jk, 'opts', opts) end
  rcall('SADD', P .. 'names', name)
  return id
end

-- keep_due: a schedule's tick job keeps scheduled_for = its tick; others drop it once queued.
local function enqueue(P, id, name, state, now, keep_due)
  local jk = P .. 'job:' .. id
  local from = rcall('HGET', jk, 'state')
  rcall('HSET', jk, 'state', state, 'update_time', now)
  note(P, id, name, from, state, from and 'queued' or 'create', now)
  if not keep_due then rcall('HDEL', jk, 'scheduled_for') end
  rcall('RPUSH', P .. 'queue:' .. name, id)
  rcall('RPUSH', P .. 'wake:' .. name, '1')
end

local function schedule(P, id, state, due, now)
  local dk = P .. 'delayed'
  local first = rcall('ZRANGE', dk, 0, 0, 'WITHSCORES')
  if first[2] == nil or due < tonumber(first[2]) then
    -- Wake sleeping reapers: this job is due before anything they are waiting for.
    rcall('PUBLISH', P .. 'reaper', due)
  end
  rcall('ZADD', dk, due, id)
  local jk = P .. 'job:' .. id
  local from, name = unpack(rcall('HMGET', jk, 'state', 'name'))
  rcall('HSET', jk, 'state', state, 'scheduled_for', due, 'update_time', now)
  if state == 'delayed' then note(P, id, name, from, state, 'create', now) end
end

-- Remove a job from whichever structure its state puts it in, and its hash. Returns 1 or 0.
local function remove_job(P, id, now)
  local jk = P .. 'job:' .. id
  local state, name = unpack(rcall('HMGET', jk, 'state', 'name'))
  if not state then return 0 end
  if state == 'new' or state == 'queued' then
    rcall('LREM', P .. 'queue:' .. name, 1, id)
  elseif state == 'delayed' or state == 'retry' or state == 'ghost' then
    rcall('ZREM', P .. 'delayed', id)
  elseif state == 'processing' then
    rcall('ZREM', P .. 'processing', id)
  else
    rcall('ZREM', P .. 'finished', id)
  end
  local hot = job_options(jk).hotjob
  rcall('DEL', jk)
  note(P, id, name, state, false, 'delete', now)
  if hot then rcall('PUBLISH', P .. 'done', cjson.encode({id = id, deleted = true})) end
  return 1
end

-- Schedules (cron / every). A schedule is a JSON record in the hash P.."schedules"; its `pending`
-- job is an ordinary delayed job due at the next tick, with a 'schedule' field. Cron ticks are
-- computed by Python (croniter) ahead of time into the zset P.."ticks:"..id; `every` ticks are
-- arithmetic. When the pending job is promoted, the next tick's job is created in the same step.
local MISSED_AFTER_MS = 1000  -- a tick promoted later than this was missed (catch_up decides)
local CATCH_UP_CAP = 100  -- catch_up 'all' runs at most this many missed ticks

local function tick_job(P, s, due, now)
  local id = new_job(P, s.name, s.data, s.opts, now)
  rcall('HSET', P .. 'job:' .. id, 'schedule', s.id, 'tick', due)
  schedule(P, id, 'delayed', due, now)
  return id
end

local function next_tick(P, s, after)
  if s.every_ms then return after + s.every_ms end
  local found = rcall('ZRANGEBYSCORE', P .. 'ticks:' .. s.id, '(' .. after, '+inf', 'LIMIT', 0, 1)
  if found[1] then return tonumber(found[1]) end
  return nil
end

-- The pending job `id` of schedule `sid`, due at `tick`, is being promoted: create the next tick's
-- job. Returns false when the job itself must not run (catch_up 'skip' and the tick was missed).
local function advance_schedule(P, sid, id, tick, now)
  local sk = P .. 'schedules'
  local raw = rcall('HGET', sk, sid)
  if not raw then return true end
  local s = cjson.decode(raw)
  if s.pending ~= id then return true end  -- a re-run (retry/ghost) of an earlier tick's job
  local run = not (s.catch_up == 'skip' and now - tick > MISSED_AFTER_MS)
  local t = next_tick(P, s, tick)
  if s.catch_up == 'all' then
    local made = 0
    while t and t <= now and made < CATCH_UP_CAP do
      local missed = new_job(P, s.name, s.data, s.opts, now)
      rcall('HSET', P .. 'job:' .. missed, 'schedule', sid, 'tick', t, 'scheduled_for', t)
      enqueue(P, missed, s.name, 'queued', now, true)
      made = made + 1
      t = next_tick(P, s, t)
    end
  end
  if t and t <= now then  -- the rest of the missed ticks are coalesced into this run, or skipped
    if s.every_ms then
      t = tick + s.every_ms * (math.floor((now - tick) / s.every_ms) + 1)
    else
      t = next_tick(P, s, now)
    end
  end
  local tk = P .. 'ticks:' .. sid
  if not s.every_ms then
    if t then rcall('ZREMRANGEBYSCORE', tk, '-inf', '(' .. t) else rcall('DEL', tk) end
  end
  if t then
    s.pending = tick_job(P, s, t, now)
    s.next_run = t
  else  -- cron ticks ran out (reapers were away): the reaper's refill creates the next one
    s.pending = ''
    s.next_run = -1
  end
  if run then s.last_job_id = id end
  s.last_tick = tick
  rcall('HSET', sk, sid, cjson.encode(s))
  return run
end

local function next_score(key)
  local first = rcall('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] == nil then return -1 end
  return tonumber(first[2])
end

local function finalise(P, id, state, now, opts, runs)
  local jk = P .. 'job:' .. id
  local total = 0
  for _, run in ipairs(runs) do
    if type(run.time) == 'number' then total = total + run.time end
  end
  local purge_at = now + ms(opts.purge_timeout)
  rcall('HSET', jk, 'state', state, 'finish_time', now, 'update_time', now,
        'total_process_time', total, 'scheduled_for', purge_at)
  rcall('ZADD', P .. 'finished', purge_at, id)
  if opts.hotjob then
    -- The whole final job goes with the message, so a waiter needs no further round trip.
    local flat, fields = rcall('HGETALL', jk), {}
    for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
    rcall('PUBLISH', P .. 'done', cjson.encode({id = id, job = fields}))
  end
end

local function count_runs(runs, state)
  local n = 0
  for _, run in ipairs(runs) do if run.state == state then n = n + 1 end end
  return n
end

-- End the current run of a processing job (already checked to be owned by the caller).
-- outcome: 'success' | 'fail' | 'ghost'. Returns the job's new state.
local function end_run(P, id, now, outcome, result, err)
  local jk = P .. 'job:' .. id
  rcall('ZREM', P .. 'processing', id)
  local opts = job_options(jk)
  local runs = decode_runs(jk)
  -- The run in progress lives in 'run_start' until it ends (claim then writes no JSON).
  local start = tonumber(rcall('HGET', jk, 'run_start')) or now
  local run = {count = #runs + 1, start = start, time = now - start, state = outcome,
               error = outcome ~= 'success' and err or cjson.null}
  runs[#runs + 1] = run
  rcall('HDEL', jk, 'run_start', 'owner')
  if outcome == 'success' then
    if result then rcall('HSET', jk, 'result', result) end
  else
    rcall('HSET', jk, 'last_error', err)
  end
  rcall('HSET', jk, 'runs', encode_runs(runs))
  local new_state
  local name = rcall('HGET', jk, 'name')
  if outcome == 'success' then
    new_state = 'success'
    finalise(P, id, new_state, now, opts, runs)
  elseif outcome == 'fail' then
    local failed = count_runs(runs, 'fail')
    if opts.retry and failed <= opts.retry_count then
      local interval = opts.retry_interval
      if type(interval) == 'table' then interval = interval[math.min(failed, #interval)] or 0 end
      new_state = 'retry'
      schedule(P, id, new_state, now + ms(interval), now)
    else
      new_state = 'fail'
      finalise(P, id, new_state, now, opts, runs)
    end
  else
    local ghosts = count_runs(runs, 'ghost')
    if opts.ghost_retry and ghosts <= opts.ghost_count then
      new_state = 'ghost'
      schedule(P, id, new_state, now + ms(opts.ghost_interval), now)
    else
      new_state = 'fail'
      finalise(P, id, new_state, now, opts, runs)
    end
    -- every ghosted run counts as a ghost, whatever comes of the job
    if new_state == 'fail' then rcall('HINCRBY', (bucket_of(P, now)), 'ghost:' .. name, 1) end
  end
  note(P, id, name, 'processing', new_state, new_state, now, run and run.time or 0)
  return new_state
end

-- Take the first waiting job of the first non-empty queue, in the priority order of `names`.
-- A plain claim (a worker woke on a token, or polled) leaves the wake tokens equal to the queue
-- lengths; a `chained` claim (inside finish) just takes the claimed job's own token.
-- `claimer` (optional) names the caller: its last claim is kept in P.."claim:"..claimer, so a
-- caller whose reply was lost (a timeout after Redis ran the script) can find the job it now owns.
-- Returns {id, attempt token, HGETALL fields...} or nil.
local function claim(P, names, now, claimer, chained)
  for _, name in ipairs(names) do
    local q = P .. 'queue:' .. name
    while true do
      local id = rcall('LPOP', q)
      if not id then break end
      local jk = P .. 'job:' .. id
      local state = rcall('HGET', jk, 'state')
      if state == 'new' or state == 'queued' then
        local opts = job_options(jk)
        local attempt = rcall('HINCRBY', jk, 'attempt', 1)
        rcall('HSET', jk, 'state', 'processing', 'update_time', now, 'run_start', now)
        -- The claimer owns the run: after Redis lost its data, ids and attempts start again at 1,
        -- and only the owner tells a new job 1 from the old one a late finish was for.
        if claimer ~= '' then rcall('HSET', jk, 'owner', claimer) end
        note(P, id, name, state, 'processing', 'processing', now)
        rcall('ZADD', P .. 'processing', now + ms(opts.process_timeout) + LEASE_GRACE_MS, id)
        if chained then
          -- Claimed in the same call that finished the last job: the job's token is still there.
          rcall('LPOP', P .. 'wake:' .. name)
        else
          reconcile_wake(P, names)
        end
        if claimer ~= '' then rcall('SET', P .. 'claim:' .. claimer, id .. ' ' .. attempt, 'EX', 86400) end
        local reply = {id, attempt}
        local fields = rcall('HGETALL', jk)
        for i = 1, #fields do reply[#reply + 1] = fields[i] end
        return reply
      end
      -- Anything else is a leftover of a job that moved on; dropping it keeps one structure per job.
    end
  end
  if not chained then reconcile_wake(P, names) end
  return nil
end
