--[[ claim: new/queued -> processing, with a lease and a fresh attempt token.
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  claimer id ("" = none): the claim is recorded in P.."claim:"..claimer
  ARGV[4]  idle registration ms ("" or 0 = none): with a claimer, when nothing is waiting the
           caller is registered as idle for that long, and new jobs are handed over to its inbox
           (see hand_off in _lib_handoff.lua)
  ARGV[5..] job names in priority order
  Returns  {id, attempt token, field, value, ...} of the claimed job, or nil when every queue is empty.
  A claimer's registration ends here, and a job handed over to it meanwhile is returned first.
  The lease (score in P.."processing") is now + process_timeout + a grace; the supervisor kills the
  run at process_timeout, the grace leaves that first move to it and the reaper recovers the rest.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local claimer = ARGV[3]
local idle_ms = tonumber(ARGV[4]) or 0
local names = {}
for i = 5, #ARGV do names[#names + 1] = ARGV[i] end
if claimer ~= '' then
  unidle(P, claimer)
  local handed = take_inbox(P, claimer, 1)[1]
  if handed then
    -- The caller may have woken on a token that belongs to a job still waiting: mend the tokens.
    reconcile_wake(P, names)
    return handed
  end
end
local got = claim(P, names, now, claimer)
if not got and claimer ~= '' and idle_ms > 0 then register_idle(P, claimer, names, now, idle_ms) end
return got
