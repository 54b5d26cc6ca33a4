--[[ _lib_claim.lua: claims. A waiting (new or queued) job becomes processing under a lease and a
  fresh attempt token; the claim record by which a claimer, or whoever cleans up after it, finds
  the jobs it holds; a claimed job that never started given back to its queue (release); the
  wake tokens mended to the queue lengths.
  Keys:
    P.."queue:"..name  P.."wake:"..name  P.."job:"..id  P.."processing"  P.."claim:"..claimer
]]
-- A run's attempt token: the job's attempt number and its create time. After a failover that lost
-- creates, the new master hands the same ids out again, and their attempts start at 1 again; the
-- create time tells the new job from the lost one, so an outcome, a ghost or a give-back meant for
-- the lost job's run can never end a run of the new one, whoever claimed it.
local function run_token(attempt, created)
  return attempt .. ':' .. (created or '')
end

-- Make the wake tokens of each name equal the number of jobs waiting in its queue.
-- Tokens are only hints for blocked workers: a token lost with a dying worker, or one left by a
-- deleted job, is mended here at the next claim, so a waiting job is never left without one.
local function reconcile_wake(P, names)
  for _, name in ipairs(names) do
    local q, w = P .. 'queue:' .. name, P .. 'wake:' .. name
    local diff = rcall('LLEN', q) - rcall('LLEN', w)
    if diff > 0 then
      local tokens = {}
      for i = 1, diff do tokens[i] = '1' end
      rcall('RPUSH', w, unpack(tokens))
    elseif diff < 0 then
      local keep = rcall('LLEN', q)
      if keep == 0 then rcall('DEL', w) else rcall('LTRIM', w, 0, keep - 1) end
    end
  end
end

-- Claim job `id` of `name`, just taken from its queue or never queued (a new job handed over as it
-- is created, with its `packed` record, never written): see claim. Returns the claim reply, or nil
-- when `id` was no waiting job (a leftover of a job that moved on).
local function claim_job(P, id, name, now, claimer, prefetched, packed)
  local jk = P .. 'job:' .. id
  -- A packed new job gets its hash in the same HSET that makes it processing.
  local writes, raw_opts
  if packed then writes, raw_opts = unpack_new(packed) else writes, raw_opts = unpack_if_new(P, id) end
  local fresh = writes ~= nil  -- then its new hash is exactly `writes`: no need to read it back
  local state, created = 'new', nil
  if writes then
    created = writes[4]  -- unpack_new's fields start with name, create_time
  else
    state, raw_opts, created = unpack(rcall('HMGET', jk, 'state', 'opts', 'create_time'))
  end
  if state ~= 'new' and state ~= 'queued' then return nil end
  local timeout = raw_opts and cjson.decode(raw_opts).process_timeout or DEFAULTS.process_timeout
  local attempt = 1
  if writes then
    writes[#writes + 1] = 'attempt'; writes[#writes + 1] = '1'
  else
    writes = {}
    attempt = rcall('HINCRBY', jk, 'attempt', 1)
  end
  local token = run_token(attempt, created)
  local n = #writes
  writes[n + 1] = 'state'; writes[n + 2] = 'processing'; writes[n + 3] = 'update_time'; writes[n + 4] = int_text(now)
  if prefetched then
    writes[n + 5] = 'owner'; writes[n + 6] = claimer
  elseif claimer ~= '' then
    -- The claimer owns the run: a late finish from another worker is rejected even when Redis
    -- lost its data and handed the id and attempt out again. 'at_once' tells abandon this
    -- run_start from one a start mark wrote (a claim ahead).
    writes[n + 5] = 'run_start'; writes[n + 6] = now; writes[n + 7] = 'owner'; writes[n + 8] = claimer
    writes[n + 9] = 'at_once'; writes[n + 10] = '1'
  else
    writes[n + 5] = 'run_start'; writes[n + 6] = now
  end
  rcall('HSET', jk, unpack(writes))
  note(P, id, name, state, 'processing', 'processing', now)
  rcall('ZADD', P .. 'processing', string.format('%d', now + ms(timeout) + LEASE_GRACE_MS), id)
  if claimer ~= '' and not prefetched then
    rcall('SET', P .. 'claim:' .. claimer, id .. ' ' .. token, 'EX', 86400)
  end
  local reply = {id, token}
  local fields = fresh and writes or rcall('HGETALL', jk)
  -- tostring: a number read back from the hash would be the string HSET stored (%.14g)
  for i = 1, #fields do reply[#reply + 1] = tostring(fields[i]) end
  return reply
end

-- Take the first waiting job of the first non-empty queue, in the priority order of `names`.
-- A plain claim (a worker woke on a token, or polled) leaves the wake tokens equal to the queue
-- lengths; a `chained` claim (inside finish) just takes the claimed job's own token.
-- `claimer` (optional) names the caller: its last claim is kept in P.."claim:"..claimer, so a
-- caller whose reply was lost (a timeout after Redis ran the script) can find the job it now owns.
-- `prefetched`: the caller claims a batch (finish_many) and runs the jobs one after the other, so
-- this run's start is not known here: no 'run_start', and the caller records the whole batch.
-- Returns {id, attempt token, HGETALL fields...} or nil.
local function claim(P, names, now, claimer, chained, prefetched)
  for _, name in ipairs(names) do
    local q = P .. 'queue:' .. name
    while true do
      local id = rcall('LPOP', q)
      if not id then break end
      local reply = claim_job(P, id, name, now, claimer, prefetched)
      if reply then
        if chained then
          -- Claimed in the same call that finished the last job: the job's token is still there.
          rcall('LPOP', P .. 'wake:' .. name)
        else
          reconcile_wake(P, names)
        end
        return reply
      end
      -- Anything else is a leftover of a job that moved on; dropping it keeps one structure per job.
    end
  end
  if not chained then reconcile_wake(P, names) end
  return nil
end

-- Is job `id` processing under this attempt `token` (run_token), and (when it names one) run by
-- `claimer`? Returns its state (false: no such job), whether the caller may end the run, and the
-- values of the `more` fields (a list, optional) read in the same call.
local function owns(P, id, token, claimer, more)
  local got = rcall('HMGET', P .. 'job:' .. id, 'state', 'attempt', 'owner', 'create_time', unpack(more or {}))
  local state, attempt, owner = got[1], got[2], got[3]
  if not state then
    if is_packed(P, id) then return 'new', false end  -- never claimed
    return false, false
  end
  local values = {}
  for i = 5, #got do values[i - 4] = got[i] end
  local mine = state == 'processing' and attempt and run_token(attempt, got[4]) == token
               and not (claimer ~= '' and owner and owner ~= claimer)
  return state, mine or false, values
end

-- Add `pairs` ("id token" each) to the claim record P.."claim:"..claimer, keeping the jobs it
-- names that the claimer still holds, so that whoever cleans up after it finds them all.
-- `ended` (optional): a set of "id token" known to be ended already (no need to look).
local function record_claims(P, claimer, pairs, ended)
  local ck = P .. 'claim:' .. claimer
  local held = {}
  for id, token in string.gmatch(rcall('GET', ck) or '', '(%S+) (%S+)') do
    local pair = id .. ' ' .. token
    if not (ended and ended[pair]) then
      local _, mine = owns(P, id, token, claimer)
      if mine then held[#held + 1] = pair end
    end
  end
  for _, pair in ipairs(pairs) do held[#held + 1] = pair end
  if #held == 0 then
    rcall('DEL', ck)
  else
    rcall('SET', ck, table.concat(held, ' '), 'EX', 86400)
  end
end

-- Give a claimed job that never started back to the front of its queue (processing -> queued).
-- Its attempt stays counted, so a late finish from the claim given back cannot match a new claim.
local function release(P, id, now)
  local jk = P .. 'job:' .. id
  local name = rcall('HGET', jk, 'name')
  rcall('ZREM', P .. 'processing', id)
  rcall('HSET', jk, 'state', 'queued', 'update_time', int_text(now))
  rcall('HDEL', jk, 'run_start', 'owner', 'at_once')
  note(P, id, name, 'processing', 'queued', 'released', now)
  rcall('LPUSH', P .. 'queue:' .. name, id)
  rcall('RPUSH', P .. 'wake:' .. name, '1')
end
