--[[ _lib_packed.lua: new jobs packed in P.."newjobs" (the format is PACKED_FIELDS in
  kickq/layout.py). A job created straight into its queue and not claimed yet has no hash of its
  own but one field of that hash, which saves the per-key overhead of a backlog of new jobs. Its
  first claim, or any script that does more than read it, takes it out and writes its hash.
  Keys:
    P.."id"        string  the last job id (INCR)
    P.."newjobs"   hash    id -> "name\ncreate_time\nopts\ndata"
    P.."job:"..id  hash    the job once it is out of the packed hash
]]
-- A job created straight into its queue is one entry of P.."newjobs": id -> "name\ncreate_time
-- \nopts\ndata" (opts and data as new_job stores them, "" when absent). Names have no control
-- characters and compact JSON no raw newline, so the split is unambiguous. Its state is 'new'.
-- Returns the new job's id and that record, not written yet: queue_packed writes it, unless
-- hand_off gives the job to an idle worker at once (its claim then writes the job's hash).
local function new_queued_job(P, name, data, opts, now)
  local id = tostring(rcall('INCR', P .. 'id'))
  return id, name .. '\n' .. int_text(now) .. '\n' .. (opts or '') .. '\n' .. (data or '')
end

-- The fields of a packed new job as new_job would have written them, but for its state ('new');
-- and its stored options (JSON) or nil.
local function unpack_new(packed)
  local name, created, opts, data = string.match(packed, '^([^\n]*)\n([^\n]*)\n([^\n]*)\n(.*)$')
  local fields = {'name', name, 'create_time', created}
  if data ~= '' then fields[#fields + 1] = 'data'; fields[#fields + 1] = data end
  if opts == '' then opts = nil else fields[#fields + 1] = 'opts'; fields[#fields + 1] = opts end
  return fields, opts
end

-- If job `id` is a packed new job, take it out of P.."newjobs": its fields (state not included)
-- and stored options, for the caller to write its hash with (in the same script). Else nil.
local function unpack_if_new(P, id)
  local nk = P .. 'newjobs'
  local packed = rcall('HGET', nk, id)
  if not packed then return nil end
  rcall('HDEL', nk, id)
  return unpack_new(packed)
end

-- Is job `id` a packed new job (created straight into its queue, never claimed)?
local function is_packed(P, id)
  return rcall('HEXISTS', P .. 'newjobs', id) == 1
end

-- Give job `id` its hash if it is a packed new job (before anything but a read touches it).
local function materialize(P, id)
  local fields = unpack_if_new(P, id)
  if not fields then return end
  fields[#fields + 1] = 'state'; fields[#fields + 1] = 'new'
  rcall('HSET', P .. 'job:' .. id, unpack(fields))
end
