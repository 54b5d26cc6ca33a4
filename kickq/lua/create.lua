--[[ create: new jobs, as one atomic step for the whole batch.
  KEYS[1]  P.."id"            (routing only; all keys derive from P)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P                  namespace prefix "{ns}:"
  ARGV[2]  now                epoch ms, or "" for Redis' clock
  ARGV[3]  n                  number of jobs
  ARGV[4+5i .. 8+5i]  per job: name, data JSON ("" = null), stored opts JSON ("" = defaults),
                      delay ms ("" = no delay), unused (reserved)
  Returns  {id1, create_time, id2, ...}; state is 'delayed' when a delay was given, else 'new'.
  Transitions: (none) -> new (queue + wake token; its record packed in P.."newjobs" until its
  first claim), (none) -> delayed (zset 'delayed', a job hash); a new job
  whose name has an idle worker registered is claimed for it at once (new -> processing, handed
  over in its inbox: hand_off in _lib_handoff.lua).
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local n = tonumber(ARGV[3])
local out = {}
for i = 0, n - 1 do
  local base = 4 + 5 * i
  local name, data, opts, delay = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local id
  if delay ~= '' then
    local due = now + tonumber(delay)
    id = new_job(P, name, data, opts, now, {'state', 'delayed', 'scheduled_for', due})
    delay_job(P, id, due, {})
    note(P, id, name, false, 'delayed', 'create', now)
  else
    local packed
    id, packed = new_queued_job(P, name, data, opts, now)
    note(P, id, name, false, 'new', 'create', now)
    hand_off(P, name, now, id, packed)  -- or queued
  end
  out[#out + 1] = id
  out[#out + 1] = now
end
return out
