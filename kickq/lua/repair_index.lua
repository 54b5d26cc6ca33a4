--[[ repair_index: put a job in exactly the structure its state calls for (`kickq doctor --repair`):
  out of every other one, into its own once. A processing job without a lease gets a fresh one
  (now + process_timeout + grace): a worker still running it can finish, and if none is, the
  reaper recovers it when the lease expires.
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  job id
  ARGV[4..] job names whose queue may hold the id (the job's own name is added here)
  Returns  {action, ...}: what was done, e.g. "removed from delayed", "added to processing";
           empty when nothing was wrong, or the hash is gone, or its state is unknown (see
           repair_state.lua). Notes a 'repair' event when it changed something; counts untouched
           (they follow the state, which does not change).
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local id = ARGV[3]
materialize(P, id)  -- a packed new job gets its hash: the code below reads and writes it
local jk = P .. 'job:' .. id
local state, name, due = unpack(rcall('HMGET', jk, 'state', 'name', 'scheduled_for'))
local own
if state == 'new' or state == 'queued' then own = 'queue:' .. (name or '')
elseif state == 'delayed' or state == 'retry' or state == 'ghost' then own = 'delayed'
elseif state == 'processing' then own = 'processing'
elseif state == 'success' or state == 'fail' then own = 'finished'
else return {} end
if not name then return {} end
local done = {}
local seen = {[name] = true}
local names = {name}
for i = 4, #ARGV do
  if not seen[ARGV[i]] then seen[ARGV[i]] = true; names[#names + 1] = ARGV[i] end
end
for _, n in ipairs(names) do
  local q = P .. 'queue:' .. n
  local label = 'queue:' .. n
  if label == own then
    local c = 0
    for _, member in ipairs(rcall('LRANGE', q, 0, -1)) do if member == id then c = c + 1 end end
    if c > 1 then
      rcall('LREM', q, -(c - 1), id)  -- keep the first (oldest) place in the queue
      done[#done + 1] = 'removed ' .. (c - 1) .. ' extra from ' .. label
    elseif c == 0 then
      rcall('RPUSH', q, id)
      rcall('RPUSH', P .. 'wake:' .. n, '1')
      done[#done + 1] = 'added to ' .. label
    end
  elseif rcall('LREM', q, 0, id) > 0 then
    done[#done + 1] = 'removed from ' .. label
  end
end
for _, z in ipairs({'delayed', 'processing', 'finished'}) do
  local zk = P .. z
  if z ~= own then
    if rcall('ZREM', zk, id) > 0 then done[#done + 1] = 'removed from ' .. z end
  elseif not rcall('ZSCORE', zk, id) then
    local opts = job_options(jk)
    local score
    if z == 'processing' then
      score = now + ms(opts.process_timeout) + LEASE_GRACE_MS
    elseif z == 'delayed' then
      score = tonumber(due) or now
      if not due then rcall('HSET', jk, 'scheduled_for', score) end
    else
      score = tonumber(due) or (now + ms(opts.purge_timeout))
      if not due then rcall('HSET', jk, 'scheduled_for', score) end
    end
    rcall('ZADD', zk, score, id)
    if z == 'delayed' then
      local first = rcall('ZRANGE', zk, 0, 0, 'WITHSCORES')
      if first[1] == id then rcall(PUBLISH, P .. 'reaper', score) end
    end
    done[#done + 1] = 'added to ' .. z
  end
end
if #done > 0 then note(P, id, name, false, false, 'repair', now) end
return done
