-- A job whose batches can no longer arrive is given up on: the batches not settled are
-- counted lost (`batches_lost`) and the job finishes: `stalled`, or, interrupted, with its
-- finish time. KEYS: job. ARGV: now, score (the job's last progress as the watcher saw it in
-- the active set), problem (`{lost}` replaced by the number lost).
-- Returns {code, lost, summary}: code 1 when it finished now, 0 when nothing changed (it made
-- progress since, is finished, or is still publishing); summary 1 when the job has no summary
-- yet (the watcher folds one).
local j = load(KEYS[1])
if not j.state or not j.batches_total then return {0, 0, 0} end
local open = j.state == STATE.pending or j.state == STATE.running
  or (j.state == STATE.interrupted and not j.finished_ms)
if not open then return {0, 0, 0} end
local key, id = active_of(KEYS[1])
if not key then return {0, 0, 0} end
local score = redis.call('ZSCORE', key, id)
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return {0, 0, 0} end
local w = {}
local lost = math.max(tonumber(j.batches_total) - settled_j(j), 0)
if lost > 0 then
  put(j, w, 'batches_lost', lost)
  append_problem(KEYS[1], (string.gsub(ARGV[3], '{lost}', tostring(lost))))
end
finish_j(KEYS[1], j, w, ARGV[1])
write(KEYS[1], w)
local summary = 0
if wants_summary(KEYS[1], j.state) then summary = 1 end
return {1, lost, summary}
