--[[ unschedule: remove a schedule, its upcoming ticks and its pending tick job.
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  schedule id
  Returns  1 when the schedule existed, else 0. Jobs of earlier ticks are left alone.
]]
local P, sid = ARGV[1], ARGV[2]
local sk = P .. 'schedules'
local raw = rcall('HGET', sk, sid)
if not raw then return 0 end
local s = cjson.decode(raw)
if s.pending and s.pending ~= '' then remove_job(P, s.pending, clock('')) end
rcall('DEL', P .. 'ticks:' .. sid)
rcall('HDEL', sk, sid)
return 1
