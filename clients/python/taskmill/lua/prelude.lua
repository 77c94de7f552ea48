local function job_ttl(job, fallback)
  return tonumber(redis.call('HGET', job, 'ttl')) or tonumber(fallback)
end
-- A finished job lets go of its unique key (if it still holds it).
local function release_unique(job)
  local u = redis.call('HGET', job, 'unique_key')
  if u and redis.call('GET', u) == job then redis.call('DEL', u) end
end
local function finish(job, now)
  local f = redis.call('HMGET', job, 'batches_total', 'batches_done', 'batches_dead', 'state',
    'batches_cancelled', 'batches_expired')
  if not f[1] then return end
  local total = tonumber(f[1])
  local done = tonumber(f[2] or '0')
  local dead = tonumber(f[3] or '0') + tonumber(f[5] or '0') + tonumber(f[6] or '0')
  if f[4] == STATE.cancelled then return end
  local state = f[4]
  if state == STATE.interrupted then
    -- An interrupted job keeps its state; it finishes when what was published has settled.
    if done + dead >= total then
      redis.call('HSETNX', job, 'finished_ms', now)
      release_unique(job)
    end
    return
  end
  if done + dead >= total then
    if dead > 0 then state = STATE.completed_with_errors else state = STATE.completed end
  elseif done + dead > 0 then
    state = STATE.running
  end
  if state ~= f[4] then
    redis.call('HSET', job, 'state', state)
    if state == STATE.completed or state == STATE.completed_with_errors then
      redis.call('HSET', job, 'finished_ms', now)
      release_unique(job)
    end
  end
end
local function expire_all(job, fallback)
  local ttl = job_ttl(job, fallback)
  for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
end
-- The batch numbers a job can have: below batches_total once publishing ended, else below
-- batches_reserved (which the producer raises, ahead, before it publishes). nil: no such job.
local function batch_limit(job)
  local f = redis.call('HMGET', job, 'state', 'batches_total', 'batches_reserved',
    'batches_published')
  if not f[1] then return nil end
  return tonumber(f[2] or f[3] or f[4] or '0')
end
-- A batch counted done or dead was published: batches_published is never below them.
local function published_at_least(job)
  local f = redis.call('HMGET', job, 'batches_done', 'batches_dead', 'batches_published',
    'batches_cancelled', 'batches_expired')
  local settled = tonumber(f[1] or '0') + tonumber(f[2] or '0') + tonumber(f[4] or '0')
    + tonumber(f[5] or '0')
  if settled > tonumber(f[3] or '0') then
    redis.call('HSET', job, 'batches_published', settled)
  end
end
