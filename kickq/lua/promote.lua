--[[ promote: delayed | retry | ghost jobs that are due -> queued.
  KEYS[1]  P.."id"   (routing only)
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
  local name = rcall('HGET', P .. 'job:' .. id, 'name')
  if name then enqueue(P, id, name, 'queued', now) end
end
return {#ids, next_score(dk), now}
