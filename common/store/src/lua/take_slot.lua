-- Rate limit (GCRA, no burst): may one more batch of this key start now? KEYS: the key's
-- theoretical arrival time. ARGV: interval between starts, ms. Uses Redis's clock, so every
-- worker on every machine agrees. Returns 0 when it may start now (and takes the slot), else
-- the ms to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat > now then return tat - now end
redis.call('SET', KEYS[1], tat + interval, 'PX', interval * 2 + 1000)
return 0
