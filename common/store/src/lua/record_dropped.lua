-- A batch was dropped unrun (its job was cancelled, or it expired). KEYS: job, results, dead,
-- dropped. ARGV: batch, now, ttl, counter (batches_cancelled or batches_expired).
-- Returns 1 counted, 0 already settled, -1 no such job, -2 a batch number the job never
-- published.
local limit = batch_limit(KEYS[1])
if not limit then return -1 end
if tonumber(ARGV[1]) >= limit then return -2 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[4], ARGV[1], 1) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
published_at_least(KEYS[1])
finish(KEYS[1], ARGV[2])
expire_all(KEYS[1], ARGV[3])
return 1
