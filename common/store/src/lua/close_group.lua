-- Close a group (`producer group close G`): it takes no more jobs, and its chord follow-up
-- (`then`, JSON of the chain; '' for none) fires once every job in it has ended (now, if they
-- all have). KEYS: the group's job ids, its info hash. ARGV: group, now, then, ttl.
-- Returns 1 when closed now, 2 when it was closed already with the same follow-up, 3 when it
-- was closed already with another one (nothing changed), 0 when the group has no job.
if redis.call('SCARD', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], 'closed_ms') == 1 then
  if (redis.call('HGET', KEYS[2], 'then') or '') == ARGV[3] then return 2 end
  return 3
end
redis.call('HSET', KEYS[2], 'closed_ms', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'then', ARGV[3]) end
local ttl = math.max(redis.call('TTL', KEYS[1]), tonumber(ARGV[4]) or 0)
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
local ns = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1] - 7)
chord_check(ns, ARGV[1], ARGV[2])
return 1
