-- The producer's lease on a publishing job lapsed (it was killed): publishing has ended with
-- what it recorded as published. KEYS: job. ARGV: now, grace (ms after created_ms that a job
-- with no lease at all, never renewed since it was registered, counts as lapsed).
-- A pending or running job becomes `interrupted`; a cancelled one stays cancelled; every job
-- gets its `batches_total`, so that it can finish and is not settled again.
-- Returns 1 when it changed the job, 0 otherwise (a job still publishing, already settled, or
-- whose state is not one of STATE: that one is left as it is for its reader to report).
local f = redis.call('HMGET', KEYS[1], 'state', 'batches_total', 'lease_until_ms',
  'created_ms', 'interrupted_ms')
local state, total, lease, created = f[1], f[2], f[3], f[4]
if not state or total then return 0 end
local known = false
for _, s in pairs(STATE) do if s == state then known = true end end
if not known then return 0 end
local now = tonumber(ARGV[1])
local until_ms = tonumber(lease or '')
if lease then
  if not until_ms or until_ms >= now then return 0 end
else
  local born = tonumber(created or '')
  if not born or born + tonumber(ARGV[2]) >= now then return 0 end
end
local j = load(KEYS[1])
local settled = settled_j(j)
local published = math.max(num(j.batches_published), settled)
redis.call('HSET', KEYS[1], 'batches_total', published, 'batches_published', published)
if state == STATE.pending or state == STATE.running then
  redis.call('HSET', KEYS[1], 'state', STATE.interrupted)
end
if (state == STATE.pending or state == STATE.running or state == STATE.cancelled)
   and not f[5] then
  redis.call('HSET', KEYS[1], 'interrupted_ms', ARGV[1])
end
redis.call('HDEL', KEYS[1], 'lease_until_ms')
finish(KEYS[1], ARGV[1])
return 1
