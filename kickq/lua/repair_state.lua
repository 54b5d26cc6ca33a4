--[[ repair_state: a job whose state is missing or unknown, or that has no name, becomes 'fail'
  (`kickq doctor --repair`).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  job id
  ARGV[4..] job names whose queue may hold the id (the job's own name is added here)
  Returns  1 when it was repaired; 0 when the hash is gone, or it has a name and a known state.
  The job leaves every structure and is finalised as 'fail' (finished zset, purge time, hotjob
  message) with last_error saying what its state was. Counts are not touched: the doctor measures
  and mends them afterwards. Notes a 'repair' event.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local id = ARGV[3]
local jk = P .. 'job:' .. id
if rcall('EXISTS', jk) == 0 then return 0 end
local state, name = unpack(rcall('HMGET', jk, 'state', 'name'))
local known = {new = 1, queued = 1, delayed = 1, retry = 1, ghost = 1, processing = 1, success = 1, fail = 1}
if state and known[state] and name then return 0 end
if not name then
  name = '?'
  rcall('HSET', jk, 'name', name)
end
for _, n in ipairs({name, unpack(ARGV, 4)}) do rcall('LREM', P .. 'queue:' .. n, 0, id) end
for _, z in ipairs({'delayed', 'processing', 'finished'}) do rcall('ZREM', P .. z, id) end
local why = 'no name'
if not state then why = 'no state' elseif not known[state] then why = 'the unknown state ' .. cjson.encode(state) end
rcall('HSET', jk, 'last_error', 'kickq doctor: the job had ' .. why .. '; marked fail')
finalise(P, id, 'fail', now, job_options(jk), decode_runs(jk))
note(P, id, name, false, false, 'repair', now)
return 1
