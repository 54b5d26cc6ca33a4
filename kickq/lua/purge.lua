--[[ purge: finished (success | fail) jobs past their purge time -> deleted.
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  at most this many jobs
  Returns  {purged count, earliest remaining purge time or -1}
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local fk = P .. 'finished'
local ids = rcall('ZRANGEBYSCORE', fk, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  rcall('ZREM', fk, id)
  local jk = P .. 'job:' .. id
  local state, name = unpack(rcall('HMGET', jk, 'state', 'name'))
  rcall('DEL', jk)
  if state then note(P, id, name, state, false, 'purge', now) end
end
return {#ids, next_score(fk)}
