-- Cancel a job. KEYS: job, cancelled jobs set. ARGV: id, now.
-- Returns {code, state before}: code 1 cancelled now (it was pending, running, or interrupted
-- with batches still to settle); 2 finished already, nothing changed; 3 its state is missing
-- or not one of STATE (a hash edited by hand), nothing changed. nil: no such job.
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local f = redis.call('HMGET', KEYS[1], 'state', 'finished_ms')
local state = f[1]
local known = false
for _, s in pairs(STATE) do if s == state then known = true end end
if not known then return {3, state or ''} end
if state == STATE.completed or state == STATE.completed_with_errors or state == STATE.stalled
   or state == STATE.cancelled or (state == STATE.interrupted and f[2]) then
  return {2, state}
end
redis.call('HSET', KEYS[1], 'state', STATE.cancelled, 'cancelled_ms', ARGV[2],
  'finished_ms', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
local active, id = active_of(KEYS[1])
if active then redis.call('ZREM', active, id) end
release_unique(KEYS[1])
celery_finish(KEYS[1], {state = STATE.cancelled}, ARGV[2])
hook_fire(KEYS[1], ARGV[2])
group_done(KEYS[1], ARGV[2])
local ttl = job_ttl(KEYS[1], 604800)
if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
return {1, state}
