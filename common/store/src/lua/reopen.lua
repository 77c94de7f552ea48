-- A dead batch is being replayed: it is neither dead nor done until it settles again, and the
-- job is open until then. KEYS: job, dead. ARGV: batch, now.
-- Returns {1, reason} when the batch was dead and is reopened (the dead count goes down, a
-- completed job is running again, its finish time and summary go, so that `wait` waits and
-- the summary is folded again from every result); {0, ''} when the batch was not dead (done
-- since, or never counted: nothing changes); nil: no such job.
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local reason = redis.call('HGET', KEYS[2], ARGV[1])
if not reason then return {0, ''} end
redis.call('HDEL', KEYS[2], ARGV[1])
local j = load(KEYS[1])
local w = {}
put(j, w, 'batches_dead', math.max(num(j.batches_dead) - 1, 0))
if j.state == STATE.completed or j.state == STATE.completed_with_errors
   or j.state == STATE.stalled then
  put(j, w, 'state', STATE.running)
end
write(KEYS[1], w)
if j.state ~= STATE.cancelled then redis.call('HDEL', KEYS[1], 'finished_ms') end
redis.call('HDEL', KEYS[1], 'summary')
touch_active(KEYS[1], ARGV[2])
return {1, reason}
