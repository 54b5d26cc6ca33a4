--[[ extend: top up a cron schedule's upcoming ticks (the reaper computes them with croniter) and,
  if its pending tick job is gone (ticks ran out, or it was deleted), create one.
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  schedule id
  ARGV[4..] ticks (epoch ms)
  Returns  {ticks now held, pending job id}
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local sid = ARGV[3]
local sk = P .. 'schedules'
local raw = rcall('HGET', sk, sid)
if not raw then return {0, ''} end
local s = cjson.decode(raw)
local tk = P .. 'ticks:' .. sid
if s.every_ms then return {0, s.pending} end
for i = 4, #ARGV do
  if tonumber(ARGV[i]) > s.last_tick then rcall('ZADD', tk, 'NX', ARGV[i], ARGV[i]) end
end
if s.pending ~= '' and rcall('EXISTS', P .. 'job:' .. s.pending) == 0 then s.pending = '' end
if s.pending == '' then
  local t = next_tick(P, s, s.last_tick)
  if t then
    s.pending = tick_job(P, s, t, now)
    s.next_run = t
    rcall('HSET', sk, sid, cjson.encode(s))
  end
end
return {rcall('ZCARD', tk), s.pending}
