--[[ repair_orphan: drop an id that structures hold although its job hash is gone (`kickq doctor --repair`).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  job id
  ARGV[4..] job names whose queue holds the id
  Returns  number of entries removed; 0 when the job has a record (its hash, or its packed entry
           in P.."newjobs": then it is no orphan and nothing is written).
  Notes a 'repair' event (no state change, counts untouched). Extra wake tokens are trimmed by the
  next claim, as after a delete.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local id = ARGV[3]
if rcall('EXISTS', P .. 'job:' .. id) == 1 or is_packed(P, id) then return 0 end
local removed = 0
for i = 4, #ARGV do removed = removed + rcall('LREM', P .. 'queue:' .. ARGV[i], 0, id) end
for _, z in ipairs({'delayed', 'processing', 'finished'}) do removed = removed + rcall('ZREM', P .. z, id) end
if removed > 0 then note(P, id, false, false, false, 'repair', now) end
return removed
