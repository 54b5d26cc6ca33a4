--[[ _lib_run.lua: the end of a run (end_run). Success; or a failed or ghosted run, retried later
  (back in the delayed zset) or making the job fail. A job that reached success or fail is
  finalised: its purge time in P.."finished", a hotjob's waiters told on P.."done". A job's ended
  runs are JSON in its hash.
  Keys:
    P.."job:"..id  P.."processing"  P.."finished"  P.."done"
]]
local function decode_runs(jk)
  local raw = rcall('HGET', jk, 'runs')
  if raw then return cjson.decode(raw) end
  return {}
end

local function encode_runs(runs)
  if #runs == 0 then return '[]' end
  return cjson.encode(runs)
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
    rcall(PUBLISH, P .. 'done', cjson.encode({id = id, job = all}))
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
