--[[ _lib_structures.lua: a job's place. A job's hash made; a job put in the structure its state
  calls for (its queue and a wake token, or the delayed zset); a job taken out of whichever
  structure its state puts it in, and deleted (remove_job). The map: _lib_core.lua's header.
  Keys:
    P.."id"  P.."job:"..id  P.."newjobs"  P.."queue:"..name  P.."wake:"..name
    P.."delayed"  P.."processing"  P.."finished"
    P.."reaper"  channel  wakes sleeping reapers when a job is due before all the others
    P.."done"    channel  tells a deleted hotjob's waiters
]]
-- A new job's hash, in one write; `extra` (optional) holds more field/value pairs. update_time is
-- left out until the job first changes (Job reads it as create_time): waiting jobs stay smaller.
local function new_job(P, name, data, opts, now, extra)
  local id = tostring(rcall('INCR', P .. 'id'))
  local fields = {'name', name, 'create_time', now}
  if data and data ~= '' then fields[#fields + 1] = 'data'; fields[#fields + 1] = data end
  if opts and opts ~= '' then fields[#fields + 1] = 'opts'; fields[#fields + 1] = opts end
  if extra then for i = 1, #extra do fields[#fields + 1] = extra[i] end end
  rcall('HSET', P .. 'job:' .. id, unpack(fields))
  return id
end

-- The queue entry and the wake token of a job whose state already says new or queued.
local function push_queued(P, id, name)
  rcall('RPUSH', P .. 'queue:' .. name, id)
  rcall('RPUSH', P .. 'wake:' .. name, '1')
end

-- A new job's packed record (new_queued_job) written, and the job queued.
local function queue_packed(P, id, name, packed)
  rcall('HSET', P .. 'newjobs', id, packed)
  push_queued(P, id, name)
end

-- keep_due: a schedule's tick job keeps scheduled_for = its tick; others drop it once queued.
local function enqueue(P, id, name, state, now, keep_due)
  local jk = P .. 'job:' .. id
  local from = rcall('HGET', jk, 'state')
  rcall('HSET', jk, 'state', state, 'update_time', int_text(now))
  note(P, id, name, from, state, from and 'queued' or 'create', now)
  if not keep_due then rcall('HDEL', jk, 'scheduled_for') end
  push_queued(P, id, name)
end

-- Index job `id` in the delayed zset at `due`, writing `fields` (its state and more) in one HSET.
local function delay_job(P, id, due, fields)
  local dk = P .. 'delayed'
  local first = rcall('ZRANGE', dk, 0, 0, 'WITHSCORES')
  if first[2] == nil or due < tonumber(first[2]) then
    -- Wake sleeping reapers: this job is due before anything they are waiting for.
    rcall(PUBLISH, P .. 'reaper', due)
  end
  rcall('ZADD', dk, due, id)
  if #fields > 0 then rcall('HSET', P .. 'job:' .. id, unpack(fields)) end
end

local function schedule(P, id, state, due, now)
  local from, name = unpack(rcall('HMGET', P .. 'job:' .. id, 'state', 'name'))
  delay_job(P, id, due, {'state', state, 'scheduled_for', due, 'update_time', now})
  if state == 'delayed' then note(P, id, name, from, state, 'create', now) end
end

-- Remove a job from whichever structure its state puts it in, and its hash. Returns 1 or 0.
local function remove_job(P, id, now)
  materialize(P, id)
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
  note(P, id, name, state, false, 'delete', now)
  if hot then rcall(PUBLISH, P .. 'done', cjson.encode({id = id, deleted = true})) end
  return 1
end
