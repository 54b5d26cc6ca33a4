--[[ Shared helpers, prepended to every kickq script at load time (see kickq/scripts.py).

  Every key is built from the namespace prefix P = "{ns}:" passed as ARGV[1]. The hash tag
  keeps every key of a namespace in one Redis Cluster slot, so keys derived here are safe.
  KEYS[1] of every script is P.."id", declared only so that Redis routes the call.

  A job lives in exactly one structure, decided by its state:
    new, queued          -> list  P.."queue:"..name  (plus one token in P.."wake:"..name)
    delayed, retry, ghost -> zset  P.."delayed"       score = due time (ms)
    processing           -> zset  P.."processing"    score = lease deadline (ms)
    success, fail        -> zset  P.."finished"      score = purge time (ms)
  A job's record is its hash P.."job:"..id, except a job created straight into its queue and not
  claimed yet: that one is a packed entry of the hash P.."newjobs" (see new_queued_job) until
  its first claim writes its hash, which saves the per-key overhead of a backlog of new jobs.
]]
local rcall = redis.call
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

-- Counts, stats and samples are summed over the whole call and written once at its end
-- (flush_notes; scripts.py runs it after the body of every script that notes, even one that
-- fails midway, since Redis keeps the writes made before an error): a batch of runs
-- then costs a few writes, not several per job. Nothing in a call reads them back. A count is
-- changed by its net delta: one that nets to 0 in a call is not written at all.
local tally_counts = {}  -- "<state>:<name>" -> net change in this call
local tally_count_order = {}  -- those fields, in the order first noted
local tally_buckets = {}  -- bucket ms -> its stats (bucket_tally)
local tally_bucket_order = {}
local tally_maxlen  -- events_maxlen as text (false: no events), read at the first note of the call

-- On Redis 7 the scripts are one function library (scripts.py), whose top level runs once, at
-- load, rather than at every call: each call starts here, so that no tally outlives its call
-- (redis.call itself cannot be read at load time).
local function begin_call()
  rcall = redis.call
  tally_counts, tally_count_order, tally_buckets, tally_bucket_order = {}, {}, {}, {}
  tally_maxlen = nil
end

local function add_count(field, by)
  local n = tally_counts[field]
  if n == nil then
    n = 0
    tally_count_order[#tally_count_order + 1] = field
  end
  tally_counts[field] = n + by
end

-- The tally of the 10 s bucket holding `now`: field -> n (every field holds a ':'), `order` (of
-- the fields), and once a run ended in it `max` (name -> ms), `max_order` and `samples`.
local function bucket_tally(now)
  local bucket = now - now % BUCKET_MS
  local b = tally_buckets[bucket]
  if not b then
    b = {order = {}}
    tally_buckets[bucket] = b
    tally_bucket_order[#tally_bucket_order + 1] = bucket
  end
  return b
end

local function add_stat(b, field, by)
  local n = b[field]
  if n == nil then
    n = 0
    b.order[#b.order + 1] = field
  end
  b[field] = n + by
end

local function add_run_time(b, name, run_ms)
  add_stat(b, 'processed:' .. name, 1)
  add_stat(b, 'time:' .. name, run_ms)
  if not b.max then b.max, b.max_order, b.samples = {}, {}, {} end
  local max = b.max[name]
  if max == nil then b.max_order[#b.max_order + 1] = name end
  if run_ms > (max or -1) then b.max[name] = run_ms end
  b.samples[#b.samples + 1] = run_ms .. ':' .. name
end

-- Record a transition of job `id` (name `name`) from state `from` to `to` (either may be false).
-- `event` names it; `run_ms` is the processing time of a run that just ended. The event goes to
-- the stream at once (in order); counts and stats go to the tally.
local function note(P, id, name, from, to, event, now, run_ms)
  name = name or '?'
  if from then add_count(from .. ':' .. name, -1) end
  if to then add_count(to .. ':' .. name, 1) end
  if tally_maxlen == nil then
    local maxlen = tonumber(rcall('HGET', P .. 'meta', 'events_maxlen') or EVENTS_MAXLEN)
    tally_maxlen = maxlen and maxlen > 0 and string.format('%d', maxlen) or false
  end
  if tally_maxlen then
    rcall('XADD', P .. 'events', 'MAXLEN', '~', tally_maxlen, '*', 'id', id, 'name', name, 'event', event,
          'state', to or '', 'time', int_text(now))
  end
  local counted = event == 'create' or event == 'success' or event == 'fail' or event == 'retry'
                  or event == 'ghost'
  if not (counted or run_ms) then return end
  local b = bucket_tally(now)
  if counted then add_stat(b, (event == 'create' and 'created' or event) .. ':' .. name, 1) end
  if run_ms then add_run_time(b, name, run_ms) end
end

-- Write what the call's notes summed up (see tally_counts and bucket_tally).
local function flush_notes(P)
  local counts = P .. 'counts'
  for _, field in ipairs(tally_count_order) do
    local by = tally_counts[field]
    if by ~= 0 then
      local count = rcall('HINCRBY', counts, field, by)
      if count <= 0 then
        rcall('HDEL', counts, field)
      elseif count <= by then
        -- A count of the name rose from zero: the first job of a name always does, so this keeps
        -- P.."names" whole without a SADD per job (nothing ever removes a name).
        rcall('SADD', P .. 'names', string.sub(field, string.find(field, ':', 1, true) + 1))
      end
    end
  end
  for _, bucket in ipairs(tally_bucket_order) do
    local b = tally_buckets[bucket]
    local bk = P .. 'stats:' .. bucket
    local fresh = false  -- a field written for the first time: the hash may be new, give it a TTL
    for _, field in ipairs(b.order) do
      local by = b[field]
      if rcall('HINCRBY', bk, field, by) == by then fresh = true end
    end
    if fresh then rcall('EXPIRE', bk, BUCKET_TTL) end
    if b.max then
      for _, name in ipairs(b.max_order) do
        if b.max[name] > (tonumber(rcall('HGET', bk, 'max:' .. name)) or -1) then
          rcall('HSET', bk, 'max:' .. name, b.max[name])
        end
      end
      -- percentiles come from the first SAMPLES_PER_BUCKET runs of each 10 s bucket
      local tk = P .. 'times:' .. bucket
      local held = rcall('LLEN', tk)
      local room = math.min(SAMPLES_PER_BUCKET - held, #b.samples)
      if room > 0 then
        rcall('RPUSH', tk, unpack(b.samples, 1, room))
        if held == 0 then rcall('EXPIRE', tk, BUCKET_TTL) end
      end
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

-- A new job's hash, in one write; `extra` (optional) holds more field/value pairs. update_time is
-- left out until the job first changes (Job reads it as create_time): waiting jobs stay smaller.
local function new_job(P, name, data, opts, now, extra)
  local id = tostring(rcall('INCR', P .. 'id'))
  local fields = {'name', name, 'create_time', now}
  if data and data ~= '' then fields[#fields + 1] = 'data'; fields[#fields + 1] = data end
  if opts and opts ~= '' then fields[#fields + 1] = 'opts'; fields[#fields + 1] = opts end
  if extra then for i = 1, #extra do fields[#fields + 1] = extra[i] end end
  rcall('HSET', P .. 'job:' .. id, unpack(fields))
  return id
end

-- A job created straight into its queue is one entry of P.."newjobs": id -> "name\ncreate_time
-- \nopts\ndata" (opts and data as new_job stores them, "" when absent). Names have no control
-- characters and compact JSON no raw newline, so the split is unambiguous. Its state is 'new'.
-- Returns the new job's id and that record, not written yet: queue_packed writes it, unless
-- hand_off gives the job to an idle worker at once (its claim then writes the job's hash).
local function new_queued_job(P, name, data, opts, now)
  local id = tostring(rcall('INCR', P .. 'id'))
  return id, name .. '\n' .. int_text(now) .. '\n' .. (opts or '') .. '\n' .. (data or '')
end

-- The fields of a packed new job as new_job would have written them, but for its state ('new');
-- and its stored options (JSON) or nil.
local function unpack_new(packed)
  local name, created, opts, data = string.match(packed, '^([^\n]*)\n([^\n]*)\n([^\n]*)\n(.*)$')
  local fields = {'name', name, 'create_time', created}
  if data ~= '' then fields[#fields + 1] = 'data'; fields[#fields + 1] = data end
  if opts == '' then opts = nil else fields[#fields + 1] = 'opts'; fields[#fields + 1] = opts end
  return fields, opts
end

-- If job `id` is a packed new job, take it out of P.."newjobs": its fields (state not included)
-- and stored options, for the caller to write its hash with (in the same script). Else nil.
local function unpack_if_new(P, id)
  local nk = P .. 'newjobs'
  local packed = rcall('HGET', nk, id)
  if not packed then return nil end
  rcall('HDEL', nk, id)
  return unpack_new(packed)
end

-- Is job `id` a packed new job (created straight into its queue, never claimed)?
local function is_packed(P, id)
  return rcall('HEXISTS', P .. 'newjobs', id) == 1
end

-- Give job `id` its hash if it is a packed new job (before anything but a read touches it).
local function materialize(P, id)
  local fields = unpack_if_new(P, id)
  if not fields then return end
  fields[#fields + 1] = 'state'; fields[#fields + 1] = 'new'
  rcall('HSET', P .. 'job:' .. id, unpack(fields))
end

-- The queue entry and the wake token of a job whose state already says new or queued.
local function push_queued(P, id, name)
  rcall('RPUSH', P .. 'queue:' .. name, id)
  rcall('RPUSH', P .. 'wake:' .. name, '1')
end

-- A new job's packed record (new_queued_job) written, and the job queued.
local function queue_packed(P, id, name, packed)
  rcall('HSET', P .. 'newjobs', id, packed)
  push_queued(P, id, name)
end

-- keep_due: a schedule's tick job keeps scheduled_for = its tick; others drop it once queued.
local function enqueue(P, id, name, state, now, keep_due)
  local jk = P .. 'job:' .. id
  local from = rcall('HGET', jk, 'state')
  rcall('HSET', jk, 'state', state, 'update_time', int_text(now))
  note(P, id, name, from, state, from and 'queued' or 'create', now)
  if not keep_due then rcall('HDEL', jk, 'scheduled_for') end
  push_queued(P, id, name)
end

-- Index job `id` in the delayed zset at `due`, writing `fields` (its state and more) in one HSET.
local function delay_job(P, id, due, fields)
  local dk = P .. 'delayed'
  local first = rcall('ZRANGE', dk, 0, 0, 'WITHSCORES')
  if first[2] == nil or due < tonumber(first[2]) then
    -- Wake sleeping reapers: this job is due before anything they are waiting for.
    rcall('PUBLISH', P .. 'reaper', due)
  end
  rcall('ZADD', dk, due, id)
  if #fields > 0 then rcall('HSET', P .. 'job:' .. id, unpack(fields)) end
end

local function schedule(P, id, state, due, now)
  local from, name = unpack(rcall('HMGET', P .. 'job:' .. id, 'state', 'name'))
  delay_job(P, id, due, {'state', state, 'scheduled_for', due, 'update_time', now})
  if state == 'delayed' then note(P, id, name, from, state, 'create', now) end
end

-- Remove a job from whichever structure its state puts it in, and its hash. Returns 1 or 0.
local function remove_job(P, id, now)
  materialize(P, id)
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

-- A run's end made the job terminal: `fields` (optional) are more field/value pairs for its hash.
local function finalise(P, id, state, now, opts, runs, fields)
  local jk = P .. 'job:' .. id
  local total = 0
  for _, run in ipairs(runs) do
    if type(run.time) == 'number' then total = total + run.time end
  end
  local purge_at = string.format('%d', now + ms(opts.purge_timeout))
  fields = fields or {}
  local n = #fields
  fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4] = 'state', state, 'finish_time', int_text(now)
  fields[n + 5], fields[n + 6], fields[n + 7], fields[n + 8] = 'update_time', int_text(now), 'total_process_time', total
  fields[n + 9], fields[n + 10] = 'scheduled_for', purge_at
  rcall('HSET', jk, unpack(fields))
  rcall('ZADD', P .. 'finished', purge_at, id)
  if opts.hotjob then
    -- The whole final job goes with the message, so a waiter needs no further round trip.
    local flat, all = rcall('HGETALL', jk), {}
    for i = 1, #flat, 2 do all[flat[i]] = flat[i + 1] end
    rcall('PUBLISH', P .. 'done', cjson.encode({id = id, job = all}))
  end
end

local function count_runs(runs, state)
  local n = 0
  for _, run in ipairs(runs) do if run.state == state then n = n + 1 end end
  return n
end

-- What end_run reads of a job, in this order.
local RUN_FIELDS = {'opts', 'runs', 'run_start', 'name'}

-- End the current run of a processing job (already checked to be owned by the caller).
-- outcome: 'success' | 'fail' | 'ghost'. Returns the job's new state.
-- `run_ms`, when the worker measured it, gives the run's start (a prefetched job starts after its
-- claim); otherwise the run started at its claim ('run_start'). `read` (optional): the job's
-- RUN_FIELDS as the caller read them with its ownership check.
local function end_run(P, id, now, outcome, result, err, run_ms, read)
  local jk = P .. 'job:' .. id
  rcall('ZREM', P .. 'processing', id)
  -- The run in progress lives in 'run_start' until it ends (claim then writes no JSON).
  local raw_opts, raw_runs, start, name = unpack(read or rcall('HMGET', jk, unpack(RUN_FIELDS)))
  local opts = setmetatable(raw_opts and cjson.decode(raw_opts) or {}, DEFAULTS_META)
  local runs = raw_runs and cjson.decode(raw_runs) or {}
  start = run_ms and now - run_ms or tonumber(start) or now
  local run = {count = #runs + 1, start = start, time = now - start, state = outcome,
               error = outcome ~= 'success' and err or cjson.null}
  runs[#runs + 1] = run
  rcall('HDEL', jk, 'run_start', 'owner', 'at_once')
  -- Everything the run's end writes to the hash goes in one HSET, with the new state's fields.
  local fields = {'runs', encode_runs(runs)}
  if outcome ~= 'success' then
    fields[3], fields[4] = 'last_error', err
  elseif result then
    fields[3], fields[4] = 'result', result
  end
  local new_state
  if outcome == 'success' then
    new_state = 'success'
    finalise(P, id, new_state, now, opts, runs, fields)
  elseif outcome == 'fail' then
    local failed = count_runs(runs, 'fail')
    if opts.retry and failed <= opts.retry_count then
      local interval = opts.retry_interval
      if type(interval) == 'table' then interval = interval[math.min(failed, #interval)] or 0 end
      new_state = 'retry'
      local due = now + ms(interval)
      local n = #fields
      fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4] = 'state', new_state, 'scheduled_for', due
      fields[n + 5], fields[n + 6] = 'update_time', now
      delay_job(P, id, due, fields)
    else
      new_state = 'fail'
      finalise(P, id, new_state, now, opts, runs, fields)
    end
  else
    local ghosts = count_runs(runs, 'ghost')
    if opts.ghost_retry and ghosts <= opts.ghost_count then
      new_state = 'ghost'
      local due = now + ms(opts.ghost_interval)
      local n = #fields
      fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4] = 'state', new_state, 'scheduled_for', due
      fields[n + 5], fields[n + 6] = 'update_time', now
      delay_job(P, id, due, fields)
    else
      new_state = 'fail'
      finalise(P, id, new_state, now, opts, runs, fields)
    end
    -- every ghosted run counts as a ghost, whatever comes of the job
    if new_state == 'fail' then add_stat(bucket_tally(now), 'ghost:' .. (name or '?'), 1) end
  end
  note(P, id, name, 'processing', new_state, new_state, now, run.time)
  return new_state
end

-- Claim job `id` of `name`, just taken from its queue or never queued (a new job handed over as it
-- is created, with its `packed` record, never written): see claim. Returns the claim reply, or nil
-- when `id` was no waiting job (a leftover of a job that moved on).
local function claim_job(P, id, name, now, claimer, prefetched, packed)
  local jk = P .. 'job:' .. id
  -- A packed new job gets its hash in the same HSET that makes it processing.
  local writes, raw_opts
  if packed then writes, raw_opts = unpack_new(packed) else writes, raw_opts = unpack_if_new(P, id) end
  local fresh = writes ~= nil  -- then its new hash is exactly `writes`: no need to read it back
  local state = 'new'
  if not writes then state, raw_opts = unpack(rcall('HMGET', jk, 'state', 'opts')) end
  if state ~= 'new' and state ~= 'queued' then return nil end
  local timeout = raw_opts and cjson.decode(raw_opts).process_timeout or DEFAULTS.process_timeout
  local attempt = 1
  if writes then
    writes[#writes + 1] = 'attempt'; writes[#writes + 1] = '1'
  else
    writes = {}
    attempt = rcall('HINCRBY', jk, 'attempt', 1)
  end
  local n = #writes
  writes[n + 1] = 'state'; writes[n + 2] = 'processing'; writes[n + 3] = 'update_time'; writes[n + 4] = int_text(now)
  if prefetched then
    writes[n + 5] = 'owner'; writes[n + 6] = claimer
  elseif claimer ~= '' then
    -- The claimer owns the run: after Redis lost its data, ids and attempts start again at 1,
    -- and only the owner tells a new job 1 from the old one a late finish was for. 'at_once' tells
    -- abandon this run_start from one a start mark wrote (a claim ahead).
    writes[n + 5] = 'run_start'; writes[n + 6] = now; writes[n + 7] = 'owner'; writes[n + 8] = claimer
    writes[n + 9] = 'at_once'; writes[n + 10] = '1'
  else
    writes[n + 5] = 'run_start'; writes[n + 6] = now
  end
  rcall('HSET', jk, unpack(writes))
  note(P, id, name, state, 'processing', 'processing', now)
  rcall('ZADD', P .. 'processing', string.format('%d', now + ms(timeout) + LEASE_GRACE_MS), id)
  if claimer ~= '' and not prefetched then
    rcall('SET', P .. 'claim:' .. claimer, id .. ' ' .. attempt, 'EX', 86400)
  end
  local reply = {id, attempt}
  local fields = fresh and writes or rcall('HGETALL', jk)
  -- tostring: a number read back from the hash would be the string HSET stored (%.14g)
  for i = 1, #fields do reply[#reply + 1] = tostring(fields[i]) end
  return reply
end

-- Take the first waiting job of the first non-empty queue, in the priority order of `names`.
-- A plain claim (a worker woke on a token, or polled) leaves the wake tokens equal to the queue
-- lengths; a `chained` claim (inside finish) just takes the claimed job's own token.
-- `claimer` (optional) names the caller: its last claim is kept in P.."claim:"..claimer, so a
-- caller whose reply was lost (a timeout after Redis ran the script) can find the job it now owns.
-- `prefetched`: the caller claims a batch (finish_many) and runs the jobs one after the other, so
-- this run's start is not known here: no 'run_start', and the caller records the whole batch.
-- Returns {id, attempt token, HGETALL fields...} or nil.
local function claim(P, names, now, claimer, chained, prefetched)
  for _, name in ipairs(names) do
    local q = P .. 'queue:' .. name
    while true do
      local id = rcall('LPOP', q)
      if not id then break end
      local reply = claim_job(P, id, name, now, claimer, prefetched)
      if reply then
        if chained then
          -- Claimed in the same call that finished the last job: the job's token is still there.
          rcall('LPOP', P .. 'wake:' .. name)
        else
          reconcile_wake(P, names)
        end
        return reply
      end
      -- Anything else is a leftover of a job that moved on; dropping it keeps one structure per job.
    end
  end
  if not chained then reconcile_wake(P, names) end
  return nil
end

-- Is job `id` processing under this attempt `token`, and (when it names one) run by `claimer`?
-- Returns its state (false: no such job), whether the caller may end the run, and the values of
-- the `more` fields (a list, optional) read in the same call.
local function owns(P, id, token, claimer, more)
  local got = rcall('HMGET', P .. 'job:' .. id, 'state', 'attempt', 'owner', unpack(more or {}))
  local state, attempt, owner = got[1], got[2], got[3]
  if not state then
    if is_packed(P, id) then return 'new', false end  -- never claimed
    return false, false
  end
  local values = {}
  for i = 4, #got do values[i - 3] = got[i] end
  return state, state == 'processing' and attempt == token and not (claimer ~= '' and owner and owner ~= claimer),
         values
end

-- Add `pairs` ("id attempt" each) to the claim record P.."claim:"..claimer, keeping the jobs it
-- names that the claimer still holds, so that whoever cleans up after it finds them all.
-- `ended` (optional): a set of "id attempt" known to be ended already (no need to look).
local function record_claims(P, claimer, pairs, ended)
  local ck = P .. 'claim:' .. claimer
  local held = {}
  for id, token in string.gmatch(rcall('GET', ck) or '', '(%S+) (%S+)') do
    local pair = id .. ' ' .. token
    if not (ended and ended[pair]) then
      local _, mine = owns(P, id, token, claimer)
      if mine then held[#held + 1] = pair end
    end
  end
  for _, pair in ipairs(pairs) do held[#held + 1] = pair end
  if #held == 0 then
    rcall('DEL', ck)
  else
    rcall('SET', ck, table.concat(held, ' '), 'EX', 86400)
  end
end

-- Give a claimed job that never started back to the front of its queue (processing -> queued).
-- Its attempt stays counted, so a late finish from the claim given back cannot match a new one.
local function release(P, id, now)
  local jk = P .. 'job:' .. id
  local name = rcall('HGET', jk, 'name')
  rcall('ZREM', P .. 'processing', id)
  rcall('HSET', jk, 'state', 'queued', 'update_time', int_text(now))
  rcall('HDEL', jk, 'run_start', 'owner', 'at_once')
  note(P, id, name, 'processing', 'queued', 'released', now)
  rcall('LPUSH', P .. 'queue:' .. name, id)
  rcall('RPUSH', P .. 'wake:' .. name, '1')
end

-- End one run the caller reports finished: checked against token and owner first. `ago`: ms
-- since it ended. Returns its status (ok | stale | missing) and the job's state after this ('' = gone).
local function finish_one(P, now, claimer, id, token, outcome, payload, run_ms, ago)
  local state, mine, read = owns(P, id, token, claimer, RUN_FIELDS)
  if not state then return 'missing', '' end
  if not mine then return 'stale', state end
  local result, err = false, false
  if outcome == 'success' then
    if payload ~= '' then result = payload end
  else
    err = payload
  end
  -- whole ms: every time field, score and event is an integer
  local ended = now - math.floor(math.min(math.max(ago or 0, 0), 60000) + 0.5)
  return 'ok', end_run(P, id, ended, outcome, result, err, run_ms and math.floor(run_ms + 0.5), read)
end

-- End each run of a batch: `args` from index `at` holds `n` groups of (id, token, outcome, payload,
-- run ms, ms since the run ended). Returns the statuses, the job states after it and the next index.
local function finish_runs(P, now, claimer, args, at, n)
  local statuses, states = {}, {}
  for i = 1, n do
    statuses[i], states[i] = finish_one(P, now, claimer, args[at], args[at + 1], args[at + 2], args[at + 3],
                                        tonumber(args[at + 4]), tonumber(args[at + 5]))
    at = at + 6
  end
  return statuses, states, at
end

-- A job claimed ahead (a batch, a hand-off: no 'run_start') whose run the worker says is starting:
-- from now on a lost run of it is ghosted, not given back as never started. `ago`: ms since it
-- started (false: not known; its claim time then).
local function mark_started(P, claimer, id, token, now, ago)
  local _, mine, read = owns(P, id, token, claimer, {'run_start', 'update_time'})
  if not mine or read[1] then return end
  local start = ago and now - math.floor(math.min(math.max(ago, 0), 60000) + 0.5)
  rcall('HSET', P .. 'job:' .. id, 'run_start', start or tonumber(read[2]) or now)
end

-- A worker's journal, P.."done:"..claimer. The worker RPUSHes one entry the moment a handler
-- returns, a plain command (the outcome is in Redis at once, and cheaply); the runs are ended in
-- batches: by the worker's next finish_many, by abandon when the worker is gone, by recover when a
-- lease of its expires. Entry: JSON [id, token, outcome, payload, run ms, ended at on the worker
-- host's monotonic clock in ms]; `mono_now` is that clock now (false: not known, the runs then
-- ended now). Outcome 'start' marks the start of a job claimed ahead (mark_started), sent before
-- its handler runs; `marks` false skips them (abandon: the master knows which run began, and a
-- mark may precede a start the worker did not live to make). A mark whose run ends in the same
-- journal, or in the same call (`ending`, optional: a set of "id token"), is skipped: ending the
-- run would erase it. Returns the entries not saved, as {id, token, status, state} each, and the
-- set of "id token" of the runs the journal ended, with `ending`.
local function apply_journal(P, claimer, now, mono_now, marks, ending)
  local key = P .. 'done:' .. claimer
  local raws = rcall('LRANGE', key, 0, -1)
  if #raws == 0 then return {}, ending or {} end
  rcall('DEL', key)
  local entries, ended = {}, ending or {}
  for _, raw in ipairs(raws) do
    local ok, e = pcall(cjson.decode, raw)
    if ok and type(e) == 'table' and e[1] then
      e[1], e[2] = tostring(e[1]), tostring(e[2])
      entries[#entries + 1] = e
      if e[3] ~= 'start' then ended[e[1] .. ' ' .. e[2]] = true end
    end
  end
  local rejected = {}
  for _, e in ipairs(entries) do
    local id, token = e[1], e[2]
    local ago = mono_now and e[6] and (mono_now - tonumber(e[6]))
    if e[3] == 'start' then
      if marks and not ended[id .. ' ' .. token] then mark_started(P, claimer, id, token, now, ago) end
    else
      local status, state = finish_one(P, now, claimer, id, token, e[3], e[4] or '', tonumber(e[5]), ago or 0)
      if status ~= 'ok' then rejected[#rejected + 1] = {id, token, status, state} end
    end
  end
  return rejected, ended
end

-- Hand-off to idle workers. A supervisor's worker that finds nothing to claim registers as idle
-- and blocks on its inbox, P.."inbox:"..claimer, as well as on the wake tokens:
--   P.."idle:"..name      zset  claimer -> registration expiry (ms); it is renewed at every BLPOP
--                              timeout, so a dead worker's entry lapses by itself
--   P.."idler:"..claimer  string  the names it registered under (JSON), to unregister from all
-- A new job whose name has an idle worker is claimed for that worker by the create itself and
-- handed over in the inbox (the claim's reply, JSON): the worker starts it the moment BLPOP
-- returns, without a claim round trip. The claim is a batch claim of one job (claim record, no
-- 'run_start'), so a death deals with it as with any job claimed ahead (see abandon and recover).
local HANDOFF_TTL = 86400  -- seconds: cleanup only; abandon and recover empty an inbox

local function unidle(P, claimer)
  local ik = P .. 'idler:' .. claimer
  local raw = rcall('GET', ik)
  if not raw then return end
  for _, name in ipairs(cjson.decode(raw)) do rcall('ZREM', P .. 'idle:' .. name, claimer) end
  rcall('DEL', ik)
end

-- Called only after the caller's inbox was taken (claim.lua, finish_many.lua): it is empty here.
local function register_idle(P, claimer, names, now, ttl_ms)
  -- The claim record drops the jobs the worker no longer holds (none, as it found nothing to do):
  -- a create that hands it a job then has none to look at.
  record_claims(P, claimer, {})
  -- Both keys lapse a minute after the last registration that renewed them (dead workers' leftovers).
  for _, name in ipairs(names) do
    local ik = P .. 'idle:' .. name
    rcall('ZADD', ik, string.format('%d', now + ttl_ms), claimer)
    rcall('PEXPIRE', ik, ttl_ms + 60000)
  end
  rcall('SET', P .. 'idler:' .. claimer, cjson.encode(names), 'PX', ttl_ms + 60000)
end

-- Job `id` of `name` was just created (`packed`: its record, from new_queued_job), not queued yet:
-- if a worker of that name is registered as idle, claim the oldest waiting job of the name for it
-- (this one when none waits: its record is then never written), else queue it.
local function hand_off(P, name, now, id, packed)
  local ik = P .. 'idle:' .. name
  -- One call when no worker is idle (a busy queue: every create asks)
  local first = rcall('ZRANGE', ik, 0, 0, 'WITHSCORES')
  if first[1] and tonumber(first[2]) < now then  -- lapsed registrations (dead workers) go first
    rcall('ZREMRANGEBYSCORE', ik, '-inf', '(' .. now)
    first = rcall('ZRANGE', ik, 0, 0)
  end
  if not first[1] then return queue_packed(P, id, name, packed) end
  local claimer = first[1]
  unidle(P, claimer)
  -- Claimed as a batch claim is (no 'run_start'): Redis cannot know whether the worker got it (a
  -- BLPOP served to a worker whose host just died pops the entry all the same), so a death before
  -- its start was known (the master's S message, the worker's start mark) gives it back rather
  -- than ghosting a run that never began.
  local got
  if rcall('LLEN', P .. 'queue:' .. name) == 0 then
    got = claim_job(P, id, name, now, claimer, true, packed)  -- never queued nor packed
  else
    queue_packed(P, id, name, packed)  -- older jobs wait: the oldest goes first
    got = claim(P, {name}, now, claimer, false, true)
  end
  if not got then return end
  record_claims(P, claimer, {got[1] .. ' ' .. got[2]})
  local box = P .. 'inbox:' .. claimer
  rcall('RPUSH', box, cjson.encode(got))
  rcall('EXPIRE', box, HANDOFF_TTL)
end

-- An inbox entry, decoded, if the job is still processing under that claim; else nil.
local function inbox_entry(P, claimer, raw)
  local ok, e = pcall(cjson.decode, raw)
  if not (ok and type(e) == 'table' and e[1] and e[2]) then return nil end
  e[1] = tostring(e[1])
  local _, mine = owns(P, e[1], tostring(e[2]), claimer)
  if mine then return e end
  return nil
end

-- The caller (the worker itself) takes up to `limit` jobs handed over to it: {claim reply, ...}.
local function take_inbox(P, claimer, limit)
  local box, taken = P .. 'inbox:' .. claimer, {}
  while #taken < limit do
    local raw = rcall('LPOP', box)
    if not raw then break end
    taken[#taken + 1] = inbox_entry(P, claimer, raw)
  end
  return taken
end

-- The worker is gone or lost: what is still in its inbox never reached it, back to the queues.
local function release_inbox(P, claimer, now)
  local box = P .. 'inbox:' .. claimer
  local entries = rcall('LRANGE', box, 0, -1)
  if #entries == 0 then return 0 end
  rcall('DEL', box)
  local n = 0
  for i = #entries, 1, -1 do  -- last first: each goes to the front of its queue
    local e = inbox_entry(P, claimer, entries[i])
    if e then
      release(P, e[1], now)
      n = n + 1
    end
  end
  return n
end
