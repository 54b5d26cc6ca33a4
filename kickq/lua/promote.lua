--[[ promote: delayed | retry | ghost jobs that are due -> queued. A schedule's pending tick job
  also creates the next tick's job here, in the same step (see advance_schedule in
  _lib_schedule.lua).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  at most this many jobs
  Returns  {promoted count, earliest remaining due time or -1, now}
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local dk = P .. 'delayed'
local ids = rcall('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  rcall('ZREM', dk, id)
  local jk = P .. 'job:' .. id
  local name, sid, due, state = unpack(rcall('HMGET', jk, 'name', 'schedule', 'scheduled_for', 'state'))
  -- Only a waiting job moves on; anything else is a leftover id (its job moved on or is gone).
  if name and (state == 'delayed' or state == 'retry' or state == 'ghost') then
    local run = true
    if sid then run = advance_schedule(P, sid, id, tonumber(due), now) end
    if run then
      enqueue(P, id, name, 'queued', now, sid ~= false)
    else  -- a missed tick with catch_up 'skip'
      local from = rcall('HGET', jk, 'state')
      rcall('DEL', jk)
      note(P, id, name, from, false, 'delete', now)
    end
  end
end
return {#ids, next_score(dk), now}
