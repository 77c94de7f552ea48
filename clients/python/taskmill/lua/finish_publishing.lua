-- Publishing ended. KEYS: job. ARGV: batches_total, records_total, records_invalid,
-- sources_failed, problems, now, ttl, interrupted ('1' when the enqueue was interrupted:
-- the job becomes `interrupted` unless it was cancelled).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'batches_total', ARGV[1], 'batches_published', ARGV[1],
  'records_total', ARGV[2], 'sources_failed', ARGV[4], 'problems', ARGV[5])
redis.call('HDEL', KEYS[1], 'lease_until_ms')
if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[1], 'records_invalid', ARGV[3]) end
if ARGV[8] == '1' and redis.call('HGET', KEYS[1], 'state') ~= STATE.cancelled then
  redis.call('HSET', KEYS[1], 'state', STATE.interrupted, 'interrupted_ms', ARGV[6])
end
finish(KEYS[1], ARGV[6])
expire_all(KEYS[1], ARGV[7])
-- 2: the job is finished now without a summary (no worker's last batch finished it, so no
-- worker folded it: the producer asks one to).
if wants_summary(KEYS[1]) then return 2 end
return 1
