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

local function job_options(jk)
  local o = {}
  for k, v in pairs(DEFAULTS) do o[k] = v end
  local raw = rcall('HGET', jk, 'opts')
  if raw then for k, v in pairs(cjson.decode(raw)) do o[k] = v end end
  return o
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

local function enqueue(P, id, name, state, now)
  local jk = P .. 'job:' .. id
  rcall('HSET', jk, 'state', state, 'update_time', now)
  rcall('HDEL', jk, 'scheduled_for')
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
  rcall('HSET', P .. 'job:' .. id, 'state', state, 'scheduled_for', due, 'update_time', now)
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
  local run = runs[#runs]
  if run then
    run.time = now - run.start
    run.state = outcome
    if outcome ~= 'success' then run.error = err end
  end
  if outcome == 'success' then
    if result then rcall('HSET', jk, 'result', result) end
  else
    rcall('HSET', jk, 'last_error', err)
  end
  rcall('HSET', jk, 'runs', encode_runs(runs))
  local new_state
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
  end
  return new_state
end

-- Take the first waiting job of the first non-empty queue, in the priority order of `names`.
-- `claimer` (optional) names the caller: its last claim is kept in P.."claim:"..claimer, so a
-- caller whose reply was lost (a timeout after Redis ran the script) can find the job it now owns.
-- Returns {id, attempt token, HGETALL fields...} or nil.
local function claim(P, names, now, claimer)
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
        local runs = decode_runs(jk)
        runs[#runs + 1] = {count = #runs + 1, start = now, time = cjson.null, state = 'processing',
                           error = cjson.null}
        rcall('HSET', jk, 'state', 'processing', 'update_time', now, 'runs', encode_runs(runs))
        rcall('ZADD', P .. 'processing', now + ms(opts.process_timeout) + LEASE_GRACE_MS, id)
        reconcile_wake(P, names)
        if claimer ~= '' then rcall('SET', P .. 'claim:' .. claimer, id .. ' ' .. attempt, 'EX', 86400) end
        local reply = {id, attempt}
        local fields = rcall('HGETALL', jk)
        for i = 1, #fields do reply[#reply + 1] = fields[i] end
        return reply
      end
      -- Anything else is a leftover of a job that moved on; dropping it keeps one structure per job.
    end
  end
  reconcile_wake(P, names)
  return nil
end
