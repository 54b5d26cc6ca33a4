--[[ recover: processing jobs whose lease expired (worker, supervisor or host lost) -> ghost | fail;
  a job claimed ahead whose start was never marked -> queued (front), at most twice per job. Runs
  its worker journaled as finished (P.."done:"..owner) are saved first, with their outcome; jobs
  still in the owner's inbox (handed over, never taken) go back to their queue.
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  at most this many jobs
  ARGV[4]  error text recorded on the run
  Returns  {recovered count, earliest remaining lease or -1}
]]
local P = ARGV[1]
local MAX_LOST_PREFETCHED = 2
local now = clock(ARGV[2])
local ids = rcall('ZRANGEBYSCORE', P .. 'processing', '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local jk = P .. 'job:' .. id
  -- Runs its worker finished and journaled are saved first (that may end this one, and others).
  local owner = rcall('HGET', jk, 'owner')
  if owner then
    apply_journal(P, owner, now, false, true)
    unidle(P, owner)
    release_inbox(P, owner, now)
  end
  if not rcall('ZSCORE', P .. 'processing', id) then
    -- saved by the journal just now
  elseif rcall('EXISTS', jk) == 1 then
    -- A job claimed ahead (a batch or a hand-off) whose start its worker never marked in its journal
    -- (applied just above) never started: it goes back to its queue, not to a ghost retry. Should
    -- it keep taking its supervisors down with it, its third loss is ghosted like any run.
    if rcall('HEXISTS', jk, 'run_start') == 0 and rcall('HINCRBY', jk, 'lost', 1) <= MAX_LOST_PREFETCHED then
      release(P, id, now)
    else
      end_run(P, id, now, 'ghost', false, ARGV[4])
    end
  else
    rcall('ZREM', P .. 'processing', id)
  end
end
return {#ids, next_score(P .. 'processing')}
