-- Register a new job unless the id is taken. KEYS: job, jobs index, unique key (or ''), and
-- optionally the set of its group's job ids (or '').

-- ARGV: id, task, queue, params, now, ttl, prefix of job keys, and optionally a token of
-- this registration (a retry of a registration whose answer was lost, or whose WAIT for
-- replicas failed, finds its own token and counts as registered), the follow-up steps (JSON)
-- and the job this one follows up ('' for none), its group, and for a job published whole in
-- one go (a Celery call): its batches, its records and its Celery settings (JSON) ('' for a
-- job published batch by batch), the URL of its completion webhook ('' for none), and the
-- options of a job published whole (JSON of field -> text: eta_ms, priority...; '' for none).
-- Returns 1 when registered, 2 when this token registered it before and it has finished since
-- (a call delivered again: nothing to publish), 3 when its group is closed (`producer group
-- close`: nothing registered), 0 when the id already exists, or the id of the job that holds
-- the unique key while it is pending or running (nothing registered then).
-- The job keeps its TTL in its hash; the index lives as long as its longest-lived job, and
-- ids of expired jobs are dropped from it (the oldest few here, the rest when listed).
local token = ARGV[8] or ''
if redis.call('EXISTS', KEYS[1]) == 1 then
  if token ~= '' and redis.call('HGET', KEYS[1], 'reg_token') == token then
    if redis.call('HEXISTS', KEYS[1], 'finished_ms') == 1 then return 2 end
    return 1
  end
  return 0
end
local ttl = tonumber(ARGV[6])
if (ARGV[11] or '') ~= '' and (KEYS[4] or '') ~= ''
   and redis.call('HEXISTS', KEYS[4] .. ':info', 'closed_ms') == 1 then
  return 3
end
if KEYS[3] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  if holder then
    local state = redis.call('HGET', holder, 'state')
    local done = redis.call('HGET', holder, 'finished_ms')
    if (state == STATE.pending or state == STATE.running or state == STATE.interrupted)
       and not done then
      return string.sub(holder, string.len(ARGV[7]) + 1)
    end
  end
  redis.call('SET', KEYS[3], KEYS[1], 'EX', ttl)
end
redis.call('HSET', KEYS[1], 'state', STATE.pending, 'task', ARGV[2], 'queue', ARGV[3],
  'params', ARGV[4], 'created_ms', ARGV[5], 'ttl', ttl, 'batches_published', 0,
  'batches_done', 0, 'batches_dead', 0, 'records_total', 0, 'records_done', 0,
  'records_invalid', 0, 'retries', 0, 'sources_failed', 0)
if KEYS[3] ~= '' then redis.call('HSET', KEYS[1], 'unique_key', KEYS[3]) end
if token ~= '' then redis.call('HSET', KEYS[1], 'reg_token', token) end
if (ARGV[9] or '') ~= '' then redis.call('HSET', KEYS[1], 'then', ARGV[9]) end
if (ARGV[10] or '') ~= '' then redis.call('HSET', KEYS[1], 'parent', ARGV[10]) end
if (ARGV[11] or '') ~= '' and (KEYS[4] or '') ~= '' then
  redis.call('HSET', KEYS[1], 'group', ARGV[11])
  local before = redis.call('TTL', KEYS[4])
  redis.call('SADD', KEYS[4], ARGV[1])
  if before == -2 or (before >= 0 and before < ttl) then redis.call('EXPIRE', KEYS[4], ttl) end
end
if (ARGV[12] or '') ~= '' then
  redis.call('HSET', KEYS[1], 'batches_total', ARGV[12], 'batches_published', ARGV[12],
    'records_total', ARGV[13], 'celery', ARGV[14])
end
if (ARGV[15] or '') ~= '' then redis.call('HSET', KEYS[1], 'on_complete', ARGV[15]) end
if (ARGV[16] or '') ~= '' then
  local ok, o = pcall(cjson.decode, ARGV[16])
  if ok and type(o) == 'table' then
    for k, v in pairs(o) do
      if type(v) == 'string' then redis.call('HSET', KEYS[1], k, v) end
    end
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
touch_active(KEYS[1], ARGV[5])
local before = redis.call('TTL', KEYS[2])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
if before == -2 or (before >= 0 and before < ttl) then redis.call('EXPIRE', KEYS[2], ttl) end
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, 15)) do
  if redis.call('EXISTS', ARGV[7] .. id) == 0 then redis.call('ZREM', KEYS[2], id) end
end
return 1
