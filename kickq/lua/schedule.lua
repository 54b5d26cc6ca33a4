--[[ schedule: create or replace a schedule and its first tick job (state delayed).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  schedule id (validated like a job name)
  ARGV[4]  record JSON: {name, data, opts, cron | every_ms, timezone, catch_up}
  ARGV[5..] cron: the upcoming ticks (epoch ms, ascending); every: none (first tick = now + every)
  Returns  {pending job id, first tick}
  Replacing a schedule deletes its pending tick job and its ticks; last_job_id is kept.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local sid = ARGV[3]
local sk = P .. 'schedules'
local s = cjson.decode(ARGV[4])
s.id = sid
s.last_job_id = ''
s.last_tick = -1
local old = rcall('HGET', sk, sid)
if old then
  local o = cjson.decode(old)
  s.last_job_id = o.last_job_id or ''
  if o.pending and o.pending ~= '' then remove_job(P, o.pending, now) end
end
local tk = P .. 'ticks:' .. sid
rcall('DEL', tk)
local first
if s.every_ms then
  first = now + s.every_ms
else
  for i = 5, #ARGV do rcall('ZADD', tk, ARGV[i], ARGV[i]) end
  first = tonumber(ARGV[5])
end
s.pending = tick_job(P, s, first, now)
s.next_run = first
rcall('HSET', sk, sid, cjson.encode(s))
return {s.pending, first}
