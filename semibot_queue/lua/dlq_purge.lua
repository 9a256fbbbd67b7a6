-- dlq_purge: delete dead-letter records, at most one batch per call; the caller calls
-- again until it is told that none is left. (Prelude: lib_dead_letter.)
-- KEYS[1]  dead-letter hash
-- KEYS[2]  dead-letter index
-- KEYS[3]  dead-letter ids (lex)
-- KEYS[4]  dead-letter raw bytes
-- KEYS[5]  dead-letter sequence
-- ARGV[1]  most records to delete in this call
-- Returns {records deleted, 1 if none is left now (every key deleted) else 0}.
local K = dead_keys(1)
local batch = tonumber(ARGV[1])
local ids = redis.call('ZRANGE', K.index, 0, batch - 1)
if #ids == 0 then
  ids = redis.call('ZRANGE', K.ids, 0, batch - 1)
end
local deleted = 0
for _, id in ipairs(ids) do
  deleted = deleted + remove_dead_letter(K, id)
end
if #ids > 0 then
  return {deleted, 0}
end
-- Nothing indexed is left: whatever remains holds no indexed record.
deleted = deleted + redis.call('HLEN', K.dead)
redis.call('DEL', K.dead, K.index, K.ids, K.raw, K.seq)
return {deleted, 1}
