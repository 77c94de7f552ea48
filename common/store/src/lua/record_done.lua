local now, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
local limit = batch_limit(KEYS[1])
if not limit then
  for i = 1, n do out[i] = -1 end
  return out
end
local batches, records, invalid, undead = 0, 0, 0, 0
local has_dead = redis.call('EXISTS', KEYS[3]) == 1
for i = 0, n - 1 do
  local at = 4 + i * 4
  if tonumber(ARGV[at]) >= limit then
    out[i + 1] = -2
  elseif redis.call('HSETNX', KEYS[2], ARGV[at], ARGV[at + 1]) == 1 then
    out[i + 1] = 1
    batches = batches + 1
    records = records + tonumber(ARGV[at + 2])
    invalid = invalid + tonumber(ARGV[at + 3])
    if has_dead then undead = undead + redis.call('HDEL', KEYS[3], ARGV[at]) end
  else
    out[i + 1] = 0
  end
end
if batches > 0 then
  redis.call('HINCRBY', KEYS[1], 'batches_done', batches)
  redis.call('HINCRBY', KEYS[1], 'records_done', records)
  if invalid > 0 then redis.call('HINCRBY', KEYS[1], 'records_invalid', invalid) end
  if undead > 0 then redis.call('HINCRBY', KEYS[1], 'batches_dead', -undead) end
  redis.call('HSETNX', KEYS[1], 'started_ms', now)
  if redis.call('HGET', KEYS[1], 'state') == STATE.pending then
    redis.call('HSET', KEYS[1], 'state', STATE.running)
  end
  published_at_least(KEYS[1])
  finish(KEYS[1], now)
  expire_all(KEYS[1], ttl)
end
-- A last element: 1 when the job is finished and has no summary yet (this worker folds it).
local st = redis.call('HGET', KEYS[1], 'state')
if batches > 0 and (st == STATE.completed or st == STATE.completed_with_errors)
   and redis.call('HEXISTS', KEYS[1], 'summary') == 0 then
  out[n + 1] = 1
else
  out[n + 1] = 0
end
return out
