if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'batches_total', ARGV[1], 'batches_published', ARGV[1],
  'records_total', ARGV[2], 'sources_failed', ARGV[4], 'problems', ARGV[5])
if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[1], 'records_invalid', ARGV[3]) end
finish(KEYS[1], ARGV[6])
expire_all(KEYS[1], ARGV[7])
return 1
