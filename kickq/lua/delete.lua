--[[ delete: any state -> gone. A worker still running the job later gets 'missing' from finish.
  KEYS[1]  P.."id"   (routing only)
  KEYS[2]  P.."route-guard"  (never exists: see layout.SCRIPT_KEYS)
  ARGV[1]  P
  ARGV[2]  job id
  Returns  1 when the job existed, else 0. Hotjob waiters are told through P.."done".
]]
return remove_job(ARGV[1], ARGV[2], clock(''))
