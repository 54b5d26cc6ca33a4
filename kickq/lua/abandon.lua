--[[ abandon: a worker is gone (it died, or exited); end what it still held, as its master knows it.
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  now (epoch ms, or "" for Redis' clock)
  ARGV[3]  the worker's claimer id
  ARGV[4]  error text for a job it claimed to start at once (finish's chained claim) and never
           reported: it is ghosted, as its run may have begun
  ARGV[5]  the caller's monotonic clock in ms ("" = unknown), as in finish_many
  ARGV[6]  d, then d groups of 6 as in finish_many: runs the worker reported finished (with their
           outcome) whose saving may not have reached Redis
  Returns  {saved, given_back, ghosted}
  First the worker's idle registration ends and its journal is applied (see apply_journal in
  _lib_journal.lua), then the runs above; jobs still in its inbox never reached it and are given
  back.
  Every job named by P.."claim:"..claimer that is still processing under that claim: one claimed
  ahead never started (the master ghosts a run it saw start, token-checked, before this; a start
  mark a finish_many applied may precede a start the worker did not live to make), so it goes back
  to the front of its queue; one claimed to start at once ('at_once') is ghosted.
  Everything is checked against token and owner: repeats, and jobs that moved on, are left alone.
]]
local P = ARGV[1]
local now = clock(ARGV[2])
local claimer = ARGV[3]
unidle(P, claimer)
apply_journal(P, claimer, now, tonumber(ARGV[5]) or false, false)
local statuses, _ = finish_runs(P, now, claimer, ARGV, 7, tonumber(ARGV[6]))
local saved = 0
for _, status in ipairs(statuses) do if status == 'ok' then saved = saved + 1 end end
local given_back, ghosted = release_inbox(P, claimer, now), 0
local record = rcall('GET', P .. 'claim:' .. claimer)
if record then
  local parts = {}
  for word in string.gmatch(record, '%S+') do parts[#parts + 1] = word end
  -- Last first: each goes to the front of its queue, so they keep their order there.
  for i = #parts - 1, 1, -2 do
    local id, token = parts[i], parts[i + 1]
    local _, mine, read = owns(P, id, token, claimer, {'at_once'})
    if mine and not read[1] then
      release(P, id, now)
      given_back = given_back + 1
    elseif mine then
      end_run(P, id, now, 'ghost', false, ARGV[4])
      ghosted = ghosted + 1
    end
  end
end
return {saved, given_back, ghosted}
