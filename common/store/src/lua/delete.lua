-- Delete a job's keys. KEYS: job, results, dead, cancelled, jobs index, cancelled jobs set.
-- ARGV: id. Returns 1 when the job existed.
local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('SREM', KEYS[6], ARGV[1])
return existed
