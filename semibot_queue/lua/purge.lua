-- purge: delete a whole list or store and say how many entries it held.
-- Used for clear_queue (the pending list) and the dead-letter purge (hash and index).
-- KEYS[1]  the list or hash to count and delete
-- KEYS[2..] companion keys deleted with it
-- Returns the number of entries KEYS[1] held.
local kind = redis.call('TYPE', KEYS[1])['ok']
local count = 0
if kind == 'list' then
  count = redis.call('LLEN', KEYS[1])
elseif kind == 'hash' then
  count = redis.call('HLEN', KEYS[1])
end
redis.call('DEL', unpack(KEYS))
return count
