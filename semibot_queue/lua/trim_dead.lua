-- trim_dead: evict dead-letter records older than the TTL, then the oldest beyond the limit.
-- KEYS[1]  dead-letter hash
-- KEYS[2]  dead-letter index sorted set
-- ARGV[1]  DEAD_LETTER_MAX_LENGTH
-- ARGV[2]  DEAD_LETTER_TTL in seconds
-- Returns the evicted task ids, so that each one is logged and counted.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local cutoff = now_ms - tonumber(ARGV[2]) * 1000
local evicted = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. cutoff)
local excess = redis.call('ZCARD', KEYS[2]) - #evicted - tonumber(ARGV[1])
if excess > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], #evicted, #evicted + excess - 1)
  for _, id in ipairs(oldest) do
    evicted[#evicted + 1] = id
  end
end
for _, id in ipairs(evicted) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return evicted
