--[[ _lib_schedule.lua: schedules (cron / every). A schedule is a JSON record in the hash
  P.."schedules"; its `pending` job is an ordinary delayed job due at the next tick, with a
  'schedule' field. Cron ticks are computed by Python (croniter) ahead of time into the zset
  P.."ticks:"..id; `every` ticks are arithmetic. When the pending job is promoted, the next
  tick's job is created in the same step (advance_schedule).
  Keys:
    P.."schedules"  P.."ticks:"..id  P.."job:"..id
]]
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
