--[[ repair_inspect: where one job id is, read in one atomic step (`kickq doctor`; writes nothing).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  job id
  ARGV[3..] job names whose queue may hold the id (the job's own name is added here)
  Returns  {exists (1 or 0), state or '', name or '', structure, count, ...}: whether the job has a
           record (its hash, or a packed entry of P.."newjobs"), its state and name, then every structure that holds the id ("queue:<name>", "delayed", "processing", "finished") with how many times.
]]
local P, id = ARGV[1], ARGV[2]
local jk = P .. 'job:' .. id
local state, name = unpack(rcall('HMGET', jk, 'state', 'name'))
local exists = rcall('EXISTS', jk)
if exists == 0 then
  local packed = rcall('HGET', P .. 'newjobs', id)
  if packed then exists, state, name = 1, 'new', unpack_new(packed)[2] end
end
local out = {exists, state or '', name or ''}
local seen = {}
local names = {}
if name then names[1] = name end
for i = 3, #ARGV do names[#names + 1] = ARGV[i] end
for _, n in ipairs(names) do
  if not seen[n] then
    seen[n] = true
    local c = 0
    for _, member in ipairs(rcall('LRANGE', P .. 'queue:' .. n, 0, -1)) do
      if member == id then c = c + 1 end
    end
    if c > 0 then out[#out + 1] = 'queue:' .. n; out[#out + 1] = c end
  end
end
for _, z in ipairs({'delayed', 'processing', 'finished'}) do
  if rcall('ZSCORE', P .. z, id) then out[#out + 1] = z; out[#out + 1] = 1 end
end
return out
