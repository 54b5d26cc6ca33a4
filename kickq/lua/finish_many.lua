--[[ finish_many: one round trip for a worker's batch: end the runs it finished, give back the
  claimed jobs it will not start, and claim its next jobs (prefetch).
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  the caller's claimer id (required: runs are checked against it, the batch is recorded)
  ARGV[4]  the caller's monotonic clock in ms ("" = unknown), for the ages of its journal's runs
  ARGV[5]  d, the number of finished runs, then d groups of 6: id, attempt token,
           outcome (success | fail | ghost), payload (result JSON or error text, "" = none),
           run ms (as the worker measured it), ms since the run ended
  then     r, the number of jobs given back, then r groups of 2: id, attempt token
  then     k, how many jobs to claim (0 = none), then idle registration ms (0 = none: as in
           claim.lua, when k > 0 and nothing is claimed), then the job names in priority order
  First the caller's idle registration ends, and its journal (P.."done:"..claimer, see apply_journal
  in _lib_journal.lua) is applied. Jobs handed over to its inbox are returned with the claimed
  ones.
  Returns  {statuses, states, claimed, rejected}: per finished run, its status (ok | stale | missing,
           as in finish.lua) and the job's state after this ('' = gone); up to k claims, each
           {id, attempt token, field, value, ...}; the journal's runs not saved, {id, token, status, state}
           each. A job given back that is not the caller's is left alone.
  The claimed jobs are processing with a lease from now (process_timeout + grace each) and no
  'run_start': the worker starts them one after the other. P.."claim:"..claimer names them
  ("id token id token ...", with the jobs of earlier batches it still holds), so the master can
  give back what a dead worker never started.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local claimer = ARGV[3]
unidle(P, claimer)
local ending = {}  -- the runs this call ends: their start marks in the journal are moot
for i = 0, tonumber(ARGV[5]) - 1 do ending[ARGV[6 + 6 * i] .. ' ' .. ARGV[7 + 6 * i]] = true end
local rejected, ended = apply_journal(P, claimer, now, tonumber(ARGV[4]) or false, true, ending)
local statuses, states, at = finish_runs(P, now, claimer, ARGV, 6, tonumber(ARGV[5]))
local given_back = tonumber(ARGV[at])
-- Last first: each goes to the front of its queue, so they keep their order there.
for i = given_back, 1, -1 do
  local id, token = ARGV[at + 2 * i - 1], ARGV[at + 2 * i]
  local _, mine = owns(P, id, token, claimer)
  if mine then release(P, id, now) end
end
at = at + 1 + 2 * given_back
local wanted = tonumber(ARGV[at])
local idle_ms = tonumber(ARGV[at + 1]) or 0
local names = {}
for i = at + 2, #ARGV do names[#names + 1] = ARGV[i] end
-- Handed over while the caller was busy (its claim record names them already).
local claimed, record = take_inbox(P, claimer, 100), {}
for _ = #claimed + 1, wanted do
  local got = claim(P, names, now, claimer, true, true)
  if not got then break end
  claimed[#claimed + 1] = got
  record[#record + 1] = got[1] .. ' ' .. got[2]
end
if #record > 0 then
  -- The record keeps the earlier batches' jobs still held (the worker claims its next batch before
  -- the last one is done), so that the master can give back all it never started.
  record_claims(P, claimer, record, ended)
end
if wanted > 0 and #claimed == 0 and idle_ms > 0 then register_idle(P, claimer, names, now, idle_ms) end
return {statuses, states, claimed, rejected}
