-- lib_task_id: prelude put in front of the scripts that must know a stored task's id
-- (fetch, ack, recover, release). Not a script on its own.
-- task_id_of(body, max_length): the "task_id" written in a JSON task body, or false.
-- A plain search instead of cjson.decode: a 1 MB body costs microseconds, not a parse.
-- Our bodies carry task_id first; the Semibot runtime's carry it at top level too.
local function task_id_of(body, max_length)
  local from = string.find(body, '"task_id"', 1, true)
  while from do
    local id = string.match(body, '^%s*:%s*"([%w_.:%-]+)"', from + 9)
    if id and #id <= max_length then
      return id
    end
    from = string.find(body, '"task_id"', from + 9, true)
  end
  return false
end

-- key_of(body, max_length): the id under which a body's delivery counts are kept: its task
-- id, or 'raw-<sha1>' for a body that has none.
local function key_of(body, max_length)
  local id = task_id_of(body, max_length)
  if id then
    return id
  end
  if redis.sha1hex then
    return 'raw-' .. redis.sha1hex(body)
  end
  -- fakeredis (the demo's embedded Redis) has no sha1hex: length and both ends instead
  return 'raw-' .. #body .. '-' .. string.gsub(string.sub(body, 1, 16) .. string.sub(body, -16),
    '[^%w]', '_')
end

-- redelivered(crashes, releases, id): deliveries of id lost to dead workers or given back.
local function redelivered(crashes, releases, id)
  return (tonumber(redis.call('HGET', crashes, id)) or 0)
    + (tonumber(redis.call('HGET', releases, id)) or 0)
end

-- counts_of(crashes, releases, bodies, max_length): redelivered() of each body, in order;
-- all zeros at the cost of two EXISTS when no task was ever redelivered (the usual case).
local function counts_of(crashes, releases, bodies, max_length)
  local counts = {}
  local any = redis.call('EXISTS', crashes, releases) > 0
  for i, body in ipairs(bodies) do
    counts[i] = any and redelivered(crashes, releases, key_of(body, max_length)) or 0
  end
  return counts
end
