--[[ delete: any state -> gone. A worker still running the job later gets 'missing' from finish.
  KEYS[1]  P.."id"   (routing only)
  ARGV[1]  P
  ARGV[2]  job id
  Returns  1 when the job existed, else 0. Hotjob waiters are told through P.."done".
]]
local P, id = ARGV[1], ARGV[2]
local jk = P .. 'job:' .. id
local state, name = unpack(rcall('HMGET', jk, 'state', 'name'))
if not state then return 0 end
if state == 'new' or state == 'queued' then
  rcall('LREM', P .. 'queue:' .. name, 1, id)
elseif state == 'delayed' or state == 'retry' or state == 'ghost' then
  rcall('ZREM', P .. 'delayed', id)
elseif state == 'processing' then
  rcall('ZREM', P .. 'processing', id)
else
  rcall('ZREM', P .. 'finished', id)
end
local hot = job_options(jk).hotjob
rcall('DEL', jk)
if hot then rcall('PUBLISH', P .. 'done', cjson.encode({id = id, deleted = true})) end
return 1
