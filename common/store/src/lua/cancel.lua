-- Cancel a job. KEYS: job, cancelled jobs set. ARGV: id, now.
-- Returns the state before: 'cancelled' now set when it was pending or running; otherwise the
-- job was finished already (its state is returned, nothing changes); nil: no such job.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return nil end
if state == STATE.completed or state == STATE.completed_with_errors
   or state == STATE.cancelled then
  return state
end
redis.call('HSET', KEYS[1], 'state', STATE.cancelled, 'cancelled_ms', ARGV[2],
  'finished_ms', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
release_unique(KEYS[1])
local ttl = job_ttl(KEYS[1], 604800)
if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
return state
