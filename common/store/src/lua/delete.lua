-- Delete a job's keys. KEYS: job, results, dead, dropped, retried, jobs index, cancelled jobs
-- set. ARGV: id, now. Returns 1 when the job existed.
-- The id stays in (or joins) the cancelled jobs set for the job's TTL: a batch of the job
-- still in a queue (a countdown in a delay queue, a prefetch buffer) is dropped by the
-- workers quietly, as a cancelled job's whose keys are gone, instead of coming back as an
-- `unknown_job` dead letter. The TTL is read with pcall: a job key of another type (edited
-- by hand) is deleted all the same.
local t = redis.pcall('HGET', KEYS[1], 'ttl')
local ttl = (type(t) == 'string' and tonumber(t)) or 604800
local existed = redis.call('EXISTS', KEYS[1])
local group = redis.pcall('HGET', KEYS[1], 'group')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[1] .. ':starts')
redis.call('ZREM', KEYS[6], ARGV[1])
local active, id = active_of(KEYS[1])
if active then redis.call('ZREM', active, id) end
-- A deleted job leaves its group: a closed group may be complete without it.
if type(group) == 'string' and group ~= '' and active then
  local ns = string.sub(active, 1, -8)
  redis.call('SREM', ns .. ':group:' .. group, id)
  redis.call('SREM', ns .. ':group:' .. group .. ':done', id)
  chord_check(ns, group, ARGV[2] or '0')
end
if existed == 1 then
  redis.call('SADD', KEYS[7], ARGV[1])
  if redis.call('TTL', KEYS[7]) < ttl then redis.call('EXPIRE', KEYS[7], ttl) end
end
return existed
