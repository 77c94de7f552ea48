-- Count one retry of a batch of an existing job, once per (batch, attempt): a batch delivered
-- twice (at-least-once) does not count its retry twice. KEYS: job, retried. ARGV: batch,
-- attempt, ttl, now (a retry is progress: the job is not stalled). Returns 1 when counted (or counted before), -1 no such job, -2 a batch number
-- the job never published.
local limit = batch_limit(KEYS[1])
if not limit then return -1 end
if tonumber(ARGV[1]) >= limit then return -2 end
if redis.call('HSETNX', KEYS[2], ARGV[1] .. ':' .. ARGV[2], 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'retries', 1)
  expire_all(KEYS[1], ARGV[3])
  if ARGV[4] then touch_active(KEYS[1], ARGV[4]) end
end
return 1
