--[[ requeue: fail -> queued, under the same id (the admin command `kickq retry ID`).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  job id
  Returns  {status, state}: 'ok' and 'queued'; 'missing' and ''; 'not_failed' and the job's state
           (only a failed job is requeued; nothing is written otherwise).
  The job leaves P.."finished" and goes to the back of its queue with a wake token. Its runs,
  attempt token, last_error and result are kept; finish_time, total_process_time and the purge time
  are dropped. The retry budget is not reset: failed runs still count towards retry_count.
  A schedule's tick job gets scheduled_for = its tick again, as when it was first queued.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local id = ARGV[3]
local jk = P .. 'job:' .. id
local state, name, tick = unpack(rcall('HMGET', jk, 'state', 'name', 'tick'))
if not state then
  if is_packed(P, id) then return {'not_failed', 'new'} end
  return {'missing', ''}
end
if state ~= 'fail' then return {'not_failed', state} end
rcall('ZREM', P .. 'finished', id)
rcall('HDEL', jk, 'finish_time', 'total_process_time')
enqueue(P, id, name, 'queued', now)
if tick then rcall('HSET', jk, 'scheduled_for', tick) end
return {'ok', 'queued'}
