-- adopt: register in-flight lists that no registry entry points to, so that recovery
-- finds them. A worker taken for dead and forgotten may still have taken a task before
-- it really died; its list is then found by a key scan and adopted here, with the
-- current time as its last heartbeat: it is recovered only if it stays silent for
-- WORKER_DEAD_AFTER (a live worker heartbeats meanwhile and keeps its tasks).
-- KEYS[1]     workers sorted set
-- KEYS[2..]   in-flight lists found by the scan
-- ARGV[1..]   their worker ids, in the same order
-- Returns the worker ids adopted.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local adopted = {}
for i = 2, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[i - 1]) then
    redis.call('ZADD', KEYS[1], now_ms, ARGV[i - 1])
    adopted[#adopted + 1] = ARGV[i - 1]
  end
end
return adopted
