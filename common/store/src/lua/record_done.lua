local now, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
-- The job is read once and written once, whatever the number of batches.
local j = load(KEYS[1])
local limit = batch_limit_j(j)
if not limit then
  for i = 1, n do out[i] = -1 end
  return out
end
local batches, records, invalid, undead = 0, 0, 0, 0
-- The dead batches' hash holds as many entries as batches_dead counts.
local has_dead = num(j.batches_dead) > 0
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
  expire_all_j(j, ttl)
end
-- A last element: 1 when the job is finished and has no summary yet (this worker folds it).
local st = j.state
if batches > 0 and (st == STATE.completed or st == STATE.completed_with_errors)
   and redis.call('HEXISTS', KEYS[1], 'summary') == 0 then
  out[n + 1] = 1
else
  out[n + 1] = 0
end
return out
