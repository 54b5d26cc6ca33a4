--[[ repair_counts: correct drifted state counts in P.."counts" (`kickq doctor --repair`).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2..] pairs: "<state>:<name>" field, correction (an integer to add; the drift with its sign
           turned). Transitions move a count and the jobs together, so a drift measured a moment
           ago is still the drift now; adding the correction is right whatever ran in between.
  Returns  number of fields changed. A field that reaches 0 or less is removed.
]]
local P = ARGV[1]
local counts = P .. 'counts'
local n = 0
for i = 2, #ARGV - 1, 2 do
  local by = tonumber(ARGV[i + 1])
  if by and by ~= 0 then
    if rcall('HINCRBY', counts, ARGV[i], by) <= 0 then rcall('HDEL', counts, ARGV[i]) end
    n = n + 1
  end
end
return n
