--[[ finish: processing -> success | retry | ghost | fail, checked against the attempt token;
  optionally claims the caller's next job in the same step (one round trip per job under load).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  job id
  ARGV[4]  attempt token given by claim
  ARGV[5]  outcome: success | fail | ghost
  ARGV[6]  result JSON (success) or error text (fail, ghost); "" = none
  ARGV[7]  the caller's claimer id ("" = none): if the run has an owner, it must be this one;
           also the claimer of the next claim, as in claim.lua
  ARGV[8]  the run's time in ms as the caller measured it ("" = since 'run_start', or 0 without
           one: a job claimed ahead records its start only through this)
  ARGV[9..] job names to claim the next job from (none: no claim)
  Returns  {status, new_state, next_claim}: status 'ok'; 'stale' (another attempt owns the job, or it
           is no longer processing: the late finish changes nothing); 'missing' (deleted or purged).
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local claimer = ARGV[7] or ''
local status, new_state = finish_one(P, now, claimer, ARGV[3], ARGV[4], ARGV[5], ARGV[6],
                                     tonumber(ARGV[8] or ''))
local nxt = false
if #ARGV >= 9 then
  local names = {}
  for i = 9, #ARGV do names[#names + 1] = ARGV[i] end
  nxt = claim(P, names, now, claimer, true) or false
end
return {status, new_state, nxt}
