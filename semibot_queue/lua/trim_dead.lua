-- trim_dead: evict dead-letter records older than the TTL, then the oldest beyond the
-- length bound, at most one batch per call (the caller calls again on its next round).
-- (Prelude: lib_dead_letter.)
-- KEYS[1]  dead-letter hash
-- KEYS[2]  dead-letter index
-- KEYS[3]  dead-letter ids (lex)
-- KEYS[4]  dead-letter raw bytes
-- KEYS[5]  dead-letter sequence
-- ARGV[1]  DEAD_LETTER_MAX_LENGTH
-- ARGV[2]  DEAD_LETTER_TTL in seconds
-- ARGV[3]  most records to evict in this call
-- Returns the evicted record ids, oldest first, so that each one is logged and counted.
local K = dead_keys(1)
local batch = tonumber(ARGV[3])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local cutoff = now_ms - tonumber(ARGV[2]) * 1000
local evicted = redis.call('ZRANGEBYSCORE', K.index, '-inf', '(' .. cutoff, 'LIMIT', 0, batch)
local excess = redis.call('ZCARD', K.index) - #evicted - tonumber(ARGV[1])
excess = math.min(excess, batch - #evicted)
if excess > 0 then
  local oldest = redis.call('ZRANGE', K.index, #evicted, #evicted + excess - 1)
  for _, id in ipairs(oldest) do
    evicted[#evicted + 1] = id
  end
end
for _, id in ipairs(evicted) do
  remove_dead_letter(K, id)
end
if #evicted > 0 then
  forget_if_empty(K)
end
return evicted
