local limit = batch_limit(KEYS[1])
if not limit then return -1 end
if tonumber(ARGV[1]) >= limit then return -2 end
redis.call('HINCRBY', KEYS[1], 'retries', 1)
return 1
