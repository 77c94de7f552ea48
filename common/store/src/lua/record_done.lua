local now, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
-- The job is read once and written once, whatever the number of batches.
local j = load(KEYS[1])
local limit = batch_limit_j(j)
if not limit then
  for i = 1, n do out[i] = -1 end
  return out
end
-- Which batches already have a result: one HMGET for all of them, then one HSET for the new
-- ones (a call from Lua costs more than the command; HSETNX a batch was the script's largest
-- cost). A batch number given twice in one call counts once.
local asked, fields, seen = {}, {}, {}
for i = 0, n - 1 do
  local at = 4 + i * 4
  local b = ARGV[at]
  if tonumber(b) >= limit then
    out[i + 1] = -2
  elseif seen[b] then
    out[i + 1] = 0
  else
    seen[b] = true
    asked[#asked + 1] = i
    fields[#fields + 1] = b
  end
end
local batches, records, invalid, undead = 0, 0, 0, 0
-- The dead batches' hash holds as many entries as batches_dead counts.
local has_dead = num(j.batches_dead) > 0
if #fields > 0 then
  local present = redis.call('HMGET', KEYS[2], unpack(fields))
  local new = {}
  for k, i in ipairs(asked) do
    local at = 4 + i * 4
    if present[k] then
      out[i + 1] = 0
    else
      out[i + 1] = 1
      new[#new + 1] = ARGV[at]
      new[#new + 1] = ARGV[at + 1]
      batches = batches + 1
      records = records + tonumber(ARGV[at + 2])
      invalid = invalid + tonumber(ARGV[at + 3])
      if has_dead then undead = undead + redis.call('HDEL', KEYS[3], ARGV[at]) end
    end
  end
  if #new > 0 then redis.call('HSET', KEYS[2], unpack(new)) end
end
if batches > 0 then
  local w = {}
  put(j, w, 'batches_done', num(j.batches_done) + batches)
  put(j, w, 'records_done', num(j.records_done) + records)
  if invalid > 0 then put(j, w, 'records_invalid', num(j.records_invalid) + invalid) end
  if undead > 0 then put(j, w, 'batches_dead', num(j.batches_dead) - undead) end
  if not j.started_ms then put(j, w, 'started_ms', now) end
  if j.state == STATE.pending then put(j, w, 'state', STATE.running) end
  published_at_least_j(j, w)
  finish_j(KEYS[1], j, w, now)
  write(KEYS[1], w)
  -- The keys' TTL is renewed when the results' has run down by a hundredth of it, not at
  -- every call: every script that renews one renews all of a job's keys together, and the
  -- results hash is the last of them to be created, so its TTL is the lowest. A new results
  -- hash has none (-1). In ms, so that a TTL of a few seconds is renewed as it runs down too.
  local full_ms = (tonumber(j.ttl) or tonumber(ttl)) * 1000
  if redis.call('PTTL', KEYS[2]) < full_ms - math.max(1, math.floor(full_ms / 100)) then
    expire_all_j(j, ttl)
  end
end
-- A last element: 1 when the job is finished and has no summary yet (this worker folds it).
if batches > 0 and wants_summary(KEYS[1], j.state) then
  out[n + 1] = 1
else
  out[n + 1] = 0
end
return out
