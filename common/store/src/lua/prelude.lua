-- The fields of a job hash these scripts read, loaded with one HMGET (`load`) into a table
-- keyed by name; the `_j` functions work on such a table and collect what they change in `w`
-- (field -> value), written with one HSET (`write`).
local FIELDS = {'state', 'batches_total', 'batches_reserved', 'batches_published',
  'batches_done', 'batches_dead', 'batches_cancelled', 'batches_expired', 'ttl', 'started_ms',
  'finished_ms', 'records_done', 'records_invalid'}
local function load(job)
  local f = redis.call('HMGET', job, unpack(FIELDS))
  local j = {}
  for i, k in ipairs(FIELDS) do j[k] = f[i] end
  return j
end
-- A counter as a number; one that is missing or not a number (a hash edited by hand) is 0.
local function num(v)
  return tonumber(v or '0') or 0
end
-- Sets field k to v in the job table and in the writes.
local function put(j, w, k, v)
  j[k] = v
  w[k] = v
end
local function write(job, w)
  local args = {}
  for k, v in pairs(w) do
    args[#args + 1] = k
    args[#args + 1] = v
  end
  if #args > 0 then redis.call('HSET', job, unpack(args)) end
end
local function job_ttl(job, fallback)
  return tonumber(redis.call('HGET', job, 'ttl')) or tonumber(fallback)
end
-- A finished job lets go of its unique key (if it still holds it).
local function release_unique(job)
  local u = redis.call('HGET', job, 'unique_key')
  if u and redis.call('GET', u) == job then redis.call('DEL', u) end
end
local function finish_j(job, j, w, now)
  if not j.batches_total then return end
  local total = tonumber(j.batches_total)
  local done = num(j.batches_done)
  local dead = num(j.batches_dead) + num(j.batches_cancelled) + num(j.batches_expired)
  if j.state == STATE.cancelled then return end
  local state = j.state
  if state == STATE.interrupted then
    -- An interrupted job keeps its state; it finishes when what was published has settled.
    if done + dead >= total then
      if not j.finished_ms then put(j, w, 'finished_ms', now) end
      release_unique(job)
    end
    return
  end
  if done + dead >= total then
    if dead > 0 then state = STATE.completed_with_errors else state = STATE.completed end
  elseif done + dead > 0 then
    state = STATE.running
  end
  if state ~= j.state then
    put(j, w, 'state', state)
    if state == STATE.completed or state == STATE.completed_with_errors then
      put(j, w, 'finished_ms', now)
      release_unique(job)
    end
  end
end
local function finish(job, now)
  local j, w = load(job), {}
  finish_j(job, j, w, now)
  write(job, w)
end
-- Every key of the call gets the job's own TTL (`fallback` for jobs written before it kept one).
local function expire_all_j(j, fallback)
  local ttl = tonumber(j.ttl) or tonumber(fallback)
  for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
end
local function expire_all(job, fallback)
  local ttl = job_ttl(job, fallback)
  for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
end
-- The batch numbers a job can have: below batches_total once publishing ended, else below
-- batches_reserved (which the producer raises, ahead, before it publishes). nil: no such job.
local function batch_limit_j(j)
  if not j.state then return nil end
  return tonumber(j.batches_total or j.batches_reserved or j.batches_published or '0')
end
local function batch_limit(job)
  return batch_limit_j(load(job))
end
-- A batch counted done or dead was published: batches_published is never below them.
local function published_at_least_j(j, w)
  local settled = num(j.batches_done) + num(j.batches_dead) + num(j.batches_cancelled)
    + num(j.batches_expired)
  if settled > num(j.batches_published) then put(j, w, 'batches_published', settled) end
end
local function published_at_least(job)
  local j, w = load(job), {}
  published_at_least_j(j, w)
  write(job, w)
end
