-- The producer's lease on a publishing job lapsed (it was killed): the job becomes
-- `interrupted` with what it recorded as published. KEYS: job. ARGV: now.
-- Returns 1 when it did.
local f = redis.call('HMGET', KEYS[1], 'state', 'batches_total', 'lease_until_ms',
  'batches_published')
if not f[1] or f[2] or not f[3] then return 0 end
if f[1] ~= STATE.pending and f[1] ~= STATE.running then return 0 end
if tonumber(f[3]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'batches_total', f[4] or '0', 'state', STATE.interrupted,
  'interrupted_ms', ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_until_ms')
finish(KEYS[1], ARGV[1])
return 1
