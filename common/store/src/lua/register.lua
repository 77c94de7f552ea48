if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'state', STATE.pending, 'task', ARGV[2], 'queue', ARGV[3],
  'params', ARGV[4], 'created_ms', ARGV[5], 'ttl', ttl, 'batches_published', 0,
  'batches_done', 0, 'batches_dead', 0, 'records_total', 0, 'records_done', 0,
  'records_invalid', 0, 'retries', 0, 'sources_failed', 0)
redis.call('EXPIRE', KEYS[1], ttl)
local before = redis.call('TTL', KEYS[2])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
if before == -2 or (before >= 0 and before < ttl) then redis.call('EXPIRE', KEYS[2], ttl) end
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, 15)) do
  if redis.call('EXISTS', ARGV[7] .. id) == 0 then redis.call('ZREM', KEYS[2], id) end
end
return 1
