-- Delete a job's keys. KEYS: job, results, dead, dropped, retried, jobs index, cancelled jobs
-- set. ARGV: id. Returns 1 when the job existed.
local existed = redis.call('EXISTS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('SREM', KEYS[7], ARGV[1])
return existed
