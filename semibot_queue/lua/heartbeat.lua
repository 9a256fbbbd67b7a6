-- heartbeat: record that a worker is alive, on the Redis clock (no skew between hosts).
-- KEYS[1]  workers sorted set (score: last heartbeat in ms)
-- ARGV[1]  worker id
-- Returns the heartbeat time in ms.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
return now_ms
