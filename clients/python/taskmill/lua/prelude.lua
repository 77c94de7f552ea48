-- The fields of a job hash these scripts read, loaded with one HMGET (`load`) into a table
-- keyed by name; the `_j` functions work on such a table and collect what they change in `w`
-- (field -> value), written with one HSET (`write`).
local FIELDS = {'state', 'batches_total', 'batches_reserved', 'batches_published',
  'batches_done', 'batches_dead', 'batches_cancelled', 'batches_expired', 'ttl', 'started_ms',
  'finished_ms', 'records_done', 'records_invalid', 'batches_lost'}
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
-- Appends `text` to the job's problems (a JSON array; one that is not is started again).
local function append_problem(job, text)
  local raw = redis.call('HGET', job, 'problems')
  local list = {}
  if raw then
    local ok, got = pcall(cjson.decode, raw)
    if ok and type(got) == 'table' then list = got end
  end
  table.insert(list, text)
  redis.call('HSET', job, 'problems', cjson.encode(list))
end
-- The namespace's `active` sorted set (ids of jobs not finished, scored by their last
-- progress in ms: what workers look at to find jobs whose batches are gone) and the job's id.
local function active_of(job)
  local ns, id = string.match(job, '^(.*):job:([^:]*)$')
  if not ns then return nil, nil end
  return ns .. ':active', id
end
-- The job made progress now (or is new): a stalled-job watcher starts counting again.
local function touch_active(job, now)
  local key, id = active_of(job)
  if key then redis.call('ZADD', key, now, id) end
end
local function settled_j(j)
  return num(j.batches_done) + num(j.batches_dead) + num(j.batches_cancelled)
    + num(j.batches_expired)
end
-- The UTC time of `ms` (ms since the epoch) as Python's isoformat() writes an aware datetime,
-- e.g. 2026-12-07T14:03:09.120000+00:00 (days to a civil date as in H. Hinnant's algorithm).
local function iso_utc(ms)
  ms = math.floor(tonumber(ms) or 0)
  local s = math.floor(ms / 1000)
  local days = math.floor(s / 86400)
  local secs = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06d+00:00', y, m, d,
    math.floor(secs / 3600), math.floor(secs % 3600 / 60), secs % 60, (ms % 1000) * 1000)
end
-- A stored Celery result, decoded (JSON, else msgpack); nil when it is neither.
local function celery_decode(raw)
  local ok, got = pcall(cjson.decode, raw)
  if ok and type(got) == 'table' then return got end
  ok, got = pcall(cmsgpack.unpack, raw)
  if ok and type(got) == 'table' then return got end
  return nil
end
-- Celery ingress: writes `meta` (a Celery result, JSON; packed as msgpack when the call's
-- settings `c` say the app's result_serializer is msgpack) at `key` for `expires` seconds and
-- publishes it on the key's channel (what AsyncResult.get() listens to), as Celery's Redis
-- backend does; a stored SUCCESS is never overwritten. Returns 1 when written.
local function celery_put(key, meta, expires, c)
  local old = redis.call('GET', key)
  if old then
    local got = celery_decode(old)
    if got and got.status == 'SUCCESS' then return 0 end
  end
  if c.msgpack then meta = cmsgpack.pack(cjson.decode(meta)) end
  redis.call('SET', key, meta, 'EX', math.max(1, math.floor(tonumber(expires) or 86400)))
  redis.call('PUBLISH', key, meta)
  return 1
end
-- A Celery result's JSON: `result` and `traceback` are JSON texts already; `c` the call's
-- settings (parent_id and group_id when it had them).
local function celery_meta(id, status, result, traceback, now, c)
  local meta = '{"status": ' .. cjson.encode(status) .. ', "result": ' .. result
    .. ', "traceback": ' .. traceback .. ', "children": [], "date_done": "' .. iso_utc(now)
    .. '", "task_id": ' .. cjson.encode(id)
  if type(c.parent_id) == 'string' then meta = meta .. ', "parent_id": ' .. cjson.encode(c.parent_id) end
  if type(c.group_id) == 'string' then meta = meta .. ', "group_id": ' .. cjson.encode(c.group_id) end
  return meta .. '}'
end
-- An exception as Celery stores one: get() raises exc_type (made up in celery.exceptions when
-- exc_module is not loaded) with the message.
local function celery_exc(exc_type, module, message)
  return cjson.encode({exc_type = exc_type, exc_message = {message}, exc_module = module})
end
-- The task ids of the calls left in a Celery chain (signatures with options.task_id).
local function celery_chain_ids(c)
  local ids = {}
  if type(c.chain) ~= 'table' then return ids end
  for _, sig in ipairs(c.chain) do
    if type(sig) == 'table' and type(sig.options) == 'table'
       and type(sig.options.task_id) == 'string' then
      ids[#ids + 1] = sig.options.task_id
    end
  end
  return ids
end
-- A job made from a Celery call (its `celery` field, JSON: key, expires, parent_id, group_id,
-- chain) that has just ended (`j`: its fields as they are now) writes its outcome once:
-- SUCCESS with the batch's result, REVOKED when cancelled or expired unrun, FAILURE with the
-- dead-letter reason otherwise. On SUCCESS with calls left in its chain, the job goes to the
-- namespace's outbox (a worker publishes the next call); otherwise those calls get the same
-- outcome, as Celery's workers write it (so that get() on the chain raises, not waits).
local function celery_finish(job, j, now)
  local raw = redis.call('HGET', job, 'celery')
  if not raw or redis.call('HSETNX', job, 'celery_sent_ms', now) == 0 then return end
  local ok, c = pcall(cjson.decode, raw)
  if not ok or type(c) ~= 'table' or type(c.key) ~= 'string' then return end
  local id = string.match(job, ':job:([^:]*)$') or ''
  local prefix = string.sub(c.key, 1, #c.key - #id)
  local rest = celery_chain_ids(c)
  if j.state == STATE.completed then
    local result = redis.call('HGET', job .. ':results', '0') or 'null'
    celery_put(c.key, celery_meta(id, 'SUCCESS', result, 'null', now, c), c.expires, c)
    if #rest > 0 and redis.call('HSETNX', job, 'then_fired_ms', now) == 1 then
      local ns = string.match(job, '^(.*):job:[^:]*$')
      if ns then redis.call('ZADD', ns .. ':outbox', now, id) end
    end
    return
  end
  local status, exc, tb = 'FAILURE', nil, nil
  if j.state == STATE.cancelled or (num(j.batches_expired) > 0 and num(j.batches_done) == 0
      and num(j.batches_dead) == 0) then
    local why = 'cancelled'
    if j.state ~= STATE.cancelled then why = 'expired before it started' end
    status = 'REVOKED'
    exc = celery_exc('TaskRevokedError', 'celery.exceptions', why)
    tb = 'null'
  else
    local kind, message = 'stalled', 'its batch was lost (stalled)'
    local dead = redis.call('HGET', job .. ':dead', '0')
    if dead then
      local okd, d = pcall(cjson.decode, dead)
      if okd and type(d) == 'table' then
        kind = tostring(d.kind or 'failed')
        message = tostring(d.error or d.reason or dead)
      end
    end
    local exc_type = string.gsub(kind, '^%l', string.upper)
    exc_type = string.gsub(exc_type, '_(%l)', function(l) return string.upper(l) end) .. 'Error'
    exc = celery_exc(exc_type, 'taskmill', kind .. ': ' .. message)
    tb = cjson.encode(kind .. ': ' .. message)
  end
  celery_put(c.key, celery_meta(id, status, exc, tb, now, c), c.expires, c)
  for _, next_id in ipairs(rest) do
    celery_put(prefix .. next_id, celery_meta(next_id, status, exc, tb, now, {parent_id = id}),
      c.expires, c)
  end
end
-- A job with a completion webhook (`on_complete`) that has just ended queues it once, in the
-- script that ended it: its id goes to the namespace's `hooks` set, due now (workers deliver
-- from there; see hooks.rs).
local function hook_fire(job, now)
  if redis.call('HEXISTS', job, 'on_complete') == 1
     and redis.call('HSETNX', job, 'hook_fired_ms', now) == 1 then
    local ns, id = string.match(job, '^(.*):job:([^:]*)$')
    if ns then redis.call('ZADD', ns .. ':hooks', now, id) end
  end
end
-- A group (`enqueue --group G`) keeps its job ids in `{ns}:group:G`, the ids of those that
-- have ended in `{ns}:group:G:done`, and `{ns}:group:G:info` (a hash: closed_ms, then, fired_ms,
-- then_job, then_note) once `producer group close G` closed it. A closed group whose every job
-- has ended fires its chord follow-up (`then`) once: `group:G` joins the namespace's outbox, in
-- the same script as the ending that completes it.
local function chord_check(ns, g, now)
  local members = ns .. ':group:' .. g
  local info = members .. ':info'
  if redis.call('HEXISTS', info, 'closed_ms') == 0 or redis.call('HEXISTS', info, 'then') == 0 then
    return
  end
  if #redis.call('SDIFF', members, members .. ':done') > 0 then return end
  if redis.call('HSETNX', info, 'fired_ms', now) == 1 then
    redis.call('ZADD', ns .. ':outbox', now, 'group:' .. g)
  end
end
-- A job that has just ended counts as ended in its group (once: a set), and may complete it.
local function group_done(job, now)
  local g = redis.call('HGET', job, 'group')
  if not g or g == '' then return end
  local ns, id = string.match(job, '^(.*):job:([^:]*)$')
  if not ns then return end
  local members = ns .. ':group:' .. g
  redis.call('SADD', members .. ':done', id)
  local ttl = redis.call('TTL', members)
  if ttl > 0 then redis.call('EXPIRE', members .. ':done', ttl) end
  chord_check(ns, g, now)
end
-- Decides whether a job is finished and sets its state and finish time. Batches counted lost
-- (`batches_lost`, set when a stalled job was given up on) finish it as `stalled`; a lost
-- batch that comes back after all is stored and no longer counted lost, so a job whose lost
-- batches all come back finishes as it would have (its summary folded again).
local function finish_j(job, j, w, now)
  local ended = false
  if j.batches_total and j.state ~= STATE.cancelled then
    local total = tonumber(j.batches_total)
    local settled = settled_j(j)
    local dead = settled - num(j.batches_done)
    local lost = num(j.batches_lost)
    if lost > 0 and settled + lost > total then
      lost = math.max(total - settled, 0)
      put(j, w, 'batches_lost', lost)
    end
    local state = j.state
    if state == STATE.interrupted then
      -- An interrupted job keeps its state; it finishes when what was published has settled.
      if settled + lost >= total then
        if not j.finished_ms then put(j, w, 'finished_ms', now) end
        release_unique(job)
        ended = true
      end
    else
      if settled + lost >= total then
        if lost > 0 then
          state = STATE.stalled
        elseif dead > 0 then
          state = STATE.completed_with_errors
        else
          state = STATE.completed
        end
        ended = true
      elseif settled > 0 then
        state = STATE.running
      end
      if state ~= j.state then
        -- A stalled job that finishes after all: its summary is folded again.
        if j.state == STATE.stalled then redis.call('HDEL', job, 'summary') end
        put(j, w, 'state', state)
        if ended then
          put(j, w, 'finished_ms', now)
          release_unique(job)
        end
      end
    end
  end
  if ended then
    celery_finish(job, j, now)
    hook_fire(job, now)
    group_done(job, now)
  end
  local key, id = active_of(job)
  -- A job with follow-up steps fires them once, in this same script: its id goes to the
  -- namespace's outbox, which workers publish from (see chains.rs).
  if ended and key and redis.call('HEXISTS', job, 'then') == 1
     and redis.call('HSETNX', job, 'then_fired_ms', now) == 1 then
    redis.call('ZADD', string.sub(key, 1, -8) .. ':outbox', now, id)
  end
  if key then
    if ended or j.state == STATE.cancelled then
      redis.call('ZREM', key, id)
    else
      redis.call('ZADD', key, now, id)
    end
  end
end
-- Whether a job in `state` is finished and has no summary yet (a worker folds one: completed,
-- with errors, or stalled; cancelled and interrupted jobs get none). `state` nil: read it.
local function wants_summary(job, state)
  state = state or redis.call('HGET', job, 'state')
  return (state == STATE.completed or state == STATE.completed_with_errors
    or state == STATE.stalled) and redis.call('HEXISTS', job, 'summary') == 0
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
  local settled = settled_j(j)
  if settled > num(j.batches_published) then put(j, w, 'batches_published', settled) end
end
local function published_at_least(job)
  local j, w = load(job), {}
  published_at_least_j(j, w)
  write(job, w)
end
