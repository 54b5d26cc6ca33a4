--[[ recover: processing jobs whose lease expired (worker, supervisor or host lost) -> ghost | fail.
  KEYS[1]  P.."id"   (routing only)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  at most this many jobs
  ARGV[4]  error text recorded on the run
  Returns  {recovered count, earliest remaining lease or -1}
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local ids = rcall('ZRANGEBYSCORE', P .. 'processing', '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  if rcall('EXISTS', P .. 'job:' .. id) == 1 then
    end_run(P, id, now, 'ghost', false, ARGV[4])
  else
    rcall('ZREM', P .. 'processing', id)
  end
end
return {#ids, next_score(P .. 'processing')}
