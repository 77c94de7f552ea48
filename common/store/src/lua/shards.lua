-- How many shards work queue ARGV[1] is spread over (KEYS[1]: the namespace's shards hash),
-- raised to ARGV[2] first when it was fewer: counts only grow, since a shard nobody consumed
-- any more would strand its batches. A value that is not a number reads as 1.
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 1
local want = tonumber(ARGV[2])
if want > cur then
  redis.call('HSET', KEYS[1], ARGV[1], want)
  cur = want
end
return cur
