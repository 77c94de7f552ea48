local limit = batch_limit(KEYS[1])
if not limit then return -1 end
if tonumber(ARGV[1]) >= limit then return -2 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'batches_dead', 1)
redis.call('HSETNX', KEYS[1], 'started_ms', ARGV[3])
published_at_least(KEYS[1])
finish(KEYS[1], ARGV[3])
expire_all(KEYS[1], ARGV[4])
return 1
