-- Returns {code, summary}: code 1 marked, 0 already done or already dead, -1 no such job, -2 a
-- batch number the job never published; summary 1 when the job is finished and has no
-- summary yet, whoever marked the batch (the worker that dead-lettered it folds one: the
-- dead letters' counter may have marked it first).
-- 1 when the job is finished without a summary, else 0.
local function summary_wanted()
  if wants_summary(KEYS[1]) then return 1 end
  return 0
end
local limit = batch_limit(KEYS[1])
if not limit then return {-1, 0} end
if tonumber(ARGV[1]) >= limit then return {-2, 0} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {0, summary_wanted()} end
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then return {0, summary_wanted()} end
redis.call('HINCRBY', KEYS[1], 'batches_dead', 1)
redis.call('HSETNX', KEYS[1], 'started_ms', ARGV[3])
published_at_least(KEYS[1])
finish(KEYS[1], ARGV[3])
expire_all(KEYS[1], ARGV[4])
return {1, summary_wanted()}
