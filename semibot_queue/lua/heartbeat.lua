-- heartbeat: record that a worker is alive, on the Redis clock (no skew between hosts).
-- When no worker of the queue has heartbeated for longer than an outage gap (Redis was
-- down or unreachable for everyone), no worker may be declared dead for a grace window:
-- every live worker gets time to heartbeat again before anyone's tasks are recovered.
-- KEYS[1]  workers sorted set (score: last heartbeat in ms)
-- KEYS[2]  latest heartbeat of any worker (ms)
-- KEYS[3]  grace: no worker is declared dead before this time (ms)
-- ARGV[1]  worker id
-- ARGV[2]  outage gap in ms (WORKER_DEAD_AFTER - HEARTBEAT_INTERVAL)
-- ARGV[3]  grace window in ms (WORKER_DEAD_AFTER)
-- Returns {heartbeat time in ms, 1 if this worker was not registered (new, or taken for
-- dead and forgotten), 1 if a grace window was opened}.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[2]))
local opened = 0
if last and now_ms - last > tonumber(ARGV[2]) then
  redis.call('SET', KEYS[3], now_ms + tonumber(ARGV[3]), 'PX', tonumber(ARGV[3]))
  opened = 1
end
redis.call('SET', KEYS[2], now_ms)
local added = redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
return {now_ms, added, opened}
