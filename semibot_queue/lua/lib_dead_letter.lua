-- lib_dead_letter: prelude put in front of every script that writes dead letters
-- (dead_letter, recover, trim_dead, dlq_retry, dlq_delete, dlq_purge). Not a script on
-- its own: it only defines local functions over a table K of key names, which the
-- including script fills from its own KEYS, all five of them:
--   K.dead   hash       record id -> record JSON           (KeySpace.dead)
--   K.index  sorted set record id, scored by failure ms (+ tiebreak) (KeySpace.dead_index)
--   K.ids    sorted set record id, all scored 0 (lex)       (KeySpace.dead_ids)
--   K.raw    hash       record id -> raw bytes of the task  (KeySpace.dead_raw)
--   K.seq    string     counter numbering the records       (KeySpace.dead_seq)
-- A record id is '<task id>#<n>': each dead letter is a record of its own, never written
-- over, so the same task id (or the same garbage) dead-lettered twice is two records.
-- Nothing here parses or encodes a body: raw bytes are copied verbatim.

-- add_dead_letter(K, task_id, record_json, raw, now_ms): store a new record; raw is the
-- task's bytes to keep verbatim, or false. Returns the new record id.
local function add_dead_letter(K, task_id, record_json, raw, now_ms)
  local id, n
  repeat
    n = redis.call('INCR', K.seq)
    id = task_id .. '#' .. n
  until redis.call('HSETNX', K.dead, id, record_json) == 1
  -- Records of the same millisecond (a batch, a recovery) keep the order they were
  -- written in: the score's fraction is the record's number, mod 1000. (Left to Redis,
  -- equal scores sort by id, that is by random task id.) Formatted here: Lua would
  -- print the number with 14 digits, and lose the fraction.
  redis.call('ZADD', K.index, string.format('%d.%03d', now_ms, n % 1000), id)
  redis.call('ZADD', K.ids, 0, id)
  if raw then
    redis.call('HSET', K.raw, id, raw)
  end
  return id
end

-- remove_dead_letter(K, id): delete one record from every structure; 1 if it existed.
local function remove_dead_letter(K, id)
  redis.call('ZREM', K.index, id)
  redis.call('ZREM', K.ids, id)
  redis.call('HDEL', K.raw, id)
  return redis.call('HDEL', K.dead, id)
end

-- forget_if_empty(K): once no record is left, drop the counter too (no key stays behind;
-- numbering starts again, which cannot clash: there is no record left to clash with).
local function forget_if_empty(K)
  if redis.call('EXISTS', K.index, K.dead) == 0 then
    redis.call('DEL', K.seq, K.ids, K.raw)
  end
end

-- dead_keys(first): K built from five consecutive KEYS starting at KEYS[first], in the
-- order dead, index, ids, raw, seq.
local function dead_keys(first)
  return {
    dead = KEYS[first], index = KEYS[first + 1], ids = KEYS[first + 2],
    raw = KEYS[first + 3], seq = KEYS[first + 4],
  }
end
