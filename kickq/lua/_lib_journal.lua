--[[ _lib_journal.lua: ending the runs a worker reports, one by one (finish_one: checked against
  the attempt token and the owner first) or from its journal (apply_journal), and the start
  marks of jobs claimed ahead (mark_started).
  Keys:
    P.."done:"..claimer  list  the worker's journal
    P.."job:"..id
]]
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
