-- A Celery call refused before it became a job (an unknown task, a serializer taskmill does
-- not read, bad arguments): its outcome written where Celery's result backend reads it.
-- KEYS: the result key. ARGV: task id, status, exc_type, exc_module, message, now, expires
-- (seconds), settings (JSON: parent_id, group_id, msgpack). Returns 1 when written, 0 when a SUCCESS
-- was stored there already (kept).
local ok, c = pcall(cjson.decode, ARGV[8])
if not ok or type(c) ~= 'table' then c = {} end
local meta = celery_meta(ARGV[1], ARGV[2], celery_exc(ARGV[3], ARGV[4], ARGV[5]),
  cjson.encode(ARGV[5]), ARGV[6], c)
return celery_put(KEYS[1], meta, ARGV[7], c)
