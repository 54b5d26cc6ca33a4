--[[ _lib_handoff.lua: hand-off to idle workers. A supervisor's worker that finds nothing to
  claim registers as idle and blocks on its inbox as well as on the wake tokens. A new job whose
  name has an idle worker is claimed for that worker by the create itself and handed over in the
  inbox (the claim's reply, JSON): the worker starts it the moment BLPOP returns, without a claim
  round trip. The claim is a batch claim of one job (claim record, no 'run_start'), so a death
  deals with it as with any job claimed ahead (see abandon and recover).
  Keys:
    P.."idle:"..name      zset  claimer -> registration expiry (ms); it is renewed at every BLPOP
                                timeout, so a dead worker's entry lapses by itself
    P.."idler:"..claimer  string  the names it registered under (JSON), to unregister from all
    P.."inbox:"..claimer  list  the claims handed over to it
    P.."queue:"..name     list  looked at first: older jobs of the name go before the new one
]]
local HANDOFF_TTL = 86400  -- seconds: cleanup only; abandon and recover empty an inbox

local function unidle(P, claimer)
  local ik = P .. 'idler:' .. claimer
  local raw = rcall('GET', ik)
  if not raw then return end
  for _, name in ipairs(cjson.decode(raw)) do rcall('ZREM', P .. 'idle:' .. name, claimer) end
  rcall('DEL', ik)
end

-- Called only after the caller's inbox was taken (claim.lua, finish_many.lua): it is empty here.
local function register_idle(P, claimer, names, now, ttl_ms)
  -- The claim record drops the jobs the worker no longer holds (none, as it found nothing to do):
  -- a create that hands it a job then has none to look at.
  record_claims(P, claimer, {})
  -- Both keys lapse a minute after the last registration that renewed them (dead workers' leftovers).
  for _, name in ipairs(names) do
    local ik = P .. 'idle:' .. name
    rcall('ZADD', ik, string.format('%d', now + ttl_ms), claimer)
    rcall('PEXPIRE', ik, ttl_ms + 60000)
  end
  rcall('SET', P .. 'idler:' .. claimer, cjson.encode(names), 'PX', ttl_ms + 60000)
end

-- Job `id` of `name` was just created (`packed`: its record, from new_queued_job), not queued yet:
-- if a worker of that name is registered as idle, claim the oldest waiting job of the name for it
-- (this one when none waits: its record is then never written), else queue it.
local function hand_off(P, name, now, id, packed)
  local ik = P .. 'idle:' .. name
  -- One call when no worker is idle (a busy queue: every create asks)
  local first = rcall('ZRANGE', ik, 0, 0, 'WITHSCORES')
  if first[1] and tonumber(first[2]) < now then  -- lapsed registrations (dead workers) go first
    rcall('ZREMRANGEBYSCORE', ik, '-inf', '(' .. now)
    first = rcall('ZRANGE', ik, 0, 0)
  end
  if not first[1] then return queue_packed(P, id, name, packed) end
  local claimer = first[1]
  unidle(P, claimer)
  -- Claimed as a batch claim is (no 'run_start'): Redis cannot know whether the worker got it (a
  -- BLPOP served to a worker whose host just died pops the entry all the same), so a death before
  -- its start was known (the master's S message, the worker's start mark) gives it back rather
  -- than ghosting a run that never began.
  local got
  if rcall('LLEN', P .. 'queue:' .. name) == 0 then
    got = claim_job(P, id, name, now, claimer, true, packed)  -- never queued nor packed
  else
    queue_packed(P, id, name, packed)  -- older jobs wait: the oldest goes first
    got = claim(P, {name}, now, claimer, false, true)
  end
  if not got then return end
  record_claims(P, claimer, {got[1] .. ' ' .. got[2]})
  local box = P .. 'inbox:' .. claimer
  rcall('RPUSH', box, cjson.encode(got))
  rcall('EXPIRE', box, HANDOFF_TTL)
end

-- An inbox entry, decoded, if the job is still processing under that claim; else nil.
local function inbox_entry(P, claimer, raw)
  local ok, e = pcall(cjson.decode, raw)
  if not (ok and type(e) == 'table' and e[1] and e[2]) then return nil end
  e[1] = tostring(e[1])
  local _, mine = owns(P, e[1], tostring(e[2]), claimer)
  if mine then return e end
  return nil
end

-- The caller (the worker itself) takes up to `limit` jobs handed over to it: {claim reply, ...}.
local function take_inbox(P, claimer, limit)
  local box, taken = P .. 'inbox:' .. claimer, {}
  while #taken < limit do
    local raw = rcall('LPOP', box)
    if not raw then break end
    taken[#taken + 1] = inbox_entry(P, claimer, raw)
  end
  return taken
end

-- The worker is gone or lost: what is still in its inbox never reached it, back to the queues.
local function release_inbox(P, claimer, now)
  local box = P .. 'inbox:' .. claimer
  local entries = rcall('LRANGE', box, 0, -1)
  if #entries == 0 then return 0 end
  rcall('DEL', box)
  local n = 0
  for i = #entries, 1, -1 do  -- last first: each goes to the front of its queue
    local e = inbox_entry(P, claimer, entries[i])
    if e then
      release(P, e[1], now)
      n = n + 1
    end
  end
  return n
end
