--[[ purge_state: finished jobs of one state, finished at least some time ago -> deleted
  (the admin command `kickq purge --state S --older-than SECONDS`).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  state: success | fail (anything else purges nothing)
  ARGV[4]  older than this many ms: finish_time <= now - ARGV[4]
  ARGV[5..] candidate job ids (the caller finds them with ZSCAN of P.."finished"); each is checked
           here, so an id that moved on, or is gone, is left alone
  Returns  number of jobs purged. Each is noted as a 'purge' event, as by purge.lua.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local want = ARGV[3]
local cutoff = now - tonumber(ARGV[4])
local n = 0
if want ~= 'success' and want ~= 'fail' then return 0 end
for i = 5, #ARGV do
  local id = ARGV[i]
  local jk = P .. 'job:' .. id
  local state, name, finished, updated = unpack(rcall('HMGET', jk, 'state', 'name', 'finish_time', 'update_time'))
  local at = tonumber(finished or updated)
  if state == want and at and at <= cutoff then
    rcall('ZREM', P .. 'finished', id)
    rcall('DEL', jk)
    note(P, id, name, state, false, 'purge', now)
    n = n + 1
  end
end
return n
