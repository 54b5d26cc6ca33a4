--[[ _lib_tally.lua: observability, kept by the transitions themselves so that reading it never
  scans jobs. note() records a transition: its event at once, its counts and stats in the call's
  tally, which flush_notes() writes at the end of the call.
  Keys:
    P.."counts"          hash  "<state>:<name>" -> jobs in that state now
    P.."names"           set   every job name: added when a count of the name rises from zero
    P.."events"          stream of every transition (MAXLEN ~ meta.events_maxlen, default below)
    P.."meta"            hash  events_maxlen, read at the first note of a call
    P.."stats:"..bucket  hash  per 10 s bucket: "<event>:<name>" counts, "time:<name>" (sum of
                               run ms) and "max:<name>" (longest run ms)
    P.."times:"..bucket  list  a bounded sample of "<run ms>:<name>" for percentiles
]]
local EVENTS_MAXLEN = 10000
local BUCKET_MS = 10000
local BUCKET_TTL = 3700  -- seconds: longer than the longest stats window (1 h)
local SAMPLES_PER_BUCKET = 1000

-- Counts, stats and samples are summed over the whole call and written once at its end
-- (flush_notes; scripts.py runs it after the body of every script that notes, even one that
-- fails midway, since Redis keeps the writes made before an error): a batch of runs
-- then costs a few writes, not several per job. Nothing in a call reads them back. A count is
-- changed by its net delta: one that nets to 0 in a call is not written at all.
local tally_counts = {}  -- "<state>:<name>" -> net change in this call
local tally_count_order = {}  -- those fields, in the order first noted
local tally_buckets = {}  -- bucket ms -> its stats (bucket_tally)
local tally_bucket_order = {}
local tally_maxlen  -- events_maxlen as text (false: no events), read at the first note of the call

-- On Redis 7 the scripts are one function library (scripts.py), whose top level runs once, at
-- load, rather than at every call: each call starts here, so that no tally outlives its call
-- (redis.call itself cannot be read at load time).
local function begin_call()
  rcall = redis.call
  tally_counts, tally_count_order, tally_buckets, tally_bucket_order = {}, {}, {}, {}
  tally_maxlen = nil
end

local function add_count(field, by)
  local n = tally_counts[field]
  if n == nil then
    n = 0
    tally_count_order[#tally_count_order + 1] = field
  end
  tally_counts[field] = n + by
end

-- The tally of the 10 s bucket holding `now`: field -> n (every field holds a ':'), `order` (of
-- the fields), and once a run ended in it `max` (name -> ms), `max_order` and `samples`.
local function bucket_tally(now)
  local bucket = now - now % BUCKET_MS
  local b = tally_buckets[bucket]
  if not b then
    b = {order = {}}
    tally_buckets[bucket] = b
    tally_bucket_order[#tally_bucket_order + 1] = bucket
  end
  return b
end

local function add_stat(b, field, by)
  local n = b[field]
  if n == nil then
    n = 0
    b.order[#b.order + 1] = field
  end
  b[field] = n + by
end

local function add_run_time(b, name, run_ms)
  add_stat(b, 'processed:' .. name, 1)
  add_stat(b, 'time:' .. name, run_ms)
  if not b.max then b.max, b.max_order, b.samples = {}, {}, {} end
  local max = b.max[name]
  if max == nil then b.max_order[#b.max_order + 1] = name end
  if run_ms > (max or -1) then b.max[name] = run_ms end
  b.samples[#b.samples + 1] = run_ms .. ':' .. name
end

-- Record a transition of job `id` (name `name`) from state `from` to `to` (either may be false).
-- `event` names it; `run_ms` is the processing time of a run that just ended. The event goes to
-- the stream at once (in order); counts and stats go to the tally.
local function note(P, id, name, from, to, event, now, run_ms)
  name = name or '?'
  if from then add_count(from .. ':' .. name, -1) end
  if to then add_count(to .. ':' .. name, 1) end
  if tally_maxlen == nil then
    local maxlen = tonumber(rcall('HGET', P .. 'meta', 'events_maxlen') or EVENTS_MAXLEN)
    tally_maxlen = maxlen and maxlen > 0 and string.format('%d', maxlen) or false
  end
  if tally_maxlen then
    rcall('XADD', P .. 'events', 'MAXLEN', '~', tally_maxlen, '*', 'id', id, 'name', name, 'event', event,
          'state', to or '', 'time', int_text(now))
  end
  local counted = event == 'create' or event == 'success' or event == 'fail' or event == 'retry'
                  or event == 'ghost'
  if not (counted or run_ms) then return end
  local b = bucket_tally(now)
  if counted then add_stat(b, (event == 'create' and 'created' or event) .. ':' .. name, 1) end
  if run_ms then add_run_time(b, name, run_ms) end
end

-- Write what the call's notes summed up (see tally_counts and bucket_tally).
local function flush_notes(P)
  local counts = P .. 'counts'
  for _, field in ipairs(tally_count_order) do
    local by = tally_counts[field]
    if by ~= 0 then
      local count = rcall('HINCRBY', counts, field, by)
      if count <= 0 then
        rcall('HDEL', counts, field)
      elseif count <= by then
        -- A count of the name rose from zero: the first job of a name always does, so this keeps
        -- P.."names" whole without a SADD per job (nothing ever removes a name).
        rcall('SADD', P .. 'names', string.sub(field, string.find(field, ':', 1, true) + 1))
      end
    end
  end
  for _, bucket in ipairs(tally_bucket_order) do
    local b = tally_buckets[bucket]
    local bk = P .. 'stats:' .. bucket
    local fresh = false  -- a field written for the first time: the hash may be new, give it a TTL
    for _, field in ipairs(b.order) do
      local by = b[field]
      if rcall('HINCRBY', bk, field, by) == by then fresh = true end
    end
    if fresh then rcall('EXPIRE', bk, BUCKET_TTL) end
    if b.max then
      for _, name in ipairs(b.max_order) do
        if b.max[name] > (tonumber(rcall('HGET', bk, 'max:' .. name)) or -1) then
          rcall('HSET', bk, 'max:' .. name, b.max[name])
        end
      end
      -- percentiles come from the first SAMPLES_PER_BUCKET runs of each 10 s bucket
      local tk = P .. 'times:' .. bucket
      local held = rcall('LLEN', tk)
      local room = math.min(SAMPLES_PER_BUCKET - held, #b.samples)
      if room > 0 then
        rcall('RPUSH', tk, unpack(b.samples, 1, room))
        if held == 0 then rcall('EXPIRE', tk, BUCKET_TTL) end
      end
    end
  end
end
