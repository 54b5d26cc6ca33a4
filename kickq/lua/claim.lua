--[[ claim: new/queued -> processing, with a lease and a fresh attempt token.
  KEYS[1]  P.."id"   (routing only)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  claimer id ("" = none): the claim is recorded in P.."claim:"..claimer
  ARGV[4..] job names in priority order
  Returns  {id, attempt, field, value, ...} of the claimed job, or nil when every queue is empty.
  The lease (score in P.."processing") is now + process_timeout + a grace; the supervisor kills the
  run at process_timeout, the grace leaves that first move to it and the reaper recovers the rest.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local names = {}
for i = 4, #ARGV do names[#names + 1] = ARGV[i] end
return claim(P, names, now, ARGV[3])
